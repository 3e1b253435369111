//! Output rules on a server-sent-event stream, in the caller's format.
//!
//! Text deltas are held back and released in windows: once `window_size` characters
//! beyond the `window_overlap_size` tail are held, the held text is checked (masked,
//! or the stream blocked) and all but the tail is released in the current event's
//! delta; the tail is checked again with what follows, so a span split across events
//! or windows is still found. Any other event (a finish chunk, a block's end, `[DONE]`)
//! first releases everything held, in a delta event like the last one. With a rule in
//! `buffer_full` mode nothing is released until then. Other events' own text (a
//! responses stream's `response.completed`, tool-call arguments) is checked as it
//! passes.
//!
//! A block replaces the rest of the stream with an error event in the caller's format,
//! and the response is aborted after it (the caller's SDK raises).
//!
//! The guard wraps the body the stream filters made ([`guarded`]): it may wait for
//! a detector service between two runs of events.

use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;

use super::{Chain, Detectors, Stage, text};
use crate::failure::{Envelope, ProxyError, stream_error_event};
use crate::formats::sse::{self, Event};
use crate::observe::metrics::Metrics;
use crate::observe::record::Record;
use crate::resources::Guardrail;
use crate::resources::guardrail::StreamCheck;

pub struct StreamGuard {
    rules: Vec<Arc<Guardrail>>,
    request_id: Arc<str>,
    record: Record,
    metrics: Arc<Metrics>,
    detectors: Arc<Detectors>,
    envelope: Envelope,
    mode: StreamCheck,
    /// Text received and not yet released.
    held: String,
    /// The last delta event (its name, and its JSON with the text emptied): the shape
    /// of an event that releases held text.
    template: Option<(Option<String>, Value)>,
    /// Past `max_buffer_bytes` of a rule that fails open: text passes unchecked.
    unchecked: bool,
}

impl StreamGuard {
    /// The strictest mode of `rules`: `buffer_full` if any asks for it (the smallest
    /// buffer), else windows of the smallest size and the largest overlap.
    pub fn new(
        rules: Vec<Arc<Guardrail>>,
        request_id: Arc<str>,
        record: Record,
        metrics: Arc<Metrics>,
        detectors: Arc<Detectors>,
        envelope: Envelope,
    ) -> Self {
        let mode = rules.iter().map(|g| g.stream).reduce(StreamCheck::stricter);
        Self {
            rules,
            request_id,
            record,
            metrics,
            detectors,
            envelope,
            mode: mode.unwrap_or(StreamCheck::Window {
                size: crate::resources::guardrail::DEFAULT_WINDOW,
                overlap: crate::resources::guardrail::DEFAULT_OVERLAP,
            }),
            held: String::new(),
            template: None,
            unchecked: false,
        }
    }

