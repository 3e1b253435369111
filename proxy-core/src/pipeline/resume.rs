//! Resumable streams (`routing.resume_streams`): a chat or messages stream that breaks
//! after its first byte goes on on the next target of its routing model. The request
//! is sent again with the text the caller already has as the assistant's prefix, and
//! the continuation is spliced into the caller's stream by the same translator, so the
//! caller sees one answer: one id, one message, usage summed over the upstreams.
//!
//! Only text can be continued: a stream that broke inside a tool call or reasoning
//! ends broken. Each target is tried once per resume, in the plan's order, skipping
//! those that already served this answer.

use std::sync::Arc;

use axum::body::Body;
use axum::http::HeaderMap;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde_json::Value;
use tracing::warn;

use super::dispatch;
use super::state::ProxyState;
use crate::formats::body::RequestBody;
use crate::formats::chat::{self, Conversion, UpstreamCodec};
use crate::formats::endpoint::Endpoint;
use crate::observe::record::Record;
use crate::providers::CallerRequest;

/// What a resume needs of the call, owned (the stream outlives the handler).
pub(super) struct Resume {
    pub state: ProxyState,
    pub endpoint: Endpoint,
    pub headers: HeaderMap,
    /// The caller's body as it came.
    pub raw: Bytes,
    /// The routing model the caller asked for.
    pub alias: Arc<str>,
    /// The request's id and spans.
    pub record: Record,
    /// The targets that served this answer so far.
    pub tried: Vec<Arc<str>>,
}

/// A continuation found: its upstream's format, the target, and how many bytes of the
/// caller's text it was sent as its prefix.
pub(super) struct Continuation {
    pub upstream: &'static dyn UpstreamCodec,
    pub served_by: Arc<str>,
    pub sent: usize,
}

impl Resume {
    /// Finds the continuation of an answer whose caller has `text` so far: the request
    /// with `text` as the assistant's prefix, to each remaining target until one's
    /// stream begins.
    pub fn find(&self, text: &str) -> BoxFuture<'static, Option<(Body, Continuation)>> {
        // Anthropic refuses an assistant prefix that ends in whitespace.
        let prefix = text.trim_end().to_owned();
        let body = with_prefix(&self.raw, &prefix);
        let state = self.state.clone();
        let (endpoint, headers) = (self.endpoint, self.headers.clone());
        let (alias, record, tried) = (self.alias.clone(), self.record.clone(), self.tried.clone());
        Box::pin(async move {
            let body = body?;
            let inner = state.inner();
            let snapshot = inner.store.load();
            let model = snapshot.model(&alias)?;
            let plan = inner.routing.plan(&snapshot, model).ok()?;
            let parsed = RequestBody::parse(&body).ok()?;
            let request = CallerRequest {
                endpoint,
                body: &parsed,
                raw: &body,
                form: None,
                headers: &headers,
            };
            let left = plan.candidates.iter().filter(|c| !tried.contains(&c.name));
            let request_id = record.request_id();
            for candidate in left {
                let sent = dispatch::attempt(
                    inner,
                    &snapshot,
                    candidate,
                    (endpoint, &record),
                    1,
                    &request,
                )
                .await;
                match sent.result {
                    Ok((answer, conversion)) => {
                        if let (Some(span), Some(trace)) = (sent.span, record.trace()) {
                            span.answered(trace, answer.status.as_u16());
                        }
                        inner.health.success(&candidate.name);
                        inner
                            .hooks
                            .metrics
                            .record_deployment(&alias, &candidate.name, true);
                        inner.hooks.metrics.record_fallback(&alias, true);
                        let continuation = Continuation {
                            upstream: upstream_of(conversion, endpoint)?,
                            served_by: candidate.name.clone(),
                            sent: prefix.len(),
                        };
                        return Some((answer.body, continuation));
                    }
                    Err(error) => {
                        let class = dispatch::failed(inner, candidate, &error);
                        inner
                            .hooks
                            .metrics
                            .record_deployment(&alias, &candidate.name, false);
                        inner.hooks.metrics.record_fallback(&alias, false);
                        if let Some(span) = sent.span {
                            span.failed(error.upstream_status(), class.metric_kind, "failover");
                        }
                        warn!(request_id = %request_id, model = %candidate.name, error = %error, detail = ?error, "resuming the stream failed; trying the next target");
                    }
                }
            }
            None
        })
    }
}

/// The format of a continuation's stream: the adapter's, or the caller's own.
fn upstream_of(conversion: Conversion, endpoint: Endpoint) -> Option<&'static dyn UpstreamCodec> {
    match conversion {
        Conversion::Translate { upstream, .. } => Some(upstream),
        Conversion::None => chat::native(endpoint).map(|(_, upstream)| upstream),
        Conversion::Embeddings { .. } => None,
    }
}

/// The caller's body with `prefix` as a last, assistant message (both chat formats
/// take a string as a message's content).
fn with_prefix(raw: &[u8], prefix: &str) -> Option<Bytes> {
    let mut body: Value = serde_json::from_slice(raw).ok()?;
    let messages = body.get_mut("messages")?.as_array_mut()?;
    messages.push(serde_json::json!({"role": "assistant", "content": prefix}));
    serde_json::to_vec(&body).ok().map(Bytes::from)
}
