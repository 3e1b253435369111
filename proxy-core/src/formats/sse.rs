//! Server-sent events on their way to the caller: re-chunked on event boundaries so
//! filters see whole events (a partial event waits for the rest of it).

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, stream};

/// What a filter makes of a run of complete events.
pub enum Filtered {
    /// Send this (possibly nothing) and go on.
    Send(Bytes),
    /// Send this and end the stream.
    End(Bytes),
}

/// Passes `body` through `filter` one run of complete events at a time; an event left
/// without its blank line when the upstream ends goes through `filter` last.
pub fn filter_events<F>(body: Body, filter: F) -> Body
where
    F: FnMut(Bytes) -> Filtered + Send + 'static,
{
    let state = (body.into_data_stream(), BytesMut::new(), filter, false);
    let chunks = stream::unfold(
        state,
        |(mut inner, mut partial, mut filter, done)| async move {
            if done {
                return None;
            }
            loop {
                match inner.next().await {
                    Some(Ok(chunk)) => {
                        partial.extend_from_slice(&chunk);
                        let Some(end) = last_event_end(&partial) else {
                            continue;
                        };
                        match filter(partial.split_to(end).freeze()) {
                            Filtered::Send(out) if out.is_empty() => {}
                            Filtered::Send(out) => {
                                return Some((Ok(out), (inner, partial, filter, false)));
                            }
                            Filtered::End(out) => {
                                return Some((Ok(out), (inner, partial, filter, true)));
                            }
                        }
                    }
                    Some(Err(e)) => return Some((Err(e), (inner, partial, filter, true))),
                    None => {
                        let rest = partial.split().freeze();
                        if rest.is_empty() {
                            return None;
                        }
                        let (Filtered::Send(out) | Filtered::End(out)) = filter(rest);
                        return (!out.is_empty())
                            .then_some((Ok(out), (inner, partial, filter, true)));
                    }
                }
            }
        },
    );
    Body::from_stream(chunks)
}

/// The end of the last complete event (after its blank line).
fn last_event_end(buffer: &[u8]) -> Option<usize> {
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
