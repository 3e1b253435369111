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
use certs::GatewayIdentity;
use contract::etcd::{
    self, Event, GatewayError, Header, KeyValue, RangeRequest, RangeResponse, WatchCreate,
    WatchRequest, WatchResponse, WatchResult,
};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use super::ControlPlane;
use super::kv::{Change, Entry, KvError, WatchStart};

/// Keys a gateway of `env` may read.
pub fn env_prefix(env: &str) -> String {
    format!("/aisix/{env}/")
}

/// The end of the key range holding exactly the keys that start with `prefix`.
pub fn prefix_end(prefix: &str) -> String {
    String::from_utf8_lossy(&etcd::prefix_end(prefix.as_bytes())).into_owned()
}

/// An error in the gateway's JSON error shape.
pub fn gateway_error(status: StatusCode, grpc_code: u16, message: &str) -> Response {
    (status, axum::Json(GatewayError::new(grpc_code, message))).into_response()
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
    let bytes = etcd::decode(field, b64).map_err(Refusal::BadRequest)?;
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

fn key_value(key: &str, e: &Entry) -> KeyValue {
    KeyValue {
        key: etcd::encode(key),
        value: etcd::encode(&e.value),
        create_revision: e.create_revision,
        mod_revision: e.mod_revision,
        version: e.version,
    }
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
            let kvs = entries
                .iter()
                .take(if limit > 0 { limit } else { count })
                .map(|(k, e)| key_value(k, e))
                .collect();
            axum::Json(RangeResponse {
                header: Header::at(revision),
                kvs,
                more,
                count: i64::try_from(count).unwrap_or(i64::MAX),
            })
            .into_response()
        }
        Err(e) => kv_error(&e),
    }
}

fn line(message: &WatchResponse) -> Bytes {
    let mut text = serde_json::to_vec(message).unwrap_or_default();
    text.push(b'\n');
    Bytes::from(text)
}

fn result(result: WatchResult) -> WatchResponse {
    WatchResponse {
        result: Some(result),
        error: None,
    }
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
    let send = |message: WatchResponse| {
        let tx = tx.clone();
        async move { tx.send(Ok(line(&message))).await.is_ok() }
    };
    let mut cut = cp.faults.cut_watches.subscribe();
    let mut revocations = cp.revocations.subscribe();
    let Some(mut watch) = open(&cp, &create, &tx).await else {
        return;
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
                    && !send(result(WatchResult {
                        header: Header::at(seen),
                        ..WatchResult::default()
                    }))
                    .await
                {
                    return;
                }
                sent_since_tick = false;
            }
        }
    }
}

/// Starts the watch: the `created` answer, then the cancellation when it cannot start
/// (a compacted revision, or another failure).
async fn open(
    cp: &ControlPlane,
    create: &WatchCreate,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Option<WatchStart> {
    let watch = cp.kv.watch(create.start_revision);
    let revision = match &watch {
        Ok(w) => w.revision,
        Err(_) => cp.kv.revision(),
    };
    let send =
        |answer: WatchResult| async move { tx.send(Ok(line(&result(answer)))).await.is_ok() };
    let created = WatchResult {
        header: Header::at(revision),
        created: true,
        ..WatchResult::default()
    };
    if !send(created).await {
        return None;
    }
    let (compact_revision, cancel_reason) = match watch {
        Ok(w) => return Some(w),
        Err(KvError::Compacted { compact_revision }) => (
            compact_revision,
            "mvcc: required revision has been compacted".to_owned(),
        ),
        Err(e) => (0, e.to_string()),
    };
    send(WatchResult {
        header: Header::at(revision),
        canceled: true,
        compact_revision,
        cancel_reason,
        ..WatchResult::default()
    })
    .await;
    None
}

fn events_message(changes: &[Arc<Change>], revision: i64) -> WatchResponse {
    let events = changes
        .iter()
        .map(|c| match &c.entry {
            Some(e) => Event::put(key_value(&c.key, e)),
            None => Event::delete(c.key.as_bytes(), c.revision),
        })
        .collect();
    result(WatchResult {
        header: Header::at(revision),
        events,
        ..WatchResult::default()
    })
}

/// How often progress notifications go out on a quiet watch.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confinement() {
        let b = |s: &str| etcd::encode(s);
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
