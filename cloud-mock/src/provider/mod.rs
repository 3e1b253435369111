//! Mock LLM providers that tests script: one server speaking both the OpenAI shape
//! (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses`,
//! `/v1/rerank`, `/v1/images/generations`, `/v1/audio/*`, `/v1/models`) and the
//! Anthropic shape (`/v1/messages`, `/v1/messages/count_tokens`), each with its own
//! streaming format and error envelope.
//!
//! Each answer follows a [`Script`]: status, error body, `Retry-After`, delay before
//! headers, number of stream chunks and the gap between them, usage numbers, and a drop
//! mid-stream. A script can be set for one upstream model name or as the default.
//! Anthropic-shaped requests with `cache_control` markers are answered as Anthropic's
//! prompt cache would (the marked prefix written on first sight, read after) unless
//! the script sets cache numbers itself. The
//! last [`RECORDED_REQUESTS`] requests received are recorded (method, path, headers,
//! body), so a long run under load keeps its memory bounded. Out-of-process users
//! script it over HTTP: `PUT /_mock/script` (a Script, optionally `?model=NAME`),
//! `GET /_mock/requests`, `DELETE /_mock/requests`.
//!
//! The same server is an OTLP/HTTP receiver (`/v1/traces`, `/v1/metrics`, see `otlp`),
//! so exporters can be tested against it.
//!
//! Layout: this file holds the server, scripts and recording; `openai`, `anthropic`,
//! `azure`, `gemini` (Gemini API and Vertex AI) and `bedrock` the API shapes.

mod anthropic;
pub mod azure;
pub mod bedrock;
pub mod detectors;
mod gemini;
mod openai;
pub mod otlp;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use futures_util::stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How the mock answers a request (any route).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Script {
    /// HTTP status; anything but 2xx answers `error_body`.
    pub status: u16,
    /// Body for error statuses; the route's own error envelope when unset.
    pub error_body: Option<String>,
    /// `Retry-After` header value sent with error statuses.
    pub retry_after: Option<String>,
    /// Wait before sending response headers.
    pub headers_delay_ms: u64,
    /// Gap before each SSE chunk.
    pub chunk_interval_ms: u64,
    /// Content chunks in a stream (the answer text is split across them).
    pub chunks: usize,
    /// Usage block; in streams it is sent as a final chunk.
    pub usage: Option<Usage>,
    /// Close the connection abruptly after this many stream events.
    pub drop_after_chunks: Option<usize>,
    /// With `drop_after_chunks`: send the first half of the next event before the drop.
    pub drop_mid_event: bool,
    /// Wait `pause_ms` once, after this many stream events (a stall mid-answer).
    pub pause_after_chunks: Option<usize>,
    pub pause_ms: u64,
    /// End the stream cleanly after this many events, without its closing event.
    pub end_after_chunks: Option<usize>,
    /// After this many events, send the API's error event and end the stream.
    pub error_after_chunks: Option<usize>,
    /// The answer text.
    pub content: String,
    /// Answer with this tool call instead of text (streams split its arguments).
    pub tool_call: Option<ToolCall>,
    /// The finish reason the answer reports, where the API takes one from the script
    /// (Gemini: `STOP` by default, `SAFETY`, `MAX_TOKENS`...).
    pub finish_reason: Option<String>,
}

/// A function call the mock makes in its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            status: 200,
            error_body: None,
            retry_after: None,
            headers_delay_ms: 0,
            chunk_interval_ms: 0,
            chunks: 3,
            usage: Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 3,
                ..Usage::default()
            }),
            drop_after_chunks: None,
            drop_mid_event: false,
            pause_after_chunks: None,
            pause_ms: 0,
            end_after_chunks: None,
            error_after_chunks: None,
            content: "Hello from the mock provider.".to_owned(),
            tool_call: None,
            finish_reason: None,
        }
    }
}

/// Token counts the mock reports. `prompt_tokens` is every input token; the cached
/// parts are reported in each API's own arithmetic (OpenAI: `cached_tokens`, a part of
/// `prompt_tokens`; Anthropic: `cache_read_input_tokens` and
/// `cache_creation_input_tokens` beside `input_tokens`, which excludes them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
}

