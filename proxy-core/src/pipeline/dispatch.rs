//! Dispatch: the routing plan's candidates are tried in turn (retries with backoff,
//! failover, cooldowns, health) until one answers. Each attempt goes to one direct
//! model through its provider's adapter. What follows a failed attempt is read from
//! the failure's class; nothing here decides it again.

use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::admit::Admitted;
use super::resume::Resume;
use super::routing::Next;
use super::state::{Call, Inner, ProxyState};
use crate::failure::{Class, ProxyError};
use crate::formats::chat::Conversion;
use crate::formats::endpoint::Endpoint;
use crate::observe::record::Record;
use crate::observe::trace::{self, Attempt};
use crate::providers::client::{Answer, Target};
use crate::providers::{self, CallerRequest, TargetModel};
use crate::resources::{Model, ModelTarget};
use crate::snapshot::Snapshot;

/// A successful answer: the upstream's, how to convert it, the model that gave it,
/// and how to continue its stream on another target (resumable streams).
pub(super) struct Dispatched<'s> {
    pub answer: Answer,
    pub conversion: Conversion,
    pub served_by: &'s Arc<Model>,
    pub resume: Option<Resume>,
}

/// Why dispatch gave up: the failure to report, and the target it came from (`None`
/// when no target was tried).
pub(super) struct Undispatched<'s> {
    pub error: ProxyError,
    pub tried: Option<&'s Arc<Model>>,
}

pub(super) async fn dispatch<'s>(
    shared: &ProxyState,
    snapshot: &'s Snapshot,
    admitted: &Admitted<'s>,
    call: &Call,
    request: &CallerRequest<'_>,
) -> Result<Dispatched<'s>, Undispatched<'s>> {
    let state = shared.inner();
    let plan = match state.routing.plan(snapshot, admitted.model) {
        Ok(plan) => plan,
        Err(error) => return Err(Undispatched { error, tried: None }),
    };
    let request_id: &str = &call.request_id;
    let metrics = &state.hooks.metrics;
    let alias = &admitted.model.name;
    let mut last_failure = None;
    let targets = plan.candidates.len();
    'candidates: for (index, candidate) in plan.candidates.iter().copied().enumerate() {
        let mut attempt_number = 0;
        loop {
            attempt_number += 1;
            let Sent { result, span } = attempt(
                state,
                snapshot,
                candidate,
                (call.endpoint, &call.record),
                attempt_number,
                request,
            )
            .await;
            let error = match result {
                Ok((answer, conversion)) => {
                    if let (Some(span), Some(trace)) = (span, call.record.trace()) {
                        span.answered(trace, answer.status.as_u16());
                    }
                    metrics.record_deployment(alias, &candidate.name, true);
                    if index > 0 {
                        metrics.record_fallback(alias, true);
                    }
                    state.health.success(&candidate.name);
                    state.routing.recovered(&candidate.name);
                    // Only a stream can be resumed: a plain answer copies nothing for it.
                    let resume = (plan.resume_streams && request.body.stream).then(|| Resume {
                        state: shared.clone(),
                        endpoint: call.endpoint,
                        headers: request.headers.clone(),
                        raw: Bytes::copy_from_slice(request.raw),
                        alias: admitted.model.name.clone(),
                        record: call.record.clone(),
                        tried: vec![candidate.name.clone()],
                    });
                    return Ok(Dispatched {
                        answer,
                        conversion,
                        served_by: candidate,
                        resume,
                    });
                }
                Err(error) => error,
            };
            let class = failed(state, candidate, &error);
            metrics.record_deployment(alias, &candidate.name, false);
            let next = plan.next(&class, attempt_number);
            if index > 0 && !matches!(next, Next::Retry(_)) {
                metrics.record_fallback(alias, false);
            }
            if let Some(span) = span {
                let then = match next {
                    Next::Retry(_) => "retry",
                    Next::Fallback { .. } if index + 1 < targets => "failover",
                    Next::Fallback { .. } | Next::Answer => "answer",
                };
                span.failed(error.upstream_status(), class.metric_kind, then);
            }
            match next {
                Next::Retry(wait) => {
                    warn!(request_id, model = %candidate.name, attempt = attempt_number, retry_in_ms = wait.as_millis() as u64, error = %error, detail = ?error, "upstream attempt failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                Next::Fallback { cool_down } => {
                    let then = if index + 1 < targets {
                        "upstream attempt failed; trying the next target"
                    } else {
                        "upstream attempt failed; no target left"
                    };
                    warn!(request_id, model = %candidate.name, attempt = attempt_number, error = %error, detail = ?error, "{then}");
                    if cool_down {
                        metrics.record_cooldown(alias, &candidate.name);
                        state
                            .routing
                            .cool_down(candidate, class.upstream_retry_after);
                    }
                    last_failure = Some((error, candidate));
                    continue 'candidates;
                }
                Next::Answer => {
                    last_failure = Some((error, candidate));
                    break 'candidates;
                }
            }
        }
    }
    Err(match last_failure {
        Some((error, candidate)) => Undispatched {
            error,
            tried: Some(candidate),
        },
        None => Undispatched {
            error: ProxyError::ProviderUnavailable(format!(
                "model '{}' has no available target",
                plan.model
            )),
            tried: None,
        },
    })
}

