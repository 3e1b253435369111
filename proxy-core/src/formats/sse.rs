//! Server-sent events on their way to the caller: re-chunked on event boundaries so
//! filters see whole events (a partial event waits for the rest of it), and ended the
//! way the filter says: cleanly, aborted after an error event (`StreamBreak` names why
//! an upstream stream broke), or continued on another upstream body.

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, stream};

/// What a filter makes of a run of complete events.
pub enum Filtered {
    /// Send this (possibly nothing) and go on.
    Send(Bytes),
    /// Send this and end the stream: the answer ended as it should.
    End(Bytes),
    /// Send this (an error event) and abort the response, so the caller's client sees
    /// a broken stream: HTTP/1.1 gets no terminating chunk, HTTP/2 a reset.
    Abort(Bytes),
    /// Send this, then go on with the body [`EventFilter::resume`] finds.
    Resume(Bytes),
}

/// Why a stream ended before its answer did.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamBreak {
    #[error("the upstream provider's stream broke off before the answer ended")]
    Cut,
    #[error("the upstream provider's stream stalled: nothing arrived for {millis} ms")]
    Stalled { millis: u128 },
    #[error("the upstream provider ended its stream before the answer ended")]
    Truncated,
    #[error("the upstream provider sent a stream event that cannot be read")]
    Unreadable,
    #[error("the upstream provider reported an error mid-stream: {0}")]
    Upstream(String),
}

impl StreamBreak {
    /// The `code` of the caller's error event, the usage event's `finish_reason`.
    pub fn code(&self) -> &'static str {
        match self {
            StreamBreak::Cut => "stream_cut",
            StreamBreak::Stalled { .. } => "stream_stalled",
            StreamBreak::Truncated => "stream_truncated",
            StreamBreak::Unreadable => "stream_unreadable",
            StreamBreak::Upstream(_) => "upstream_stream_error",
        }
    }

    /// The usage event's `finish_reason` of an answer that was continued elsewhere
    /// after this break.
    pub fn resumed_code(&self) -> &'static str {
        match self {
            StreamBreak::Cut => "stream_cut_resumed",
            StreamBreak::Stalled { .. } => "stream_stalled_resumed",
            StreamBreak::Truncated => "stream_truncated_resumed",
            StreamBreak::Unreadable => "stream_unreadable_resumed",
            StreamBreak::Upstream(_) => "upstream_stream_error_resumed",
        }
    }

    /// The break an upstream body error stands for: the relay's own (inside however
    /// many body wrappers), or a cut.
    fn of(error: axum::Error) -> Self {
        let mut inner = error.into_inner();
        loop {
            inner = match inner.downcast::<StreamBreak>() {
                Ok(broke) => return *broke,
                Err(other) => other,
            };
            inner = match inner.downcast::<axum::Error>() {
                Ok(wrapped) => wrapped.into_inner(),
                Err(_) => return StreamBreak::Cut,
            };
        }
    }
}

/// Rewrites a stream run by run and says how it ends.
pub trait EventFilter: Send + 'static {
    /// What a resume hands back to the filter (see [`EventFilter::resumed`]).
    type Resumed: Send + 'static;

    /// A run of complete events.
    fn events(&mut self, run: Bytes) -> Filtered;

    /// The upstream is done: it ended its body (`None`) or broke. What is sent last
    /// and whether the response ends or aborts; `Send` counts as `End`.
    fn finish(&mut self, broke: Option<StreamBreak>) -> Filtered;

    /// After [`Filtered::Resume`]: another upstream body to go on with, if one can be
    /// had.
    fn resume(&mut self) -> BoxFuture<'static, Option<(Body, Self::Resumed)>> {
        Box::pin(async { None })
    }

    /// The resume found a body (`Some`) or not: what to send now (without a body, the
    /// stream ends: `Abort` with an error event).
    fn resumed(&mut self, _resumed: Option<Self::Resumed>) -> Filtered {
        Filtered::Abort(Bytes::new())
    }
}

