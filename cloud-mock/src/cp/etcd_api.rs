//! The etcd v3 JSON subset the agent's watcher uses, served to gateways and confined to
//! `/aisix/<env_id>/` of the environment in their verified certificate:
//! `POST /v3/kv/range` and streaming `POST /v3/watch` (start revision, progress
//! notifications, compaction answered with `compact_revision`, DELETE events).
//! Keys and values are base64; 64-bit integers are JSON strings, as etcd writes them.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use certs::GatewayIdentity;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use super::ControlPlane;
use super::kv::{Change, Entry, KvError};

/// Keys a gateway of `env` may read.
pub fn env_prefix(env: &str) -> String {
    format!("/aisix/{env}/")
}

/// The end of the key range holding exactly the keys that start with `prefix`.
pub fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0x7f {
            bytes.push(last + 1);
            return String::from_utf8(bytes).unwrap_or_default();
        }
    }
    String::new()
}

fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        N(i64),
        S(String),
    }
    match Option::<Int>::deserialize(d)? {
        None => Ok(0),
        Some(Int::N(n)) => Ok(n),
        Some(Int::S(s)) => s.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RangeRequest {
    key: String,
    range_end: String,
    #[serde(deserialize_with = "int")]
    revision: i64,
    #[serde(deserialize_with = "int")]
    limit: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WatchCreate {
    key: String,
    range_end: String,
    #[serde(deserialize_with = "int")]
    start_revision: i64,
    progress_notify: bool,
}

#[derive(Debug, Deserialize)]
struct WatchRequest {
    create_request: WatchCreate,
}

/// An error in the gateway's JSON error shape.
pub fn gateway_error(status: StatusCode, grpc_code: u16, message: &str) -> Response {
    let body = json!({"error": message, "message": message, "code": grpc_code});
    (status, axum::Json(body)).into_response()
}

/// Why a request is refused before it reaches the store.
#[derive(Debug)]
enum Refusal {
    /// Outside the caller's environment (403, saying nothing about the key).
    Denied,
    BadRequest(String),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Denied => gateway_error(
                StatusCode::FORBIDDEN,
                7,
                "etcdserver: permission denied: the key is outside this gateway's environment",
            ),
            Refusal::BadRequest(message) => gateway_error(StatusCode::BAD_REQUEST, 3, &message),
        }
    }
}

fn bad_request(message: &str) -> Response {
    Refusal::BadRequest(message.to_owned()).into_response()
}

fn decode(field: &str, b64: &str) -> Result<String, Refusal> {
    let bytes = B64
        .decode(b64)
        .map_err(|_| Refusal::BadRequest(format!("{field} is not base64")))?;
    String::from_utf8(bytes).map_err(|_| Refusal::BadRequest(format!("{field} is not UTF-8")))
}

/// Decodes and confines a key range to the environment: `(start, Some(end))` for a
/// range, `(key, None)` for one key.
fn confine(env: &str, key: &str, range_end: &str) -> Result<(String, Option<String>), Refusal> {
    let start = decode("key", key)?;
    let end = if range_end.is_empty() {
        None
    } else {
        Some(decode("range_end", range_end)?)
    };
    let prefix = env_prefix(env);
    let limit = prefix_end(&prefix);
    let inside = start.starts_with(&prefix)
        && end
            .as_deref()
            .is_none_or(|e| e > start.as_str() && e <= limit.as_str());
    if inside {
        Ok((start, end))
    } else {
        Err(Refusal::Denied)
    }
}

fn kv_json(key: &str, e: &Entry) -> Value {
    json!({
        "key": B64.encode(key),
        "value": B64.encode(&e.value),
        "create_revision": e.create_revision.to_string(),
        "mod_revision": e.mod_revision.to_string(),
        "version": e.version.to_string(),
    })
}

fn header(revision: i64) -> Value {
    json!({"cluster_id": "1", "member_id": "1", "revision": revision.to_string(), "raft_term": "1"})
}

fn kv_error(e: &KvError) -> Response {
    let message = format!("etcdserver: {e}");
    gateway_error(StatusCode::BAD_REQUEST, 11, &message)
}

pub async fn range(
    State(cp): State<Arc<ControlPlane>>,
    Extension(peer): Extension<GatewayIdentity>,
    body: Bytes,
) -> Response {
    if let Some(answer) = cp.faults.endpoint_answer("range") {
        return answer;
    }
    let request: RangeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(&format!("invalid range request: {e}")),
    };
    let (start, end) = match confine(&peer.env_id, &request.key, &request.range_end) {
        Ok(r) => r,
        Err(refusal) => return refusal.into_response(),
    };
    match cp.kv.range(&start, end.as_deref(), request.revision) {
        Ok((revision, entries)) => {
            let count = entries.len();
            let limit = usize::try_from(request.limit).unwrap_or(0);
            let more = limit > 0 && count > limit;
            let kvs: Vec<Value> = entries
                .iter()
                .take(if limit > 0 { limit } else { count })
                .map(|(k, e)| kv_json(k, e))
                .collect();
            let mut body = json!({"header": header(revision), "count": count.to_string()});
            if !kvs.is_empty() {
                body["kvs"] = Value::Array(kvs);
            }
            if more {
                body["more"] = json!(true);
            }
            axum::Json(body).into_response()
        }
        Err(e) => kv_error(&e),
    }
}