/// One request the mock received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub query: Option<String>,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Recorded {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// How many requests are kept for `requests()` and `GET /_mock/requests`: the newest.
pub const RECORDED_REQUESTS: usize = 10_000;

#[derive(Default)]
struct Shared {
    default_script: Script,
    by_model: HashMap<String, Script>,
    requests: VecDeque<Recorded>,
    /// Prompt prefixes "cached" by Anthropic-shaped requests (hashes).
    cached_prefixes: std::collections::HashSet<u64>,
    entra: azure::Entra,
    /// The JWT assertions Google's token endpoint received.
    google_assertions: Vec<String>,
    /// The OTLP receiver.
    otlp: otlp::Sink,
    /// The guardrail detector services.
    detectors: detectors::Detectors,
}

impl Shared {
    fn record(&mut self, request: Recorded) {
        if self.requests.len() == RECORDED_REQUESTS {
            self.requests.pop_front();
        }
        self.requests.push_back(request);
    }

    /// Anthropic's prompt cache, imitated: the prefix of a request up to its last
    /// `cache_control` marker (tools, then system, then messages) is written on first
    /// sight and read after. Its size in tokens (about four bytes each) and whether it
    /// was read; `None` without a marker.
    fn prompt_cache(&mut self, request: &Value) -> Option<(u64, bool)> {
        fn blocks(v: Option<&Value>) -> Vec<&Value> {
            match v {
                Some(Value::Array(items)) => items.iter().collect(),
                Some(other) => vec![other],
                None => Vec::new(),
            }
        }
        let mut parts: Vec<&Value> = Vec::new();
        parts.extend(blocks(request.get("tools")));
        parts.extend(blocks(request.get("system")));
        for message in blocks(request.get("messages")) {
            parts.extend(blocks(message.get("content")));
        }
        let last = parts
            .iter()
            .rposition(|p| p.get("cache_control").is_some())?;
        let prefix: String = parts[..=last].iter().map(|p| p.to_string()).collect();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&prefix, &mut hasher);
        let read = !self
            .cached_prefixes
            .insert(std::hash::Hasher::finish(&hasher));
        Some((prefix.len() as u64 / 4, read))
    }

    fn recorded(&self) -> Vec<Recorded> {
        self.requests.iter().cloned().collect()
    }
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

    /// The requests received, oldest first (the last [`RECORDED_REQUESTS`]).
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared).recorded()
    }

    /// Entra ID tokens minted so far.
    pub fn entra_tokens_minted(&self) -> usize {
        lock(&self.shared).entra.minted
    }

    /// How long the Entra ID tokens minted from now on live.
    pub fn set_entra_token_life(&self, seconds: u64) {
        lock(&self.shared).entra.expires_in = seconds;
    }

    /// The service-account JWTs the Google token endpoint received, in order.
    pub fn google_assertions(&self) -> Vec<String> {
        lock(&self.shared).google_assertions.clone()
    }

    /// How the OTLP receiver answers from now on.
    /// Faults for every guardrail detector route (see `detectors`).
    pub fn set_detector_script(&self, script: detectors::DetectorScript) {
        lock(&self.shared).detectors.script = script;
    }

    pub fn set_otlp_script(&self, script: otlp::OtlpScript) {
        lock(&self.shared).otlp.script = script;
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
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/responses", post(openai::responses))
        .route("/v1/rerank", post(openai::rerank))
        .route("/v1/images/generations", post(openai::images))
        .route("/v1/audio/speech", post(openai::speech))
        .route("/v1/audio/transcriptions", post(openai::transcription))
        .route("/v1/audio/translations", post(openai::transcription))
        .route("/v1/models", get(openai::models))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route(
            "/openai/deployments/{deployment}/{*route}",
            post(azure::deployment),
        )
        .route("/openai/responses", post(azure::responses))
        .route("/v1beta/models/{action}", post(gemini::generate))
        .route(
            "/v1/projects/{project}/locations/{region}/publishers/google/models/{action}",
            post(gemini::vertex),
        )
        .route(
            "/v1/projects/{project}/locations/{region}/publishers/anthropic/models/{action}",
            post(gemini::claude),
        )
        .route("/model/{model}/{action}", post(bedrock::converse))
        .route("/token", post(gemini::token))
        .route("/{tenant}/oauth2/v2.0/token", post(azure::token))
        .route("/_mock/entra", put(set_entra).get(get_entra))
        .route("/v1/traces", post(otlp::traces))
        .route("/v1/metrics", post(otlp::metrics))
        .route("/analyze", post(detectors::analyze))
        .route("/anonymize", post(detectors::anonymize))
        .route("/v1/moderations", post(detectors::moderations))
        .route("/v2/guard", post(detectors::lakera))
        .route(
            "/contentsafety/text:shieldPrompt",
            post(detectors::shield_prompt),
        )
        .route("/contentsafety/text:analyze", post(detectors::analyze_text))
        .route(
            "/guardrail/{id}/version/{version}/apply",
            post(detectors::apply_guardrail),
        )
        .route(
            "/_mock/detectors",
            put(detectors::set_script).get(detectors::calls),
        )
        .route(
            "/_mock/otlp",
            put(otlp::set_script).get(otlp::list).delete(otlp::clear),
        )
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

/// How long the Entra mock's tokens live, and how many it minted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntraState {
    pub expires_in: u64,
    pub minted: usize,
}