/// A filter of runs only: a clean end stays clean, a break aborts without an event.
struct Runs<F>(F);

impl<F: FnMut(Bytes) -> Filtered + Send + 'static> EventFilter for Runs<F> {
    type Resumed = ();

    fn events(&mut self, run: Bytes) -> Filtered {
        (self.0)(run)
    }

    fn finish(&mut self, broke: Option<StreamBreak>) -> Filtered {
        match broke {
            None => Filtered::End(Bytes::new()),
            Some(_) => Filtered::Abort(Bytes::new()),
        }
    }
}

/// Passes `body` through `filter` one run of complete events at a time; an event left
/// without its blank line when the upstream ends goes through `filter` last.
pub fn filter_events<F>(body: Body, filter: F) -> Body
where
    F: FnMut(Bytes) -> Filtered + Send + 'static,
{
    filter_stream(body, Runs(filter))
}

/// Like [`filter_events`], with a filter that also decides how the stream ends and
/// may continue it on another upstream body.
pub fn filter_stream<F: EventFilter>(body: Body, filter: F) -> Body {
    filter_stream_kept_alive(body, filter, None)
}

/// What a quiet stream sends every `keepalive`: a comment, which event readers skip,
/// so proxies and load balancers between the gateway and the caller keep the
/// connection (AISIX's `downstream.sse_keepalive_interval_secs`).
pub const KEEPALIVE: &[u8] = b": keep-alive\n\n";

/// [`filter_stream`], sending [`KEEPALIVE`] whenever nothing came for `keepalive`.
pub fn filter_stream_kept_alive<F: EventFilter>(
    body: Body,
    filter: F,
    keepalive: Option<std::time::Duration>,
) -> Body {
    let filtering = Filtering {
        inner: body.into_data_stream(),
        partial: BytesMut::new(),
        filter,
        stage: Stage::Running,
        keepalive,
    };
    Body::from_stream(stream::unfold(filtering, |mut f| async move {
        let item = f.next().await?;
        Some((item, f))
    }))
}

/// How far a filtered stream has got.
#[derive(Clone, Copy)]
enum Stage {
    Running,
    /// Waiting for the body that continues the stream.
    Resuming,
    /// Send nothing more; abort first when `true`.
    Ending {
        abort: bool,
    },
    Done,
}

/// The aborted response's error: what hyper sees instead of the stream's end.
#[derive(Debug, thiserror::Error)]
#[error("stream aborted")]
struct Aborted;

struct Filtering<F> {
    inner: axum::body::BodyDataStream,
    partial: BytesMut,
    filter: F,
    stage: Stage,
    keepalive: Option<std::time::Duration>,
}

impl<F: EventFilter> Filtering<F> {
    /// The next chunk for the caller, the abort, or the end.
    async fn next(&mut self) -> Option<Result<Bytes, axum::Error>> {
        loop {
            let filtered = match self.stage {
                Stage::Running => self.step().await,
                Stage::Resuming => {
                    let resumed = self.filter.resume().await;
                    let resumed = resumed.map(|(body, resumed)| {
                        self.inner = body.into_data_stream();
                        self.partial.clear();
                        resumed
                    });
                    self.filter.resumed(resumed)
                }
                Stage::Ending { abort: true } => {
                    self.stage = Stage::Done;
                    // Let the connection flush what was sent before the abort, which
                    // discards what is still buffered.
                    tokio::task::yield_now().await;
                    return Some(Err(axum::Error::new(Aborted)));
                }
                Stage::Ending { abort: false } | Stage::Done => return None,
            };
            let out = match filtered {
                Filtered::Send(out) => {
                    self.stage = Stage::Running;
                    out
                }
                Filtered::End(out) => {
                    self.stage = Stage::Ending { abort: false };
                    out
                }
                Filtered::Abort(out) => {
                    self.stage = Stage::Ending { abort: true };
                    out
                }
                Filtered::Resume(out) => {
                    self.stage = Stage::Resuming;
                    out
                }
            };
            if !out.is_empty() {
                return Some(Ok(out));
            }
        }
    }

