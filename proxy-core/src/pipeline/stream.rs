//! A streamed answer on its way to the caller, and how it ends.
//!
//! Each run of complete events is translated to the caller's format, observed for
//! usage, stripped of the usage chunk the caller did not ask for and checked by the
//! output guardrails. The stream ends well only after the caller's closing event went
//! out (`[DONE]`, `message_stop`, `response.completed`). Anything else (an upstream cut,
//! a stall past `stream_timeout`, an end before the closing event, an unreadable event,
//! an upstream error event) ends it with an error event in the caller's format and
//! aborts the response, so the caller's SDK raises instead of taking a truncated answer
//! for a whole one. The gateway never writes a closing event the upstream did not send.
//! A routing model with `resume_streams` continues a broken text answer on its next
//! target instead (`resume.rs`).

use std::sync::Arc;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use tracing::warn;

use super::resume::{Continuation, Resume};
use super::state::Call;
use crate::failure::{Envelope, ProxyError, stream_error_event};
use crate::formats::chat::{self, Conversion, StreamTranslator};
use crate::formats::endpoint::Endpoint;
use crate::formats::sse::{self, EventFilter, Filtered, StreamBreak};
use crate::observe::metrics::Metrics;
use crate::observe::record::Record;
use crate::observe::usage::{Pending, StreamTap};

/// The filter of one streamed answer (see the module documentation).
pub(super) struct AnswerStream {
    translator: Option<StreamTranslator>,
    tap: StreamTap,
    strip_usage: bool,
    endpoint: Endpoint,
    record: Record,
    metrics: Arc<Metrics>,
    served_by: Arc<str>,
    /// What the last run sent ended with.
    last: Last,
    /// How to continue the answer elsewhere when it breaks (resumable streams).
    resume: Option<Resume>,
    /// The break being resumed from.
    resuming: Option<StreamBreak>,
    conversion: Conversion,
}

/// The last event sent to the caller, as far as the end of the stream cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Last {
    Other,
    /// The caller format's closing event: the answer is complete.
    Closing,
    /// An error event the upstream sent (relayed as it is on a native stream).
    Error,
}

impl EventFilter for AnswerStream {
    type Resumed = Continuation;

    fn events(&mut self, run: Bytes) -> Filtered {
        // Usage is read in the upstream's format, which may say more (cache writes).
        self.tap.observe(&run);
        let (run, broke) = match &mut self.translator {
            Some(translator) => translator.translate(&run),
            None => (run, None),
        };
        let run = if self.strip_usage {
            sse::without_usage_chunk(run)
        } else {
            run
        };
        self.sent(run, broke)
    }

    fn finish(&mut self, broke: Option<StreamBreak>) -> Filtered {
        match (self.last, broke) {
            // Whatever happens after the closing event, the answer was whole.
            (Last::Closing, _) => Filtered::End(Bytes::new()),
            // The caller has its error event already.
            (Last::Error, _) => {
                self.broke(&StreamBreak::Upstream(String::new()));
                Filtered::Abort(Bytes::new())
            }
            // A route without a closing event ends when its upstream ends.
            (Last::Other, None) if self.endpoint.closing_events().is_none() => {
                Filtered::End(Bytes::new())
            }
            (Last::Other, broke) => {
                self.broken(Bytes::new(), broke.unwrap_or(StreamBreak::Truncated))
            }
        }
    }

    fn resume(&mut self) -> BoxFuture<'static, Option<(Body, Continuation)>> {
        let text = self
            .translator
            .as_ref()
            .and_then(StreamTranslator::continuable);
        match (&self.resume, text) {
            (Some(resume), Some(text)) => resume.find(text),
            _ => Box::pin(async { None }),
        }
    }

    fn resumed(&mut self, continuation: Option<Continuation>) -> Filtered {
        let broke = self.resuming.take().unwrap_or(StreamBreak::Cut);
        let (Some(continuation), Some(translator), Some(resume)) =
            (continuation, &mut self.translator, &mut self.resume)
        else {
            return Filtered::Abort(self.error_event(broke));
        };
        warn!(request_id = %resume.record.request_id(), from = %self.served_by, to = %continuation.served_by, reason = broke.code(), "stream broke; continued on the next target");
        translator.continue_with(continuation.upstream, continuation.sent);
        resume.tried.push(continuation.served_by.clone());
        self.served_by = continuation.served_by;
        self.tap.resumed(broke.resumed_code());
        self.last = Last::Other;
        Filtered::Send(Bytes::new())
    }
}