async fn set_entra(
    State(shared): State<SharedState>,
    axum::Json(state): axum::Json<EntraState>,
) -> StatusCode {
    let mut s = lock(&shared);
    s.entra.expires_in = state.expires_in;
    s.entra.minted = state.minted;
    StatusCode::NO_CONTENT
}

async fn get_entra(State(shared): State<SharedState>) -> axum::Json<EntraState> {
    let s = lock(&shared);
    axum::Json(EntraState {
        expires_in: s.entra.expires_in,
        minted: s.entra.minted,
    })
}

async fn list_requests(State(shared): State<SharedState>) -> axum::Json<Vec<Recorded>> {
    axum::Json(lock(&shared).recorded())
}

async fn clear_requests(State(shared): State<SharedState>) -> StatusCode {
    lock(&shared).requests.clear();
    StatusCode::NO_CONTENT
}

/// One request as a route handler sees it: recorded, parsed, with its script.
struct Call {
    request: Value,
    model: String,
    stream: bool,
    script: Script,
}

/// Extracting a `Call` records the request, picks its script (by `model`) and waits
/// the script's delay.
impl axum::extract::FromRequest<SharedState> for Call {
    type Rejection = std::convert::Infallible;

    async fn from_request(
        req: axum::extract::Request,
        shared: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        Ok(receive(
            shared,
            &parts.method,
            &parts.uri,
            &parts.headers,
            &body,
            None,
        )
        .await)
    }
}

async fn receive(
    shared: &SharedState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    model: Option<String>,
) -> Call {
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let model = model.unwrap_or_else(|| {
        request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("mock-model")
            .to_owned()
    });
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let script = {
        let mut s = lock(shared);
        s.record(Recorded {
            method: method.to_string(),
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            body: String::from_utf8_lossy(body).into_owned(),
        });
        let mut script = s
            .by_model
            .get(&model)
            .cloned()
            .unwrap_or_else(|| s.default_script.clone());
        // Unless the script says what was cached, Anthropic requests with markers are
        // answered as Anthropic's prompt cache would.
        if uri.path().ends_with("/messages")
            && let Some(usage) = script
                .usage
                .as_mut()
                .filter(|u| u.cache_read_tokens == 0 && u.cache_write_tokens == 0)
            && let Some((tokens, read)) = s.prompt_cache(&request)
        {
            usage.prompt_tokens += tokens;
            if read {
                usage.cache_read_tokens = tokens;
            } else {
                usage.cache_write_tokens = tokens;
            }
        }
        script
    };
    tokio::time::sleep(Duration::from_millis(script.headers_delay_ms)).await;
    Call {
        request,
        model,
        stream,
        script,
    }
}

impl Call {
    fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.script.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The scripted error answer, if the script says to fail; `default_body` builds the
    /// route's own envelope for a status.
    fn error(&self, default_body: impl Fn(StatusCode) -> Value) -> Option<Response> {
        let status = self.status();
        if status.is_success() {
            return None;
        }
        let body = self
            .script
            .error_body
            .clone()
            .unwrap_or_else(|| default_body(status).to_string());
        let mut response =
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if let Some(value) = self
            .script
            .retry_after
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        Some(response)
    }