    /// Reads the upstream until the filter has something to say (or, quiet for the
    /// keep-alive interval, sends a comment).
    async fn step(&mut self) -> Filtered {
        loop {
            let next = match self.keepalive {
                Some(every) => match tokio::time::timeout(every, self.inner.next()).await {
                    Ok(next) => next,
                    Err(_) => return Filtered::Send(Bytes::from_static(KEEPALIVE)),
                },
                None => self.inner.next().await,
            };
            match next {
                Some(Ok(chunk)) => {
                    self.partial.extend_from_slice(&chunk);
                    if let Some(end) = last_event_end(&self.partial) {
                        return self.filter.events(self.partial.split_to(end).freeze());
                    }
                }
                Some(Err(e)) => return self.last(Some(StreamBreak::of(e))),
                None => return self.last(None),
            }
        }
    }

    /// The upstream is done: an event left without its blank line goes through the
    /// filter first, then the filter says how the stream ends (a `Send` ends it).
    fn last(&mut self, broke: Option<StreamBreak>) -> Filtered {
        let rest = self.partial.split().freeze();
        let mut out = BytesMut::new();
        if !rest.is_empty() {
            match self.filter.events(rest) {
                Filtered::Send(sent) => out.extend_from_slice(&sent),
                ended => return ended,
            }
        }
        let (sent, end): (Bytes, fn(Bytes) -> Filtered) = match self.filter.finish(broke) {
            Filtered::Send(sent) | Filtered::End(sent) => (sent, Filtered::End),
            Filtered::Abort(sent) => (sent, Filtered::Abort),
            Filtered::Resume(sent) => (sent, Filtered::Resume),
        };
        out.extend_from_slice(&sent);
        end(out.freeze())
    }
}

/// The end of the last complete event (after its blank line).
pub fn last_event_end(buffer: &[u8]) -> Option<usize> {
    let lf = buffer.windows(2).rposition(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buffer
        .windows(4)
        .rposition(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    lf.max(crlf)
}

/// The `data:` payloads of a run of events, in order.
pub fn data_lines(events: &[u8]) -> impl Iterator<Item = &[u8]> {
    events
        .split(|b| *b == b'\n')
        .filter_map(|line| line.trim_ascii().strip_prefix(b"data:"))
        .map(<[u8]>::trim_ascii)
}

/// One server-sent event: its `event:` name and its `data:` lines joined by newlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: Option<String>,
    pub data: Vec<u8>,
}

/// The events of a run (LF or CRLF line endings); events without data are skipped.
pub fn events(run: &[u8]) -> impl Iterator<Item = Event> + '_ {
    let mut lines = run
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    std::iter::from_fn(move || {
        let mut name = None;
        let mut data: Option<Vec<u8>> = None;
        for line in lines.by_ref() {
            if line.is_empty() {
                if data.is_some() {
                    break;
                }
                name = None;
                continue;
            }
            if let Some(value) = line.strip_prefix(b"data:") {
                let value = value.strip_prefix(b" ").unwrap_or(value);
                let buffer = data.get_or_insert_with(Vec::new);
                if !buffer.is_empty() {
                    buffer.push(b'\n');
                }
                buffer.extend_from_slice(value);
            } else if let Some(value) = line.strip_prefix(b"event:") {
                let value = value.strip_prefix(b" ").unwrap_or(value);
                name = Some(String::from_utf8_lossy(value).into_owned());
            }
        }
        data.map(|data| Event { name, data })
    })
}

