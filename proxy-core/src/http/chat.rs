//! `POST /v1/chat/completions`: authenticate, resolve the alias, check access, then call
//! the upstream of each candidate in turn until one answers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tracing::{debug, warn};

use super::basic::authenticate;
use super::{CALL_ID, ProxyState, RequestId, SERVED_BY};
use crate::error::ProxyError;
use crate::openai::ChatBody;
use crate::resources::{Adapter, Model, ModelTarget};
use crate::snapshot::Snapshot;
use crate::upstream::{Answer, Target};

pub(super) async fn chat_completions(
    State(state): State<ProxyState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let call_id = uuid::Uuid::new_v4().to_string();
    let mut response = match handle(&state, peer, &request_id, &headers, body).await {
        Ok(response) => response,
        Err(error) => {
            log_failure(&request_id, &error);
            error.into_openai_response()
        }
    };
    if let Ok(value) = HeaderValue::from_str(&call_id) {
        response.headers_mut().insert(CALL_ID, value);
    }
    response
}

async fn handle(
    state: &ProxyState,
    peer: SocketAddr,
    request_id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ProxyError> {
    let snapshot = state.0.store.load();
    let caller = authenticate(&snapshot, headers)?;
    let bytes = read_body(body, headers, state.0.options.body_limit).await?;
    let request = ChatBody::parse(&bytes)?;
    let model = snapshot
        .model(&request.model)
        .ok_or_else(|| ProxyError::ModelNotFound(request.model.clone()))?;
    if !caller.allows(&model.name) {
        return Err(ProxyError::PermissionDenied(format!(
            "this API key may not use model '{}'",
            model.name
        )));
    }
    if !model.admits(peer.ip()) {
        return Err(ProxyError::PermissionDenied(format!(
            "client address {} may not use model '{}'",
            peer.ip(),
            model.name
        )));
    }
    let mut last_error = None;
    for candidate in candidates(&snapshot, model) {
        let health = &state.0.health;
        match attempt(state, &snapshot, candidate, &request, request_id).await {
            Ok(answer) => {
                health.success(&candidate.name);
                return Ok(respond(answer, &candidate.name, request.stream));
            }
            Err(e @ (ProxyError::UpstreamFailed { .. } | ProxyError::Timeout(_))) => {
                health.failure(&candidate.name);
                warn!(request_id, model = %candidate.name, error = %e, detail = ?e, "upstream attempt failed");
                last_error = Some(e);
            }
            Err(e) => {
                if matches!(&e, ProxyError::UpstreamRejected { status, .. } if status.as_u16() == 429)
                {
                    health.failure(&candidate.name);
                }
                return Err(e);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        ProxyError::ProviderUnavailable(format!("model '{}' has no available target", model.name))
    }))
}

/// The direct models to try, in order: the model itself, or a routing model's targets
/// by priority (higher first), then as listed.
fn candidates<'s>(snapshot: &'s Snapshot, model: &'s Arc<Model>) -> Vec<&'s Arc<Model>> {
    match &model.target {
        ModelTarget::Direct(_) => vec![model],
        ModelTarget::Routing(routing) => {
            let mut targets: Vec<_> = routing.targets.iter().collect();
            targets.sort_by_key(|t| std::cmp::Reverse(t.priority));
            targets
                .iter()
                .filter_map(|t| snapshot.model(&t.model))
                .collect()
        }
    }
}

async fn attempt(
    state: &ProxyState,
    snapshot: &Snapshot,
    model: &Arc<Model>,
    request: &ChatBody<'_>,
    request_id: &str,
) -> Result<Answer, ProxyError> {
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
    match &provider_key.adapter {
        Adapter::OpenAi => {
            let target = Target {
                model,
                upstream_model: &direct.model_name,
                provider_key,
            };
            let body = request.with_model(target.upstream_model);
            debug!(request_id, model = %model.name, upstream_model = target.upstream_model, "dispatching");
            state
                .0
                .upstream
                .send_openai(
                    &target,
                    "/v1/chat/completions",
                    body,
                    request.stream,
                    request_id,
                )
                .await
        }
        Adapter::Anthropic => Err(ProxyError::NotImplemented(format!(
            "model '{}' uses the anthropic adapter, which this build cannot reach through /v1/chat/completions yet",
            model.name
        ))),
        Adapter::Other(name) => Err(ProxyError::NotImplemented(format!(
            "provider adapter '{name}' does not implement /v1/chat/completions"
        ))),
    }
}

fn respond(answer: Answer, served_by: &str, stream: bool) -> Response {
    let mut response = Response::new(answer.body);
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    let default_type = if stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    headers.insert(
        header::CONTENT_TYPE,
        answer
            .content_type
            .unwrap_or(HeaderValue::from_static(default_type)),
    );
    if stream {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    if let Ok(value) = HeaderValue::from_str(served_by) {
        headers.insert(SERVED_BY, value);
    }
    response
}

/// Reads the whole body, refusing more than `limit` bytes (by Content-Length up front,
/// and while reading for chunked bodies).
pub(super) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: Option<usize>,
) -> Result<bytes::Bytes, ProxyError> {
    let Some(limit) = limit else {
        return body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|_| ProxyError::invalid_request("failed to read the request body", None));
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(_) => Err(ProxyError::invalid_request(
            "failed to read the request body",
            None,
        )),
    }
}

fn log_failure(request_id: &str, error: &ProxyError) {
    let class = error.class();
    if class.operator_visible {
        warn!(request_id, status = class.status.as_u16(), error_type = class.kind, detail = ?error, "request failed");
    } else {
        debug!(request_id, status = class.status.as_u16(), error_type = class.kind, error = %error, "request rejected");
    }
}