/// A failed attempt in the metrics and, when its class says so, the target's health;
/// its class.
pub(super) fn failed(state: &Inner, model: &Model, error: &ProxyError) -> Class {
    let class = error.class();
    state
        .hooks
        .metrics
        .record_upstream_failure(&model.name, class.metric_kind);
    if class.counts_against_health {
        state.health.failure(&model.name);
    }
    class
}

/// One attempt's outcome, and its span when the request is traced and the attempt got
/// as far as sending.
pub(super) struct Sent {
    pub result: Result<(Answer, Conversion), ProxyError>,
    pub span: Option<Attempt>,
}

/// Sends the call to one direct model (attempt `number` of it): the request as its
/// adapter wants it.
pub(super) async fn attempt(
    state: &Inner,
    snapshot: &Snapshot,
    model: &Arc<Model>,
    call: (Endpoint, &Record),
    number: u32,
    request: &CallerRequest<'_>,
) -> Sent {
    let mut span = None;
    let result = send(state, snapshot, model, call, number, request, &mut span).await;
    Sent { result, span }
}

async fn send(
    state: &Inner,
    snapshot: &Snapshot,
    model: &Arc<Model>,
    (endpoint, record): (Endpoint, &Record),
    number: u32,
    request: &CallerRequest<'_>,
    span: &mut Option<Attempt>,
) -> Result<(Answer, Conversion), ProxyError> {
    let request_id: &str = record.request_id();
    let unavailable = || {
        ProxyError::ProviderUnavailable(format!(
            "model '{}' has no usable provider key",
            model.name
        ))
    };
    let ModelTarget::Direct(direct) = &model.target else {
        return Err(unavailable());
    };
    let provider_key = snapshot
        .provider_key(&direct.provider_key_id)
        .ok_or_else(unavailable)?;
    // A generic key takes the model's provider (checked when the model loaded).
    let derived;
    let provider_key = match (provider_key.generic, direct.provider.as_deref()) {
        (true, Some(name)) => {
            derived = Arc::new(provider_key.for_provider(name).ok_or_else(unavailable)?);
            &derived
        }
        _ => provider_key,
    };
    let provider = providers::adapter(&provider_key.adapter)?;
    let mut prepared = provider.prepare(
        request,
        &TargetModel {
            upstream_model: &direct.model_name,
            prompt_cache: model.prompt_cache,
            key: provider_key,
        },
    )?;
    let target = Target {
        model,
        upstream_model: &direct.model_name,
        provider_key,
        traced: record.trace().is_some(),
    };
    debug!(request_id, model = %model.name, upstream_model = target.upstream_model, path = &*prepared.outgoing.path, "dispatching");
    let headers = &mut prepared.outgoing.headers;
    match record.trace() {
        Some(trace) => {
            let attempt = trace.attempt(
                trace::attempt_attributes(&trace::AttemptFacts {
                    endpoint,
                    provider: &provider_key.provider,
                    api_base: &provider_key.api_base,
                    upstream_model: &direct.model_name,
                    target: &model.name,
                    number,
                    request_id: record.request_id(),
                    body: request.body,
                }),
                format!("{} {}", trace::operation(endpoint), direct.model_name),
            );
            attempt.inject(headers);
            *span = Some(attempt);
        }
        None => trace::forward_caller_context(request.headers, headers),
    }
    let sent_at = Instant::now();
    let answer = state
        .upstream
        .send(provider, &target, prepared.outgoing, request_id)
        .await;
    let status = match &answer {
        Ok(answer) => answer.status.as_u16(),
        Err(error) => error.class().status.as_u16(),
    };
    state.hooks.metrics.record_upstream(
        &model.name,
        &provider_key.provider,
        status,
        sent_at.elapsed(),
    );
    Ok((answer?, prepared.conversion))
}
