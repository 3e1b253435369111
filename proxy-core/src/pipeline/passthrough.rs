//! `ANY /passthrough/{provider}/{*rest}`: a provider's own API, reached with the
//! gateway's credential.
//!
//! After the caller key is authenticated (`Authorization: Bearer` or `x-api-key`) and
//! the provider resolved, the method, path, query, body and safe headers go to the
//! provider key's `api_base` with the upstream credential; the upstream status, headers
//! and body come back unchanged (errors included), streamed. Caller credentials,
//! cookies and hop-by-hop headers are not forwarded.
//!
//! `{provider}` names a provider (`openai`, `anthropic`, a vendor name) or a provider
//! key's `display_name`. The caller key must be allowed at least one model served by
//! that provider key: passthrough is raw access, so it is granted through models. When
//! several keys match, the one behind the alphabetically first such model is used.
//! Admission is the pipeline's own (caller key, the granting model's allow list and
//! client-address rules, request rate limits and budget of the caller key, body size),
//! and the granting model's guardrails apply (their attachments may also name the
//! route, `passthrough_route`): input rules read every string of the body (or the body
//! as text when it is not JSON) and may mask it; output rules check event streams
//! window by window and JSON answers whole (then buffered). The answer is otherwise
//! relayed as it comes; its usage is read where its format is known (events, JSON) and
//! charged like a call's (token limits, the usage event). The cache does not apply.
//! The upstream
//! client is the one calls use; an upstream redirect is relayed as it is, never
//! followed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, Method, Uri, header};
use axum::response::Response;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::debug;

use super::admit::{authenticate, limits_and_budget, read_body, subject};
use super::state::{Inner, ProxyState, client_ip};
use crate::failure::{Envelope, ProxyError};
use crate::formats::sse::{self, Filtered};
use crate::hooks::UsageEvent;
use crate::observe::record::Record;
use crate::observe::usage::{Pending, WholeTap, unix_now_ms};
use crate::policy::guardrails::{self, Chain, Stage, StreamGuard};
use crate::providers::{self, client::Relayed};
use crate::resources::{Adapter, ApiKey, Guardrail, Model, ModelTarget, ProviderKey};
use crate::snapshot::Snapshot;

/// One passthrough request to `provider`; refusals before the upstream answers use
/// the envelope of the provider's family.
#[allow(clippy::too_many_arguments, reason = "one request's parts")]
pub async fn passthrough(
    state: ProxyState,
    record: Record,
    peer: SocketAddr,
    provider: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let state = state.inner();
    let snapshot = state.store.load();
    // Errors before the upstream answers use the envelope of the provider's family.
    let envelope = match provider_keys_named(&snapshot, &provider).next() {
        Some(pk) if pk.adapter == Adapter::Anthropic => Envelope::Anthropic,
        _ => Envelope::OpenAi,
    };
    let request = Request {
        peer,
        method,
        uri: &uri,
        headers: &headers,
        body,
    };
    match forward(state, &snapshot, &record, &provider, request).await {
        Ok(response) => response,
        Err(error) => {
            error.log(record.request_id());
            error.into_response_in(envelope)
        }
    }
}

/// What the caller sent.
struct Request<'r> {
    peer: SocketAddr,
    method: Method,
    uri: &'r Uri,
    headers: &'r HeaderMap,
    body: Body,
}

