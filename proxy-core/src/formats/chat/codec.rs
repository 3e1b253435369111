//! What a format implements: a caller format reads requests and writes answers and
//! stream events; an upstream format writes requests and reads answers and streams.

use bytes::BytesMut;

use super::canonical::{Answer, Event, Request};
use crate::failure::ProxyError;
use crate::formats::sse::{self, StreamBreak};

/// A format callers speak: requests in, answers and stream events out.
pub trait CallerCodec: CallerStream + Sync {
    /// Refuses (400) a body the format does not allow.
    fn read_request(&self, body: &[u8]) -> Result<Request, ProxyError>;
    fn write_answer(&self, answer: &Answer) -> Vec<u8>;
}

/// A caller format's stream side, implemented next to its stream encoder.
pub trait CallerStream {
    fn stream_encoder(&self) -> Box<dyn StreamEncoder>;
}

/// A format upstreams speak: requests out, answers and stream events in.
pub trait UpstreamCodec: UpstreamStream + Sync {
    /// Refuses (400) a request the format cannot express.
    fn write_request(&self, request: &Request, model: &str) -> Result<Vec<u8>, ProxyError>;
    /// An unreadable answer is an upstream failure.
    fn read_answer(&self, body: &[u8]) -> Result<Answer, ProxyError>;
}

/// An upstream format's stream side, implemented next to its stream decoder.
pub trait UpstreamStream {
    fn stream_decoder(&self) -> Box<dyn StreamDecoder>;
}

/// Reads one upstream event into canonical events, remembering what it must between
/// events. An event that cannot be read, or that reports an upstream failure, breaks
/// the stream.
pub trait StreamDecoder: Send {
    fn decode(&mut self, event: &sse::Event, out: &mut Vec<Event>) -> Result<(), StreamBreak>;
}

/// Writes canonical events in the caller's format.
pub trait StreamEncoder: Send {
    fn encode(&mut self, event: Event, out: &mut BytesMut);
}
