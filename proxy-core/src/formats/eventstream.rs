//! AWS event-stream messages (Bedrock's `converse-stream`) as server-sent events, so
//! the stream relay, its filters and the chat decoders read one kind of stream.
//!
//! The binary framing (prelude, headers, CRC32 checksums) is read by
//! `aws-smithy-eventstream`. An `event` message becomes `event: <:event-type>` with its
//! JSON payload as data; an `exception` or `error` message becomes `event: error` with
//! `{"error": {"type", "message"}}`, which the relay already reads as an upstream error
//! event (before the first event: a failed attempt; later: a broken stream). A frame
//! that does not decode (bad checksum, bad lengths) breaks the stream as unreadable.

use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::{HeaderValue, Message};
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Value, json};

use super::sse::StreamBreak;

/// Turns event-stream bytes, as they arrive, into server-sent events.
#[derive(Default)]
pub struct EventStreamToSse {
    buffer: BytesMut,
    decoder: MessageFrameDecoder,
}

impl EventStreamToSse {
    /// The events of every message completed by `chunk` (nothing while a message is
    /// still partial).
    pub fn push(&mut self, chunk: &[u8]) -> Result<Bytes, StreamBreak> {
        self.buffer.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        loop {
            match self.decoder.decode_frame(&mut self.buffer) {
                Ok(DecodedFrame::Complete(message)) => write_event(&message, &mut out),
                Ok(DecodedFrame::Incomplete) => return Ok(out.freeze()),
                Err(_) => return Err(StreamBreak::Unreadable),
            }
        }
    }
}

fn header<'a>(message: &'a Message, name: &str) -> Option<&'a str> {
    message
        .headers()
        .iter()
        .find(|h| h.name().as_str() == name)
        .and_then(|h| match h.value() {
            HeaderValue::String(s) => Some(s.as_str()),
            _ => None,
        })
}

fn write_event(message: &Message, out: &mut BytesMut) {
    let payload = message.payload();
    match header(message, ":message-type") {
        Some("event") => {
            let name = header(message, ":event-type").unwrap_or("message");
            out.put_slice(b"event: ");
            out.put_slice(name.as_bytes());
            out.put_slice(b"\n");
            if payload.is_empty() {
                out.put_slice(b"data: {}\n");
            }
            // A payload's line breaks (JSON whitespace) become data lines, which the
            // reader joins back with line breaks.
            for line in payload.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                out.put_slice(b"data: ");
                out.put_slice(line);
                out.put_slice(b"\n");
            }
            out.put_slice(b"\n");
        }
        kind => {
            let kind = header(message, ":exception-type")
                .or_else(|| header(message, ":error-code"))
                .unwrap_or(if kind == Some("error") {
                    "error"
                } else {
                    "exception"
                });
            let said: Value = serde_json::from_slice(payload).unwrap_or_default();
            let text = said
                .get("message")
                .or_else(|| said.get("Message"))
                .and_then(Value::as_str)
                .or_else(|| header(message, ":error-message"))
                .unwrap_or("no message");
            let error = json!({"error": {"type": kind, "message": text}});
            out.put_slice(b"event: error\ndata: ");
            out.put_slice(error.to_string().as_bytes());
            out.put_slice(b"\n\n");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::formats::sse;
    use cloud_mock::provider::bedrock::{event_message, exception_message};

    #[test]
    fn messages_split_anywhere_become_whole_events() {
        let mut bytes = event_message("messageStart", &json!({"role": "assistant"})).to_vec();
        bytes.extend_from_slice(&event_message(
            "contentBlockDelta",
            &json!({"delta": {"text": "hi\nthere"}, "contentBlockIndex": 0}),
        ));
        bytes.extend_from_slice(&exception_message("throttlingException", "slow down"));
        let mut converter = EventStreamToSse::default();
        let mut sse_text = Vec::new();
        for byte in &bytes {
            sse_text.extend_from_slice(&converter.push(std::slice::from_ref(byte)).unwrap());
        }
        let events: Vec<sse::Event> = sse::events(&sse_text).collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].name.as_deref(), Some("messageStart"));
        assert_eq!(events[0].data, br#"{"role":"assistant"}"#);
        let delta: Value = serde_json::from_slice(&events[1].data).unwrap();
        assert_eq!(delta["delta"]["text"], "hi\nthere");
        assert_eq!(sse::error_message(&events[2]).as_deref(), Some("slow down"));
        assert!(String::from_utf8_lossy(&events[2].data).contains("throttlingException"));
    }

    #[test]
    fn a_corrupt_frame_breaks_the_stream() {
        let mut bytes = event_message("messageStart", &json!({"role": "assistant"})).to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff; // the message checksum
        let mut converter = EventStreamToSse::default();
        assert_eq!(converter.push(&bytes), Err(StreamBreak::Unreadable));
    }
}
