//! Usage accounting: when a dispatched request completes (for streams: when the stream
//! ends, also when the caller goes away) its tokens are charged to the rate-limit lease,
//! noted in the request's record and, when a sink wants one, reported as a
//! [`UsageEvent`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::formats::sse;
use crate::formats::tokens::{self, Answered, Read, Tokens};
use crate::hooks::{UsageEvent, UsageSink};
use crate::observe::record::Record;
use crate::policy::ratelimit::Lease;
use crate::resources::Cost;

/// The outcome of a call waiting for its tokens: the usage event (when a sink wants
/// one), the rate-limit token charge, and the request's record.
pub struct Pending {
    /// The sink and the event for it; `None` without a sink (nothing is built).
    report: Option<(Arc<dyn UsageSink>, UsageEvent)>,
    /// The request's facts for the access log and metrics: given the tokens too.
    record: Record,
    /// Rate-limit lease: charged the tokens, and its concurrency slots freed, at the end.
    lease: Option<Lease>,
    cost: Option<Cost>,
    started: Instant,
    /// Why a stream broke, when it did (the usage event's `finish_reason`).
    broke: Option<&'static str>,
}

impl Pending {
    /// The event carries everything but tokens, cost, latency and `ttft_ms`.
    pub fn new(
        report: Option<(Arc<dyn UsageSink>, UsageEvent)>,
        lease: Option<Lease>,
        record: Record,
        cost: Option<Cost>,
        started: Instant,
    ) -> Self {
        Self {
            report,
            record,
            lease,
            cost,
            started,
            broke: None,
        }
    }

    /// Notes what `document` (the answer, or one of a stream's events) says of the
    /// model and the finish reasons, for a traced request's span.
    pub fn answered(&self, document: &[u8]) {
        if self.record.trace().is_some() {
            let answered = Answered::from_json(document);
            self.record.answer(answered.model, answered.finish_reasons);
        }
    }

    /// Finishes with a whole answer (`document`): its usage and, for a traced request,
    /// its model and finish reasons, read in one pass.
    /// `read` is what the answer says when it was read already ([`tokens::read`]).
    pub fn finish_answer(self, document: &[u8], read: Option<Read>) {
        let traced = self.record.trace().is_some();
        let read = read
            .filter(|read| !traced || read.answered.is_some())
            .unwrap_or_else(|| tokens::read(document, traced).unwrap_or_default());
        if let Some(answered) = read.answered {
            self.record.answer(answered.model, answered.finish_reasons);
        }
        self.finish(read.tokens.unwrap_or_default(), None);
    }

    pub fn finish(self, tokens: Tokens, ttft: Option<Duration>) {
        let Pending {
            report,
            record,
            lease,
            cost,
            started,
            broke,
        } = self;
        if let Some(lease) = lease {
            lease.charge_tokens(
                tokens.prompt + tokens.completion,
                crate::policy::ratelimit::unix_ms(),
            );
        }
        record.usage(tokens, ttft);
        let Some((sink, mut event)) = report else {
            return;
        };
        event.prompt_tokens = tokens.prompt;
        event.completion_tokens = tokens.completion;
        event.cache_read_tokens = tokens.cache_read;
        event.cache_write_tokens = tokens.cache_write;
        event.cost_usd = tokens.cost(cost.as_ref());
        event.latency_ms = millis(started.elapsed());
        event.ttft_ms = ttft.map(millis);
        event.finish_reason = broke.map(str::to_owned);
        event.guardrails = record.guardrails();
        sink.record(event);
    }

    /// Watches a server-sent-event stream for `usage`; records the event when dropped,
    /// that is when the stream ended or the caller went away.
    pub fn tap(self) -> StreamTap {
        StreamTap {
            pending: Some(self),
            before: Tokens::default(),
            tokens: Tokens::default(),
            first_event: None,
            deltas: 0,
        }
    }
}

/// Reads usage from the complete events of a stream, as
/// [`crate::formats::sse::filter_events`] hands them over.
pub struct StreamTap {
    pending: Option<Pending>,
    /// The tokens of the upstreams before the current one (a resumed stream).
    before: Tokens,
    tokens: Tokens,
    first_event: Option<Duration>,
    /// Content deltas seen: the completion tokens of a stream that broke before the
    /// upstream counted them (providers stream about one token per delta).
    deltas: u64,
}

impl StreamTap {
    pub fn observe(&mut self, events: &[u8]) {
        if self.first_event.is_none()
            && let Some(p) = &self.pending
        {
            self.first_event = Some(p.started.elapsed());
        }
        let traced = self.pending.as_ref().filter(|p| p.record.trace().is_some());
        for data in sse::data_lines(events) {
            if sse::mentions(data, b"delta") {
                self.deltas += 1;
            }
            if let Some(pending) = traced
                && (sse::mentions(data, b"eason") || sse::mentions(data, b"\"model"))
            {
                pending.answered(data);
            }
            // `"usage"`, and Gemini's `"usageMetadata"`.
            if !sse::mentions(data, b"\"usage") {
                continue;
            }
            if let Some(tokens) = Tokens::from_json(data) {
                // OpenAI sends usage once; Anthropic sends input tokens first and output
                // tokens at the end: keep the largest of each.
                self.tokens.prompt = self.tokens.prompt.max(tokens.prompt);
                self.tokens.completion = self.tokens.completion.max(tokens.completion);
                self.tokens.cache_read = self.tokens.cache_read.max(tokens.cache_read);
                self.tokens.cache_write = self.tokens.cache_write.max(tokens.cache_write);
            }
        }
    }
}

