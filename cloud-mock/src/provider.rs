//! A mock OpenAI-shaped LLM provider that tests script.
//!
//! Each answer follows a [`Script`]: status, error body, delay before headers, number
//! of SSE chunks and the gap between them, usage block, and a drop mid-stream. A script
//! can be set for one upstream model name or as the default. Every request received is
//! recorded. Out-of-process users script it over HTTP:
//! `PUT /_mock/script` (a Script, optionally `?model=NAME`), `GET /_mock/requests`,
//! `DELETE /_mock/requests`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, put};
use futures_util::stream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How the mock answers a chat-completions request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Script {
    /// HTTP status; anything but 2xx answers `error_body`.
    pub status: u16,
    /// Body for error statuses; an OpenAI-style error when unset.
    pub error_body: Option<String>,
    /// Wait before sending response headers.
    pub headers_delay_ms: u64,
    /// Gap before each SSE chunk.
    pub chunk_interval_ms: u64,
    /// Content chunks in a stream (the answer text is split across them).
    pub chunks: usize,
    /// Usage block; in streams it is sent as a final chunk.
    pub usage: Option<Usage>,
    /// Close the connection abruptly after this many chunks.
    pub drop_after_chunks: Option<usize>,
    /// The answer text.
    pub content: String,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            status: 200,
            error_body: None,
            headers_delay_ms: 0,
            chunk_interval_ms: 0,
            chunks: 3,
            usage: Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 3,
            }),
            drop_after_chunks: None,
            content: "Hello from the mock provider.".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One request the mock received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Recorded {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct Shared {
    default_script: Script,
    by_model: HashMap<String, Script>,
    requests: Vec<Recorded>,
}

/// A running mock provider. Dropping it stops the server.
pub struct MockProvider {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl MockProvider {
    /// Binds `addr` (use port 0 for an ephemeral port) and starts serving.
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self::serve(listener))
    }

    pub fn serve(listener: TcpListener) -> Self {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let app = router(shared.clone());
        let shutdown = stop.clone();
        tasks.spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
        });
        tasks.close();
        Self {
            addr,
            shared,
            stop,
            tasks,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, e.g. `http://127.0.0.1:PORT` (usable as a provider key's `api_base`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_script(&self, script: Script) {
        lock(&self.shared).default_script = script;
    }

    pub fn set_script_for(&self, upstream_model: &str, script: Script) {
        lock(&self.shared)
            .by_model
            .insert(upstream_model.to_owned(), script);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared).requests.clone()
    }

    /// Stops accepting and waits for open responses to finish.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type SharedState = Arc<Mutex<Shared>>;

fn router(shared: SharedState) -> Router {
    Router::new()
        .route("/_mock/script", put(set_script))
        .route("/_mock/requests", get(list_requests).delete(clear_requests))
        .route("/v1/chat/completions", any(chat))
        .route("/v1/models", get(models))
        .with_state(shared)
}

#[derive(Deserialize)]
struct ScriptQuery {
    model: Option<String>,
}

async fn set_script(
    State(shared): State<SharedState>,
    Query(q): Query<ScriptQuery>,
    axum::Json(script): axum::Json<Script>,
) -> StatusCode {
    let mut s = lock(&shared);
    match q.model {
        Some(model) => {
            s.by_model.insert(model, script);
        }
        None => s.default_script = script,
    }
    StatusCode::NO_CONTENT
}

async fn list_requests(State(shared): State<SharedState>) -> axum::Json<Vec<Recorded>> {
    axum::Json(lock(&shared).requests.clone())
}

async fn clear_requests(State(shared): State<SharedState>) -> StatusCode {
    lock(&shared).requests.clear();
    StatusCode::NO_CONTENT
}

async fn models() -> axum::Json<Value> {
    axum::Json(
        json!({"object": "list", "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "mock"}]}),
    )
}

async fn chat(
    State(shared): State<SharedState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_owned();
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let script = {
        let mut s = lock(&shared);
        s.requests.push(Recorded {
            method: method.to_string(),
            path: uri.path().to_owned(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        s.by_model
            .get(&model)
            .cloned()
            .unwrap_or_else(|| s.default_script.clone())
    };
    tokio::time::sleep(Duration::from_millis(script.headers_delay_ms)).await;
    let status = StatusCode::from_u16(script.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if !status.is_success() {
        let body = script.error_body.clone().unwrap_or_else(|| {
            json!({"error": {"message": format!("mock error {}", status.as_u16()), "type": "mock_error", "param": null, "code": "mock"}})
                .to_string()
        });
        return (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    }
    if stream {
        sse(&script, &model)
    } else {
        let usage = script.usage.map(usage_json);
        let body = json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": unix_now(),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": script.content}, "finish_reason": "stop"}],
            "usage": usage,
        });
        (status, axum::Json(body)).into_response()
    }
}

fn sse(script: &Script, model: &str) -> Response {
    let pieces = split(&script.content, script.chunks.max(1));
    let created = unix_now();
    let mut events: Vec<String> = pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let delta = if i == 0 {
                json!({"role": "assistant", "content": piece})
            } else {
                json!({"content": piece})
            };
            let finish = if i + 1 == pieces.len() {
                json!("stop")
            } else {
                Value::Null
            };
            chunk(
                model,
                created,
                json!([{"index": 0, "delta": delta, "finish_reason": finish}]),
                None,
            )
        })
        .collect();
    if let Some(usage) = script.usage {
        events.push(chunk(model, created, json!([]), Some(usage_json(usage))));
    }
    events.push("data: [DONE]\n\n".to_owned());
    let drop_after = script.drop_after_chunks;
    let gap = Duration::from_millis(script.chunk_interval_ms);
    let items = events.into_iter().enumerate();
    let body = stream::unfold(items, move |mut items| async move {
        let (i, event) = items.next()?;
        tokio::time::sleep(gap).await;
        if drop_after.is_some_and(|n| i >= n) {
            // An error from the body stream makes hyper abort the connection mid-response.
            return Some((Err(std::io::Error::other("scripted drop")), items));
        }
        Some((Ok::<_, std::io::Error>(Bytes::from(event)), items))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn chunk(model: &str, created: u64, choices: Value, usage: Option<Value>) -> String {
    let mut c = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices});
    if let Some(usage) = usage {
        c["usage"] = usage;
    }
    format!("data: {c}\n\n")
}

fn usage_json(u: Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.prompt_tokens + u.completion_tokens})
}

/// Splits `text` into `n` pieces on character boundaries (some may be empty).
fn split(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(n).max(1);
    (0..n)
        .map(|i| chars.iter().skip(i * size).take(size).collect())
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