fn line(message: &Value) -> Bytes {
    let mut text = message.to_string();
    text.push('\n');
    Bytes::from(text)
}

pub async fn watch(
    State(cp): State<Arc<ControlPlane>>,
    Extension(peer): Extension<GatewayIdentity>,
    body: Bytes,
) -> Response {
    if let Some(answer) = cp.faults.endpoint_answer("watch") {
        return answer;
    }
    let request: WatchRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(&format!("invalid watch request: {e}")),
    };
    let create = request.create_request;
    let (start, end) = match confine(&peer.env_id, &create.key, &create.range_end) {
        Ok(r) => r,
        Err(refusal) => return refusal.into_response(),
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(stream_watch(cp.clone(), peer, start, end, create, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Feeds one watch stream until the client goes away, a fault cuts it, or the feed
/// lags (the client then reconnects from its next revision).
async fn stream_watch(
    cp: Arc<ControlPlane>,
    peer: GatewayIdentity,
    start: String,
    end: Option<String>,
    create: WatchCreate,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let matches = |key: &str| match &end {
        Some(end) => key >= start.as_str() && key < end.as_str(),
        None => key == start,
    };
    let send = |message: Value| {
        let tx = tx.clone();
        async move { tx.send(Ok(line(&message))).await.is_ok() }
    };
    let watch = cp.kv.watch(create.start_revision);
    let mut cut = cp.faults.cut_watches.subscribe();
    let mut revocations = cp.revocations.subscribe();
    let start_revision = match &watch {
        Ok(w) => w.revision,
        Err(_) => cp.kv.revision(),
    };
    if !send(json!({"result": {"header": header(start_revision), "created": true}})).await {
        return;
    }
    let mut watch = match watch {
        Ok(w) => w,
        Err(KvError::Compacted { compact_revision }) => {
            let message = json!({"result": {
                "header": header(start_revision),
                "canceled": true,
                "compact_revision": compact_revision.to_string(),
                "cancel_reason": "mvcc: required revision has been compacted",
            }});
            send(message).await;
            return;
        }
        Err(e) => {
            send(json!({"result": {"header": header(start_revision), "canceled": true, "cancel_reason": e.to_string()}})).await;
            return;
        }
    };
    let mut seen = watch.revision;
    let replay: Vec<Arc<Change>> = watch.replay.drain(..).filter(|c| matches(&c.key)).collect();
    if !replay.is_empty() {
        let last = replay.last().map_or(seen, |c| c.revision);
        if !send(events_message(&replay, last.max(seen))).await {
            return;
        }
    }
    let mut ticker = tokio::time::interval(cp.progress_interval());
    ticker.tick().await;
    let mut sent_since_tick = false;
    loop {
        tokio::select! {
            _ = cut.recv() => return,
            _ = revocations.recv() => if cp.is_revoked(&peer) { return },
            () = cp.stopping.cancelled() => return,
            () = tx.closed() => return,
            change = watch.live.recv() => match change {
                Ok(change) => {
                    seen = seen.max(change.revision);
                    if change.revision < create.start_revision || !matches(&change.key) {
                        continue;
                    }
                    if cp.faults.stalled() {
                        continue;
                    }
                    if !send(events_message(&[change], seen)).await {
                        return;
                    }
                    sent_since_tick = true;
                }
                Err(RecvError::Lagged(_) | RecvError::Closed) => return,
            },
            _ = ticker.tick() => {
                if create.progress_notify && !sent_since_tick && !cp.faults.stalled()
                    && !send(json!({"result": {"header": header(seen)}})).await
                {
                    return;
                }
                sent_since_tick = false;
            }
        }
    }
}

fn events_message(changes: &[Arc<Change>], revision: i64) -> Value {
    let events: Vec<Value> = changes
        .iter()
        .map(|c| match &c.entry {
            Some(e) => json!({"kv": kv_json(&c.key, e)}),
            None => json!({"type": "DELETE", "kv": {
                "key": B64.encode(&c.key),
                "mod_revision": c.revision.to_string(),
            }}),
        })
        .collect();
    json!({"result": {"header": header(revision), "events": events}})
}

/// How often progress notifications go out on a quiet watch.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confinement() {
        let b = |s: &str| B64.encode(s);
        assert!(confine("e1", &b("/aisix/e1/"), &b("/aisix/e10")).is_ok());
        assert!(confine("e1", &b("/aisix/e1/models/x"), "").is_ok());
        assert!(confine("e1", &b("/aisix/e2/"), &b("/aisix/e20")).is_err());
        assert!(
            confine("e1", &b("/aisix/e1/"), &b("/aisix/e2")).is_err(),
            "range end beyond the prefix"
        );
        assert!(confine("e1", &b("/aisix/"), &b("/aisix0")).is_err());
        assert!(confine("e1", "not base64!", "").is_err());
        assert_eq!(prefix_end("/aisix/e1/"), "/aisix/e10");
    }
}