    /// The answer text. A conversation ending in an assistant message that begins the
    /// script's text (a prefilled answer) gets the rest of it, as a model continuing
    /// its own words would.
    fn content(&self) -> &str {
        let content = self.script.content.as_str();
        let Some(last) = self.request["messages"]
            .as_array()
            .and_then(|m| m.last())
            .filter(|m| m["role"] == "assistant")
        else {
            return content;
        };
        let prefix: String = match &last["content"] {
            Value::String(text) => text.clone(),
            Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect(),
            _ => String::new(),
        };
        if prefix.is_empty() {
            return content;
        }
        content.strip_prefix(prefix.as_str()).unwrap_or(content)
    }

    /// The answer text (or the tool call's arguments) in `chunks` pieces (at least
    /// one).
    fn pieces(&self) -> Vec<String> {
        let text = match &self.script.tool_call {
            Some(call) => &call.arguments,
            None => self.content(),
        };
        split(text, self.script.chunks.max(1))
    }
}

/// One step of a scripted stream.
enum Step {
    Wait(Duration),
    Send(Bytes),
    /// Abort the connection mid-response (an error from the body stream makes hyper
    /// abort it).
    Drop,
}

/// An SSE response sending `events` (already framed) with the script's gap before each,
/// cut short as the script says (see [`framed_stream`]).
fn event_stream(events: Vec<String>, script: &Script, error_event: &str) -> Response {
    let events = events.into_iter().map(Bytes::from).collect();
    framed_stream(
        events,
        script,
        Bytes::copy_from_slice(error_event.as_bytes()),
        "text/event-stream",
    )
}

/// A streamed response of `events` (already framed: server-sent events, AWS
/// event-stream messages) with the script's gap before each, cut short as the script
/// says: a drop (optionally in the middle of an event), a pause, a clean end before the
/// closing event, or `error_event` and an end.
fn framed_stream(
    events: Vec<Bytes>,
    script: &Script,
    error_event: Bytes,
    content_type: &'static str,
) -> Response {
    let gap = Duration::from_millis(script.chunk_interval_ms);
    let mut steps = Vec::new();
    for (i, event) in events.into_iter().enumerate() {
        if script.pause_after_chunks == Some(i) {
            steps.push(Step::Wait(Duration::from_millis(script.pause_ms)));
        }
        if script.error_after_chunks == Some(i) {
            steps.push(Step::Send(error_event));
            break;
        }
        if script.end_after_chunks == Some(i) {
            break;
        }
        steps.push(Step::Wait(gap));
        if script.drop_after_chunks.is_some_and(|n| i >= n) {
            if script.drop_mid_event {
                let half = event.len() / 2;
                // Text is cut on a character boundary.
                let cut = match std::str::from_utf8(&event) {
                    Ok(text) => (0..=half)
                        .rev()
                        .find(|at| text.is_char_boundary(*at))
                        .unwrap_or(0),
                    Err(_) => half,
                };
                steps.push(Step::Send(event.slice(..cut)));
            }
            steps.push(Step::Drop);
            break;
        }
        steps.push(Step::Send(event));
    }
    let body = stream::unfold(steps.into_iter(), |mut steps| async move {
        loop {
            match steps.next()? {
                Step::Wait(wait) => tokio::time::sleep(wait).await,
                Step::Send(event) => return Some((Ok(event), steps)),
                Step::Drop => return Some((Err(std::io::Error::other("scripted drop")), steps)),
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_requests_are_kept() {
        let mut shared = Shared::default();
        for n in 0..RECORDED_REQUESTS + 5 {
            shared.record(Recorded {
                method: "POST".into(),
                path: format!("/v1/{n}"),
                query: None,
                headers: HashMap::new(),
                body: String::new(),
            });
        }
        let kept = shared.recorded();
        assert_eq!(kept.len(), RECORDED_REQUESTS);
        assert_eq!(kept[0].path, "/v1/5", "the oldest went first");
        assert_eq!(
            kept[RECORDED_REQUESTS - 1].path,
            format!("/v1/{}", RECORDED_REQUESTS + 4)
        );
    }
}
