//! Liveness, readiness, model discovery and the fallbacks.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Serialize;

use crate::failure::{Envelope, ProxyError};
use crate::observe::record::Record;
use crate::pipeline::{ProxyState, authenticate};
use crate::resources::ModelTarget;

pub(super) async fn livez(
    State(state): State<ProxyState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    livez_response(state.0.draining.is_cancelled(), &q)
}

/// `/readyz`: 200 once a snapshot is loaded (from the source or the cache) and while
/// not draining; 503 otherwise, saying why. `?verbose=1` lists the checks.
pub(super) async fn readyz(
    State(state): State<ProxyState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    readyz_response(
        state.0.store.freshness().source,
        state.0.draining.is_cancelled(),
        &q,
    )
}

/// The `/readyz` answer of the proxy and admin listeners: `ok` once a configuration is
/// loaded, else (and while draining) 503; `?verbose=1` says which check failed.
pub fn readyz_response(
    loaded: Option<crate::snapshot::Source>,
    draining: bool,
    q: &HashMap<String, String>,
) -> Response {
    let verbose = q
        .get("verbose")
        .is_some_and(|v| !matches!(v.as_str(), "0" | "false"));
    let config = match loaded {
        Some(source) => format!("[+]config ok (source {})", source.as_str()),
        None => "[-]config failed: no configuration loaded yet".to_owned(),
    };
    let shutdown = if draining {
        "[-]shutdown failed: the process is shutting down"
    } else {
        "[+]shutdown ok"
    };
    let ready = loaded.is_some() && !draining;
    let (status, verdict) = if ready {
        (StatusCode::OK, "readyz check passed")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "readyz check failed")
    };
    let body = match (ready, verbose) {
        (true, false) => "ok".to_owned(),
        (false, false) => verdict.to_owned(),
        (_, true) => format!("{config}\n{shutdown}\n{verdict}"),
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// The `/livez` answer of any listener: `ok`, or 500 `livez check failed` while the
/// process is draining; `?verbose=1` gives a multi-line body.
pub fn livez_response(draining: bool, query: &HashMap<String, String>) -> Response {
    let verbose = query
        .get("verbose")
        .is_some_and(|v| !matches!(v.as_str(), "0" | "false"));
    let (status, body) = match (draining, verbose) {
        (false, false) => (StatusCode::OK, "ok"),
        (false, true) => (
            StatusCode::OK,
            "[+]ping ok\n[+]shutdown ok\nlivez check passed",
        ),
        (true, false) => (StatusCode::INTERNAL_SERVER_ERROR, "livez check failed"),
        (true, true) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "[+]ping ok\n[-]shutdown failed: the process is shutting down\nlivez check failed",
        ),
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<ModelEntry>,
}

#[derive(Serialize)]
struct ModelEntry {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: String,
}

pub(super) async fn list_models(
    State(state): State<ProxyState>,
    Extension(record): Extension<Record>,
    headers: HeaderMap,
) -> Result<Response, ProxyError> {
    let snapshot = state.0.store.load();
    let caller = authenticate(&snapshot, &headers, Envelope::OpenAi)?;
    record.caller(&caller.id);
    let mut data: Vec<ModelEntry> = snapshot
        .models()
        .filter(|m| caller.allows(&m.name))
        .map(|m| ModelEntry {
            id: m.name.to_string(),
            object: "model",
            created: state.0.started_unix,
            owned_by: match &m.target {
                ModelTarget::Direct(d) => snapshot
                    .provider_key(&d.provider_key_id)
                    .map_or_else(|| "aisix".to_owned(), |pk| pk.provider.clone()),
                ModelTarget::Routing(_) => "aisix".to_owned(),
            },
        })
        .collect();
    data.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(ModelList {
        object: "list",
        data,
    })
    .into_response())
}

pub(super) async fn unknown_route(method: Method, uri: Uri) -> ProxyError {
    ProxyError::UnknownRoute(format!("{method} {}", uri.path()))
}

pub(super) async fn method_not_allowed(method: Method, uri: Uri) -> ProxyError {
    ProxyError::MethodNotAllowed(format!("{method} {}", uri.path()))
}