/// The message of an error event: Anthropic's `event: error`, or a `data:` object
/// with an `error` member (OpenAI and compatible providers).
pub fn error_message(event: &Event) -> Option<String> {
    let named = event.name.as_deref() == Some("error");
    if !named && !mentions(&event.data, b"\"error\"") {
        return None;
    }
    let data = serde_json::from_slice::<serde_json::Value>(&event.data).ok();
    let error = data.as_ref().and_then(|d| d.get("error"));
    if !named && !error.is_some_and(serde_json::Value::is_object) {
        return None;
    }
    let message = error
        .and_then(|e| e.get("message"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("no message");
    Some(message.chars().take(500).collect())
}

/// Whether `needle` occurs in `haystack` (a cheap test before parsing JSON).
pub fn mentions(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Drops OpenAI's usage-only chunk (`"choices": []` with a `usage` object) from a run
/// of events: the chunk the gateway asked for on a caller's behalf.
pub fn without_usage_chunk(events: Bytes) -> Bytes {
    if !mentions(&events, b"\"usage\"") {
        return events;
    }
    let mut out = BytesMut::with_capacity(events.len());
    for event in split_events(&events) {
        let usage_only = data_lines(event).any(|data| {
            serde_json::from_slice::<serde_json::Value>(data).is_ok_and(|v| {
                v.get("usage").is_some_and(serde_json::Value::is_object)
                    && v.get("choices")
                        .and_then(serde_json::Value::as_array)
                        .is_some_and(Vec::is_empty)
            })
        });
        if !usage_only {
            out.extend_from_slice(event);
        }
    }
    out.freeze()
}

/// Each event with its terminating blank line.
fn split_events(events: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < events.len() {
        if events[i] == b'\n' && events[i + 1] == b'\n' {
            parts.push(&events[start..i + 2]);
            start = i + 2;
            i += 2;
        } else {
            i += 1;
        }
    }
    if start < events.len() {
        parts.push(&events[start..]);
    }
    parts
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn filters_see_whole_events_whatever_the_chunking() {
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"data: {\"a\":1}\n\nda")),
            Ok(Bytes::from_static(b"ta: {\"b\":2}\n")),
            Ok(Bytes::from_static(b"\ndata: tail")),
        ];
        let body = Body::from_stream(stream::iter(chunks));
        let mut seen = Vec::new();
        let filtered = filter_events(body, move |events| {
            seen.push(events.clone());
            assert!(events.ends_with(b"\n\n") || events == "data: tail");
            Filtered::Send(events)
        });
        let out = filtered.collect().await.unwrap().to_bytes();
        assert_eq!(
            &out[..],
            b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: tail"
        );
    }

    #[tokio::test]
    async fn end_stops_the_stream() {
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"data: 1\n\n")),
            Ok(Bytes::from_static(b"data: 2\n\n")),
        ];
        let body = Body::from_stream(stream::iter(chunks));
        let filtered = filter_events(body, |_| {
            Filtered::End(Bytes::from_static(b"data: bye\n\n"))
        });
        let out = filtered.collect().await.unwrap().to_bytes();
        assert_eq!(&out[..], b"data: bye\n\n");
    }

    #[test]
    fn events_are_parsed_with_names_and_multiline_data() {
        let run =
            b"event: a\r\ndata: 1\r\ndata: 2\r\n\r\n: comment\n\nevent: b\ndata:3\n\ndata: tail";
        let got: Vec<Event> = events(run).collect();
        assert_eq!(
            got,
            [
                Event {
                    name: Some("a".into()),
                    data: b"1\n2".to_vec()
                },
                Event {
                    name: Some("b".into()),
                    data: b"3".to_vec()
                },
                Event {
                    name: None,
                    data: b"tail".to_vec()
                },
            ]
        );
    }

    #[test]
    fn only_the_usage_only_chunk_is_dropped() {
        let events = Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\n",
        );
        assert_eq!(
            &without_usage_chunk(events)[..],
            b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: [DONE]\n\n"
        );
    }
}