impl AnswerStream {
    /// The filter for `call`'s stream from `served_by`: translated by `conversion`,
    /// its usage settled by `usage`, checked by `output` guardrails, the usage chunk
    /// the caller did not ask for stripped when `strip_usage`.
    pub(super) fn new(
        call: &Call,
        conversion: Conversion,
        usage: Pending,
        strip_usage: bool,
        served_by: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            translator: conversion.stream(&served_by),
            tap: usage.tap(),
            strip_usage,
            endpoint: call.endpoint,
            record: call.record.clone(),
            metrics,
            served_by,
            last: Last::Other,
            resume: None,
            resuming: None,
            conversion,
        }
    }

    /// Makes the stream resumable. It then goes through the canonical form even
    /// between like formats, so another upstream's continuation can be spliced in.
    pub(super) fn resumable(mut self, resume: Resume) -> Self {
        let codecs = match self.conversion {
            Conversion::Translate { upstream, caller } => Some((caller, upstream)),
            Conversion::None => chat::native(self.endpoint),
            Conversion::Embeddings { .. } => None,
        };
        if let Some((caller, upstream)) = codecs {
            self.translator =
                Some(StreamTranslator::following(upstream, caller).naming(&self.served_by));
            self.resume = Some(resume);
        }
        self
    }

    /// What goes out of a run: `run`, then what a break found in it makes of the rest.
    fn sent(&mut self, run: Bytes, broke: Option<StreamBreak>) -> Filtered {
        if let Some(broke) = broke {
            return self.broken(run, broke);
        }
        if !run.is_empty() {
            self.last = self.last_of(&run);
        }
        Filtered::Send(run)
    }

    /// After `run`, the stream broke: it goes on elsewhere when it can (the break is
    /// recorded in the metrics and the next segment's usage begins), else it ends with
    /// the error event.
    fn broken(&mut self, run: Bytes, broke: StreamBreak) -> Filtered {
        let continuable = self
            .translator
            .as_ref()
            .and_then(StreamTranslator::continuable)
            .is_some();
        if self.resume.is_some() && continuable {
            self.metrics
                .record_upstream_failure(&self.served_by, "stream_break");
            self.tap.next_segment();
            self.resuming = Some(broke);
            return Filtered::Resume(run);
        }
        let mut out = BytesMut::from(run);
        out.extend_from_slice(&self.error_event(broke));
        Filtered::Abort(out.freeze())
    }

    /// The error event of a break, once it is recorded.
    fn error_event(&mut self, broke: StreamBreak) -> Bytes {
        self.broke(&broke);
        let envelope: Envelope = self.endpoint.envelope();
        stream_error_event(&ProxyError::StreamBroken(broke), envelope)
    }

    /// A break in the access log (`stream_error`), the metrics and the usage event.
    fn broke(&mut self, broke: &StreamBreak) {
        self.record.late_error("stream_error");
        self.metrics
            .record_upstream_failure(&self.served_by, "stream_break");
        self.tap.broke(broke.code());
    }

    fn last_of(&self, run: &[u8]) -> Last {
        let head = last_event_head(run);
        if self
            .endpoint
            .closing_events()
            .is_some_and(|names| names.iter().any(|name| sse::mentions(head, name)))
        {
            Last::Closing
        } else if head.starts_with(b"event: error") || head.starts_with(b"data: {\"error\"") {
            Last::Error
        } else {
            Last::Other
        }
    }
}

/// The first bytes of the last event of a run (its name and the start of its data).
fn last_event_head(run: &[u8]) -> &[u8] {
    let body = run.trim_ascii_end();
    let start = body
        .windows(2)
        .rposition(|w| w == b"\n\n")
        .map(|at| at + 2)
        .max(
            body.windows(3)
                .rposition(|w| w == b"\n\r\n")
                .map(|at| at + 3),
        )
        .unwrap_or(0);
    let head = &body[start..];
    &head[..head.len().min(96)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_event_head_is_found_with_either_line_ending() {
        let run = b"data: {\"a\":1}\n\ndata: [DONE]\n\n";
        assert_eq!(last_event_head(run), b"data: [DONE]");
        let crlf = b"event: x\r\ndata: 1\r\n\r\nevent: message_stop\r\ndata: {}\r\n\r\n";
        assert!(last_event_head(crlf).starts_with(b"event: message_stop"));
        assert_eq!(last_event_head(b"data: only\n\n"), b"data: only");
    }
}