async fn forward(
    state: &Inner,
    snapshot: &Snapshot,
    record: &Record,
    provider: &str,
    request: Request<'_>,
) -> Result<Response, ProxyError> {
    let request_id: &str = record.request_id();
    let Request {
        peer,
        method,
        uri,
        headers,
        body,
    } = request;
    let started = tokio::time::Instant::now();
    let caller = authenticate(snapshot, headers, Envelope::Anthropic)?;
    record.caller(&caller.id);
    let client = client_ip(peer.ip(), headers, &state.options);
    let (model, provider_key) = resolve(snapshot, caller, provider, client)?;
    let rest = safe_rest(uri.path(), provider)?;
    // Request and token limits of the caller key (no model to limit); the lease
    // (concurrency) is held until the answer has been relayed, then charged its tokens.
    // Before the body is read, its declared length is the token estimate's base.
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let lease = limits_and_budget(state, record, caller, None, declared.div_ceil(4)).await?;
    let mut bytes = read_body(body, headers, &state.options).await?;
    // The guardrails of the model that grants the access; input ones read the body.
    let guards = guardrails::applicable(snapshot, &subject(model, caller, Some(provider)));
    let input = Chain {
        rules: &guards.input,
        stage: Stage::Input,
        request_id,
        record,
        metrics: &state.hooks.metrics,
        detectors: &state.detectors,
    };
    if let Some(masked) = input.raw(&bytes).await? {
        bytes = masked;
    }
    let mut url = format!("{}/{rest}", provider_key.api_base);
    if let Some(query) = uri.query() {
        url.push('?');
        url.push_str(query);
    }
    let adapter = providers::for_passthrough(&provider_key.adapter);
    let mut outgoing = forwardable(headers);
    adapter.passthrough_defaults(&mut outgoing);
    if let Some(trace) = record.trace() {
        trace.inject(&mut outgoing);
    }
    let relayed = Relayed {
        method,
        url,
        headers: outgoing,
        body: bytes,
    };
    debug!(request_id, provider, path = rest, "passthrough");
    let response = state
        .upstream
        .forward(adapter, provider_key, relayed, request_id)
        .await?;
    let content_type = content_type(&response);
    let stream = content_type.starts_with("text/event-stream");
    let usage = Pending::new(
        state
            .hooks
            .usage
            .clone()
            .filter(|_| response.status().is_success())
            .map(|sink| {
                let event = usage_event(record, caller, model, provider_key, &response, stream);
                (sink, event)
            }),
        lease,
        record.clone(),
        model.cost,
        started,
    );
    let output = Output {
        rules: guards.output,
        envelope: match provider_key.adapter {
            Adapter::Anthropic => Envelope::Anthropic,
            _ => Envelope::OpenAi,
        },
        metrics: state.hooks.metrics.clone(),
        detectors: state.detectors.clone(),
    };
    relay(response, &content_type, usage, output, record).await
}

/// The output guardrails of a passthrough call, and the format of its errors.
struct Output {
    rules: Vec<Arc<Guardrail>>,
    envelope: Envelope,
    metrics: Arc<crate::observe::metrics::Metrics>,
    detectors: Arc<guardrails::Detectors>,
}