    fn chain(&self) -> Chain<'_> {
        Chain {
            rules: &self.rules,
            stage: Stage::Output,
            request_id: &self.request_id,
            record: &self.record,
            metrics: &self.metrics,
            detectors: &self.detectors,
        }
    }

    /// Checks a run of complete events: what may be released now, or (`Err`) the
    /// error event that ends the stream.
    pub async fn check(&mut self, run: Bytes) -> Result<Bytes, Bytes> {
        if !sse::mentions(&run, b"data:") {
            // A keep-alive comment.
            return Ok(run);
        }
        let mut out = Vec::with_capacity(run.len() + 64);
        for event in sse::events(&run) {
            if let Err(e) = self.event(event, &mut out).await {
                self.held.clear();
                self.record.late_error("content_filter");
                return Err(stream_error_event(&e, self.envelope));
            }
        }
        Ok(Bytes::from(out))
    }

    async fn event(&mut self, event: Event, out: &mut Vec<u8>) -> Result<(), ProxyError> {
        let Ok(mut value) = serde_json::from_slice::<Value>(&event.data) else {
            // `[DONE]` and the like: whatever is held goes first.
            self.flush(out).await?;
            write(out, event.name.as_deref(), &event.data);
            return Ok(());
        };
        if self.unchecked {
            write(out, event.name.as_deref(), &event.data);
            return Ok(());
        }
        if let Some(delta) = text::delta_text(&mut value) {
            let piece = std::mem::take(delta);
            self.held.push_str(&piece);
            let template = value.clone();
            // A delta that also finishes its choice (completions' last chunk) takes
            // everything held: no text may follow the finish.
            let finishes = value
                .pointer("/choices/0/finish_reason")
                .is_some_and(|f| !f.is_null());
            let release = self.release(finishes).await?;
            if let Some(delta) = text::delta_text(&mut value) {
                *delta = release;
            }
            write(out, event.name.as_deref(), value.to_string().as_bytes());
            self.template = Some((event.name, template));
            return Ok(());
        }
        self.flush(out).await?;
        let mut strings = Vec::new();
        text::answer_strings(&mut value, &mut strings);
        let changed = self.chain().run(&mut strings).await?;
        if changed.is_empty() {
            write(out, event.name.as_deref(), &event.data);
        } else {
            write(out, event.name.as_deref(), value.to_string().as_bytes());
        }
        Ok(())
    }

    /// Checks what is held and returns what may be sent: everything when `all`, else
    /// (windows) all but the overlap once a window is full, or nothing.
    async fn release(&mut self, all: bool) -> Result<String, ProxyError> {
        match self.mode {
            StreamCheck::Window { size, overlap } => {
                if !all && self.held.len() < size + overlap {
                    return Ok(String::new());
                }
                self.check_held().await?;
                let keep = if all { 0 } else { overlap };
                let mut cut = self.held.len().saturating_sub(keep);
                while !self.held.is_char_boundary(cut) {
                    cut -= 1;
                }
                let tail = self.held.split_off(cut);
                Ok(std::mem::replace(&mut self.held, tail))
            }
            StreamCheck::BufferFull {
                max_bytes,
                fail_open,
            } => {
                if self.held.len() > max_bytes {
                    if !fail_open {
                        return Err(ProxyError::ContentFiltered {
                            guardrail: self
                                .rules
                                .first()
                                .map(|g| g.name.to_string())
                                .unwrap_or_default(),
                            stage: "output",
                            why: ": the answer outgrew the guardrail's max_buffer_bytes",
                        });
                    }
                    self.unchecked = true;
                    for g in &self.rules {
                        self.metrics
                            .record_guardrail_bypass(&g.name, "output", g.kind());
                        self.record.guardrail(crate::hooks::GuardrailVerdict {
                            guardrail: g.name.to_string(),
                            kind: g.kind().to_owned(),
                            hook: "output".into(),
                            outcome: "bypassed".into(),
                            found: Vec::new(),
                            reason: Some("the answer outgrew max_buffer_bytes".into()),
                        });
                    }
                    return Ok(std::mem::take(&mut self.held));
                }
                if !all {
                    return Ok(String::new());
                }
                self.check_held().await?;
                Ok(std::mem::take(&mut self.held))
            }
        }
    }

    async fn check_held(&mut self) -> Result<(), ProxyError> {
        let mut held = std::mem::take(&mut self.held);
        let checked = self.chain().run(&mut [&mut held]).await;
        self.held = held;
        checked.map(drop)
    }

    /// Releases everything held, in an event shaped like the last delta.
    async fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), ProxyError> {
        if self.held.is_empty() {
            return Ok(());
        }
        let release = self.release(true).await?;
        if let Some((name, template)) = &self.template {
            let mut event = template.clone();
            if let Some(delta) = text::delta_text(&mut event) {
                *delta = release;
            }
            write(out, name.as_deref(), event.to_string().as_bytes());
        }
        Ok(())
    }
}

fn write(out: &mut Vec<u8>, name: Option<&str>, data: &[u8]) {
    if let Some(name) = name {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
}

/// `body` (a stream of whole event runs) through `guard`. After an error event the
/// response is aborted: HTTP/1.1 gets no terminating chunk, HTTP/2 a reset.
pub fn guarded(body: Body, guard: StreamGuard) -> Body {
    enum State {
        Running,
        Abort,
        Done,
    }
    let start = (body.into_data_stream(), guard, State::Running);
    Body::from_stream(futures_util::stream::unfold(
        start,
        |(mut inner, mut guard, state)| async move {
            match state {
                State::Done => return None,
                State::Abort => {
                    // Let the connection flush the error event first.
                    tokio::task::yield_now().await;
                    let error = axum::Error::new(std::io::Error::other("blocked by a guardrail"));
                    return Some((Err(error), (inner, guard, State::Done)));
                }
                State::Running => {}
            }
            loop {
                match inner.next().await {
                    None => return None,
                    Some(Err(e)) => return Some((Err(e), (inner, guard, State::Done))),
                    Some(Ok(run)) => match guard.check(run).await {
                        Ok(out) if out.is_empty() => {}
                        Ok(out) => return Some((Ok(out), (inner, guard, State::Running))),
                        Err(event) => return Some((Ok(event), (inner, guard, State::Abort))),
                    },
                }
            }
        },
    ))
}
