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

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::state::Call;
use crate::failure::{Envelope, ProxyError, stream_error_event};
use crate::formats::chat::{Conversion, StreamTranslator};
use crate::formats::endpoint::Endpoint;
use crate::formats::sse::{self, EventFilter, Filtered, StreamBreak};
use crate::observe::metrics::Metrics;
use crate::observe::record::Record;
use crate::observe::usage::{Pending, StreamTap};
use crate::policy::guardrails::StreamGuard;
use crate::resources::Guardrail;

/// The filter of one streamed answer (see the module documentation).
pub(super) struct AnswerStream {
    translator: Option<StreamTranslator>,
    tap: StreamTap,
    strip_usage: bool,
    guard: Option<StreamGuard>,
    endpoint: Endpoint,
    record: Record,
    metrics: Arc<Metrics>,
    served_by: Arc<str>,
    /// What the last run sent ended with.
    last: Last,
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
        if let Some(guard) = &mut self.guard {
            let checked = guard.check(run);
            let Filtered::Send(run) = checked else {
                self.record.late_error("content_filter");
                return checked;
            };
            return self.sent(run, broke);
        }
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
                let broke = broke.unwrap_or(StreamBreak::Truncated);
                Filtered::Abort(self.error_event(broke))
            }
        }
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
        output: Vec<Arc<Guardrail>>,
        strip_usage: bool,
        served_by: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let guard = (!output.is_empty())
            .then(|| StreamGuard::new(output, call.request_id.clone(), call.endpoint.envelope()));
        Self {
            translator: conversion.stream(),
            tap: usage.tap(),
            strip_usage,
            guard,
            endpoint: call.endpoint,
            record: call.record.clone(),
            metrics,
            served_by,
            last: Last::Other,
        }
    }

    /// What goes out of a run: `run`, then the error event of a break found in it.
    fn sent(&mut self, run: Bytes, broke: Option<StreamBreak>) -> Filtered {
        if let Some(broke) = broke {
            let mut out = BytesMut::from(run);
            out.extend_from_slice(&self.error_event(broke));
            return Filtered::Abort(out.freeze());
        }
        if !run.is_empty() {
            self.last = self.last_of(&run);
        }
        Filtered::Send(run)
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