/// The upstream's answer as it comes, its usage read where its format is known
/// (server-sent events, JSON) and charged like a call's: token limits, the usage
/// event, the budget behind it.
async fn relay(
    response: http::Response<Incoming>,
    content_type: &str,
    usage: Pending,
    output: Output,
    record: &Record,
) -> Result<Response, ProxyError> {
    let mut relayed = Response::builder().status(response.status());
    if let Some(out) = relayed.headers_mut() {
        *out = forwardable_response(response.headers());
    }
    let json = content_type.starts_with("application/json");
    if json && !output.rules.is_empty() {
        // A JSON answer is checked whole: buffered, masked or refused, then sent.
        let answer = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ProxyError::UpstreamFailed {
                detail: format!("passthrough response: {e}"),
                retry_after: None,
            })?
            .to_bytes();
        let chain = Chain {
            rules: &output.rules,
            stage: Stage::Output,
            request_id: record.request_id(),
            record,
            metrics: &output.metrics,
            detectors: &output.detectors,
        };
        let checked = chain.answer(&answer).await;
        let mut tap = WholeTap::json(usage);
        tap.observe(&answer);
        drop(tap);
        let body = match checked? {
            Some(masked) => {
                if let Some(headers) = relayed.headers_mut() {
                    headers.remove(header::CONTENT_LENGTH);
                }
                masked
            }
            None => answer,
        };
        return relayed
            .body(Body::from(body))
            .map_err(|e| ProxyError::UpstreamFailed {
                detail: format!("passthrough response: {e}"),
                retry_after: None,
            });
    }
    let upstream = Body::new(response.into_body());
    let body = if content_type.starts_with("text/event-stream") {
        let mut tap = usage.tap();
        let body = sse::filter_events(upstream, move |events| {
            tap.observe(&events);
            Filtered::Send(events)
        });
        if output.rules.is_empty() {
            body
        } else {
            if let Some(headers) = relayed.headers_mut() {
                headers.remove(header::CONTENT_LENGTH);
            }
            let guard = StreamGuard::new(
                output.rules,
                record.request_id().clone(),
                record.clone(),
                output.metrics,
                output.detectors,
                output.envelope,
            );
            guardrails::guarded(body, guard)
        }
    } else {
        let mut tap = if json {
            WholeTap::json(usage)
        } else {
            WholeTap::opaque(usage)
        };
        Body::from_stream(upstream.into_data_stream().map(move |chunk| {
            if let Ok(chunk) = &chunk {
                tap.observe(chunk);
            }
            chunk
        }))
    };
    relayed.body(body).map_err(|e| ProxyError::UpstreamFailed {
        detail: format!("passthrough response: {e}"),
        retry_after: None,
    })
}

fn content_type(response: &http::Response<Incoming>) -> String {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// The usage event of a passthrough answer, tokens to come.
fn usage_event(
    record: &Record,
    caller: &ApiKey,
    model: &Model,
    provider_key: &ProviderKey,
    response: &http::Response<Incoming>,
    stream: bool,
) -> UsageEvent {
    UsageEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        request_id: record.request_id().to_string(),
        api_key_id: caller.id.to_string(),
        model: model.name.to_string(),
        provider: provider_key.provider.clone(),
        served_by: model.name.to_string(),
        prompt_tokens: 0,
        completion_tokens: 0,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cost_usd: 0.0,
        status_code: response.status().as_u16(),
        stream,
        latency_ms: 0,
        ttft_ms: None,
        timestamp_unix_ms: unix_now_ms(),
        finish_reason: None,
        guardrails: Vec::new(),
    }
}

fn provider_keys_named<'s>(
    snapshot: &'s Snapshot,
    name: &'s str,
) -> impl Iterator<Item = &'s Arc<ProviderKey>> + 's {
    snapshot.models().filter_map(move |m| match &m.target {
        ModelTarget::Direct(d) => snapshot
            .provider_key(&d.provider_key_id)
            .filter(|pk| named(pk, name)),
        ModelTarget::Routing(_) => None,
    })
}

/// Whether `{provider}` names this key: its provider or its display name.
fn named(pk: &ProviderKey, name: &str) -> bool {
    pk.provider == name || pk.display_name == name
}

/// The first model (by alias) the caller may use, from the client's address, whose
/// provider key is named `name`, and that key: passthrough is granted through models,
/// so their access rules hold here too.
fn resolve<'s>(
    snapshot: &'s Snapshot,
    caller: &ApiKey,
    name: &str,
    client: IpAddr,
) -> Result<(&'s Model, &'s Arc<ProviderKey>), ProxyError> {
    let (mut any, mut from_elsewhere) = (false, false);
    let mut allowed: Option<(&Model, &Arc<ProviderKey>)> = None;
    for model in snapshot.models() {
        let ModelTarget::Direct(direct) = &model.target else {
            continue;
        };
        let Some(pk) = snapshot
            .provider_key(&direct.provider_key_id)
            .filter(|pk| named(pk, name))
        else {
            continue;
        };
        any = true;
        if !caller.allows(&model.name) {
            continue;
        }
        if !model.admits(client) {
            from_elsewhere = true;
            continue;
        }
        if allowed.is_none_or(|(first, _)| *model.name < *first.name) {
            allowed = Some((model, pk));
        }
    }
    match allowed {
        Some(grant) => Ok(grant),
        None if from_elsewhere => Err(ProxyError::PermissionDenied(format!(
            "client address {client} may not use any model of provider '{name}'"
        ))),
        None if any => Err(ProxyError::PermissionDenied(format!(
            "this API key may not use any model of provider '{name}'"
        ))),
        None => Err(ProxyError::NotFound(format!(
            "provider '{name}' is not configured"
        ))),
    }
}