impl StreamTap {
    /// The stream broke (`code`): the usage event says so, and completion tokens the
    /// upstream had not counted yet are estimated from the deltas that did stream
    /// (Anthropic's first count is a placeholder of 1).
    pub fn broke(&mut self, code: &'static str) {
        if let Some(pending) = &mut self.pending {
            pending.broke = Some(code);
        }
        self.tokens.completion = self.tokens.completion.max(self.deltas);
    }

    /// The answer goes on on another upstream after a break: this upstream's tokens
    /// (estimated as in `broke`) are added up, and the next
    /// upstream's are read afresh.
    pub fn next_segment(&mut self) {
        self.tokens.completion = self.tokens.completion.max(self.deltas);
        self.before = self.before + std::mem::take(&mut self.tokens);
        self.deltas = 0;
    }

    /// The answer was continued elsewhere after a break (`code`): the usage event says
    /// so.
    pub fn resumed(&mut self, code: &'static str) {
        if let Some(pending) = &mut self.pending {
            pending.broke = Some(code);
        }
    }
}

impl Drop for StreamTap {
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.finish(self.before + self.tokens, self.first_event);
        }
    }
}

/// The most of a whole answer kept to read its usage from (passthrough); a larger
/// answer is relayed in full and counted without tokens.
pub const MAX_KEPT_ANSWER: usize = 1 << 20;

/// Reads usage from a JSON answer relayed chunk by chunk (passthrough): the chunks are
/// kept up to [`MAX_KEPT_ANSWER`] and read when the answer ends or the caller goes away.
/// An answer of no known format is counted with no tokens.
pub struct WholeTap {
    pending: Option<Pending>,
    /// `None` when the answer's usage cannot be read.
    kept: Option<Vec<u8>>,
}

impl WholeTap {
    pub fn json(pending: Pending) -> Self {
        Self {
            pending: Some(pending),
            kept: Some(Vec::new()),
        }
    }

    pub fn opaque(pending: Pending) -> Self {
        Self {
            pending: Some(pending),
            kept: None,
        }
    }

    pub fn observe(&mut self, chunk: &[u8]) {
        if let Some(kept) = &mut self.kept {
            if kept.len() + chunk.len() > MAX_KEPT_ANSWER {
                self.kept = None;
            } else {
                kept.extend_from_slice(chunk);
            }
        }
    }
}

impl Drop for WholeTap {
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            match self.kept.as_deref() {
                Some(kept) => pending.finish_answer(kept, None),
                None => pending.finish(Tokens::default(), None),
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, millis)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use std::sync::Mutex;

    use bytes::Bytes;
    use futures_util::StreamExt;
    use http_body_util::BodyExt;

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<UsageEvent>>);

    impl UsageSink for Recorder {
        fn record(&self, event: UsageEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    fn pending(sink: Arc<Recorder>) -> Pending {
        let event = UsageEvent {
            event_id: "e1".into(),
            request_id: "r1".into(),
            api_key_id: "k1".into(),
            model: "alias".into(),
            provider: "openai".into(),
            served_by: "direct".into(),
            prompt_tokens: 0,
            completion_tokens: 0,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            cost_usd: 0.0,
            status_code: 200,
            stream: true,
            latency_ms: 0,
            ttft_ms: None,
            timestamp_unix_ms: 1,
            finish_reason: None,
            guardrails: Vec::new(),
        };
        let cost = Cost {
            input_per_1k: 1.0,
            output_per_1k: 2.0,
        };
        Pending::new(
            Some((sink, event)),
            None,
            Record::new("test".into(), None),
            Some(cost),
            Instant::now(),
        )
    }

    /// A stream of `chunks` whose events `tap` observes, wired as the proxy wires it.
    fn tapped(chunks: &[&'static [u8]], mut tap: StreamTap) -> axum::body::Body {
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect();
        let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
        sse::filter_events(body, move |events| {
            tap.observe(&events);
            sse::Filtered::Send(events)
        })
    }

    #[tokio::test]
    async fn a_stream_is_recorded_once_with_usage_split_across_chunks() {
        let sink = Arc::new(Recorder::default());
        let body = tapped(
            &[
                b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
                b"data: {\"choices\":[],\"usa",
                b"ge\":{\"prompt_tokens\":2000,\"completion_tokens\":1000}}\n\ndata: [DONE]\n\n",
            ],
            pending(sink.clone()).tap(),
        );
        let mut body = body.into_data_stream();
        let first = body.next().await.unwrap().unwrap();
        assert!(first.starts_with(b"data: "));
        assert!(sink.0.lock().unwrap().is_empty(), "recorded before the end");
        while body.next().await.is_some() {}
        drop(body);
        let events = sink.0.lock().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].prompt_tokens, 2000);
        assert_eq!(events[0].completion_tokens, 1000);
        assert!((events[0].cost_usd - 4.0).abs() < 1e-9);
        assert!(events[0].ttft_ms.is_some());
    }

    #[tokio::test]
    async fn a_stream_without_usage_or_without_a_final_newline_still_records() {
        let sink = Arc::new(Recorder::default());
        let body = tapped(
            &[b"data: {\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":1}}"],
            pending(sink.clone()).tap(),
        );
        body.collect().await.unwrap();
        let untouched = pending(sink.clone()).tap();
        drop(untouched);
        let events = sink.0.lock().unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].prompt_tokens, 7);
        assert_eq!(events[1].prompt_tokens, 0);
        assert_eq!(events[1].ttft_ms, None);
    }
}
