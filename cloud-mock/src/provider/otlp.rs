//! An OpenTelemetry collector's OTLP/HTTP receiver, enough to test exporters against:
//! `POST /v1/traces` and `POST /v1/metrics` take `application/x-protobuf` bodies and
//! keep them as they came (the last [`KEPT`] of each signal); nothing is decoded here,
//! tests decode them with the official `opentelemetry-proto` package.
//!
//! Scripted over HTTP: `PUT /_mock/otlp` `{"status": 503, "delay_ms": 2000}` (answer
//! every export with that status, after that delay: a collector that refuses or is
//! slow); `GET /_mock/otlp?signal=traces` lists what was received (bodies in base64);
//! `DELETE /_mock/otlp` forgets it all.

use std::collections::VecDeque;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{SharedState, lock};

/// Exports kept per signal.
pub const KEPT: usize = 2_000;

/// How the receiver answers, and what it received.
#[derive(Debug, Default)]
pub struct Sink {
    pub(super) script: OtlpScript,
    traces: VecDeque<Export>,
    metrics: VecDeque<Export>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpScript {
    /// 0 or 200: accept.
    pub status: u16,
    pub delay_ms: u64,
}

/// One export request as received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Export {
    pub content_type: Option<String>,
    /// The protobuf body, base64.
    pub body: String,
}

async fn receive(
    shared: &SharedState,
    signal: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> StatusCode {
    let script = lock(shared).otlp.script;
    if script.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(script.delay_ms)).await;
    }
    if !matches!(script.status, 0 | 200) {
        return StatusCode::from_u16(script.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    }
    let export = Export {
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: base64::engine::general_purpose::STANDARD.encode(&body),
    };
    let mut s = lock(shared);
    let kept = if signal == "traces" {
        &mut s.otlp.traces
    } else {
        &mut s.otlp.metrics
    };
    if kept.len() == KEPT {
        kept.pop_front();
    }
    kept.push_back(export);
    StatusCode::OK
}

pub(super) async fn traces(
    State(shared): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    receive(&shared, "traces", &headers, body).await
}

pub(super) async fn metrics(
    State(shared): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    receive(&shared, "metrics", &headers, body).await
}

pub(super) async fn set_script(
    State(shared): State<SharedState>,
    axum::Json(script): axum::Json<OtlpScript>,
) -> StatusCode {
    lock(&shared).otlp.script = script;
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
pub(super) struct SignalQuery {
    signal: Option<String>,
}

pub(super) async fn list(
    State(shared): State<SharedState>,
    Query(q): Query<SignalQuery>,
) -> axum::Json<Vec<Export>> {
    let s = lock(&shared);
    let kept = match q.signal.as_deref() {
        Some("metrics") => &s.otlp.metrics,
        _ => &s.otlp.traces,
    };
    axum::Json(kept.iter().cloned().collect())
}

pub(super) async fn clear(State(shared): State<SharedState>) -> StatusCode {
    let mut s = lock(&shared);
    s.otlp.traces.clear();
    s.otlp.metrics.clear();
    StatusCode::NO_CONTENT
}