/// The path after `/passthrough/{provider}/`, refused when it could leave the
/// provider's API base: `.` or `..` segments (also percent-encoded), encoded slashes or
/// backslashes, empty segments.
fn safe_rest<'u>(path: &'u str, provider: &str) -> Result<&'u str, ProxyError> {
    let rest = path
        .strip_prefix("/passthrough/")
        .and_then(|p| p.split_once('/'))
        .map_or("", |(_, rest)| rest);
    let lower = rest.to_ascii_lowercase();
    let tricky = rest.is_empty()
        || lower.contains("%2f")
        || lower.contains("%5c")
        || rest.contains('\\')
        || rest.split('/').any(|segment| {
            let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
            segment.is_empty() || decoded == "." || decoded == ".."
        });
    if tricky {
        return Err(ProxyError::invalid_request(
            format!("passthrough path for '{provider}' must be a plain relative path"),
            None,
        ));
    }
    Ok(rest)
}

/// Headers that are hop-by-hop (RFC 9110 7.6.1) or listed in `Connection`.
fn hop_by_hop(name: &HeaderName, connection: &[String]) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    ) || connection.iter().any(|c| c == name.as_str())
}

fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect()
}

/// The caller's headers minus credentials, cookies, hop-by-hop headers, `Host`,
/// `Content-Length` (set again for the body) and our own `x-aisix-*`.
fn forwardable(headers: &HeaderMap) -> HeaderMap {
    let connection = connection_listed(headers);
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let credential = matches!(
            name.as_str(),
            "authorization" | "x-api-key" | "api-key" | "x-goog-api-key" | "cookie"
        );
        let ours = name.as_str().starts_with("x-aisix-");
        if credential
            || ours
            || hop_by_hop(name, &connection)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The upstream's response headers minus hop-by-hop ones.
fn forwardable_response(headers: &HeaderMap) -> HeaderMap {
    let connection = connection_listed(headers);
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        if !hop_by_hop(name, &connection) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn only_plain_relative_paths_pass() {
        let ok = |p: &str| safe_rest(p, "openai").map(str::to_owned);
        assert_eq!(ok("/passthrough/openai/v1/models").unwrap(), "v1/models");
        assert_eq!(
            ok("/passthrough/openai/v1/files/file-1/content").unwrap(),
            "v1/files/file-1/content"
        );
        for bad in [
            "/passthrough/openai/",
            "/passthrough/openai/../admin",
            "/passthrough/openai/v1/../../x",
            "/passthrough/openai/v1/%2e%2E/x",
            "/passthrough/openai/v1%2fmodels",
            "/passthrough/openai/v1%5Cmodels",
            "/passthrough/openai/v1\\models",
            "/passthrough/openai//evil.example/x",
            "/passthrough/openai/v1/./models",
        ] {
            assert!(ok(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_and_hop_by_hop_headers_stay_behind() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer caller"),
            ("x-api-key", "caller"),
            ("cookie", "c=1"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("host", "gw"),
            ("content-length", "3"),
            ("x-aisix-request-id", "r"),
            ("openai-organization", "org"),
            ("anthropic-beta", "b"),
            ("content-type", "application/json"),
        ] {
            h.append(HeaderName::from_static(k), v.parse().unwrap());
        }
        let out = forwardable(&h);
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["anthropic-beta", "content-type", "openai-organization"]
        );
    }
}
