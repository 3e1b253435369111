//! The upstream HTTP client every adapter and passthrough share; the adapter adds its
//! credential and reads its error bodies.
//!
//! One pool of keep-alive connections serves every upstream ([`super::connect`]).
//! Non-streaming answers are read whole within the model's `timeout`. A stream is
//! held until its first event (so what fails before it can be retried or failed
//! over), then relayed chunk by chunk, each gap bounded by `stream_timeout`; a cut or
//! a stall after that is a [`StreamBreak`] the caller's stream reports.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, stream};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::{BodyDataStream, BodyExt, Limited};
use hyper::body::Incoming;
use rustls::pki_types::CertificateDer;
use tracing::warn;

use super::connect::{self, Identity, Pool};
use super::provider::{Outgoing, Payload, Provider};
use super::tokens::{TokenSource, Tokens};
use crate::failure::{ProxyError, UpstreamErrorFields};
use crate::formats::eventstream::EventStreamToSse;
use crate::formats::sse::{self, StreamBreak};
use crate::formats::tokens::{self as usage, Read};
use crate::resources::{GoogleAuth, Model, ProviderKey};

/// Used when a model sets no `timeout`: LLM answers can be slow, but not unbounded.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections kept per upstream host by default (nginx's `keepalive 128`):
/// after a burst of thousands of calls the rest close at once, and their buffers
/// (about 20 KiB each) go back, instead of idling for `pool_idle_timeout`.
pub const DEFAULT_POOL_MAX_IDLE: usize = 128;
/// Upstream error bodies larger than this are not read (they are summarised instead).
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The most of a stream held while waiting for its first event.
const MAX_HELD: usize = 1 << 20;

/// The upstream a request goes to: the direct model and its provider key.
pub struct Target<'a> {
    pub model: &'a Arc<Model>,
    pub upstream_model: &'a str,
    pub provider_key: &'a Arc<ProviderKey>,
    /// Read what a whole answer says of itself (its model, finish reasons) with its
    /// usage: the request is traced.
    pub traced: bool,
}

/// A passthrough request: sent as the caller sent it, minus what stays behind.
pub struct Relayed {
    pub method: http::Method,
    pub url: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A successful upstream answer, ready to send back.
pub struct Answer {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Body,
    /// What a whole JSON answer says (its usage; its model and finish reasons when
    /// traced), read while checking it is JSON (`None`: not read).
    pub read: Option<Read>,
}

#[derive(Clone)]
pub struct Upstream {
    /// Provider calls and passthrough go through this pool.
    pool: Pool,
    /// Builds those requests, and makes the gateway's other outbound calls (tokens,
    /// guardrail detectors) with the same TLS configuration.
    client: reqwest::Client,
    /// Tokens minted from provider keys' credentials (Entra ID, service accounts).
    tokens: Arc<Tokens>,
    urls: Arc<Urls>,
    /// Bounds of calls to models that set none of their own.
    timeout: Duration,
    stream_timeout: Option<Duration>,
    default_retries: u32,
}

/// Provider URLs parsed once: a deployment calls a few endpoints again and again,
/// and parsing one (its host through IDNA) costs about a microsecond.
#[derive(Default)]
struct Urls(Mutex<HashMap<String, reqwest::Url>>);

/// Distinct URLs kept at most; past it the map starts again.
const MAX_URLS: usize = 1024;

impl Urls {
    /// `url` parsed, or back unparsed when it is no URL.
    fn parsed(&self, url: String) -> Result<reqwest::Url, String> {
        let mut known = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(parsed) = known.get(&url) {
            return Ok(parsed.clone());
        }
        let Ok(parsed) = reqwest::Url::parse(&url) else {
            return Err(url);
        };
        if known.len() >= MAX_URLS {
            known.clear();
        }
        known.insert(url, parsed.clone());
        Ok(parsed)
    }
}

/// The upstream client's defaults (the config's `upstream` section).
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// A whole answer, or a stream's first event, within this (a model's `timeout`
    /// wins).
    pub timeout: Duration,
    /// The longest gap between stream events (a model's `stream_timeout` wins).
    pub stream_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: Option<usize>,
    /// TCP keep-alive on upstream connections: idle time, probe interval, probes.
    pub tcp_keepalive: Option<Duration>,
    pub tcp_keepalive_interval: Option<Duration>,
    pub tcp_keepalive_retries: Option<u32>,
    /// Retries of a model that sets none of its own.
    pub retries: u32,
    pub tls: UpstreamTls,
}

/// TLS of provider calls beyond the system's roots.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// Trusted besides the system's roots (a private CA, a corporate egress proxy's).
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Presented to providers that ask for a client certificate.
    pub identity: Option<Identity>,
    /// `false` accepts any certificate (never in production; the agent warns).
    pub verify: bool,
}

impl Default for UpstreamTls {
    fn default() -> Self {
        Self {
            extra_roots: Vec::new(),
            identity: None,
            verify: true,
        }
    }
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            stream_timeout: None,
            connect_timeout: CONNECT_TIMEOUT,
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: Some(DEFAULT_POOL_MAX_IDLE),
            tcp_keepalive: None,
            tcp_keepalive_interval: None,
            tcp_keepalive_retries: None,
            retries: 0,
            tls: UpstreamTls::default(),
        }
    }
}

impl Upstream {
    pub fn new() -> Result<Self, String> {
        Self::with_options(&UpstreamOptions::default())
    }

    /// The HTTP client (no redirects followed), for the gateway's other outbound
    /// calls (guardrail detectors).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The client `options` describe; why not, when its TLS settings cannot be used.
    pub fn with_options(options: &UpstreamOptions) -> Result<Self, String> {
        let tls = connect::tls_config(&options.tls)?;
        let mut http1 = tls.clone();
        http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(http1)
            .tcp_nodelay(true)
            .connect_timeout(options.connect_timeout)
            .pool_idle_timeout(options.pool_idle_timeout)
            .tcp_keepalive(options.tcp_keepalive)
            .no_proxy()
            // An upstream's redirect is relayed (passthrough) or refused, never followed:
            // an `api_base` must not be able to point the gateway elsewhere.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(most) = options.pool_max_idle_per_host {
            builder = builder.pool_max_idle_per_host(most);
        }
        if let Some(interval) = options.tcp_keepalive_interval {
            builder = builder.tcp_keepalive_interval(interval);
        }
        if let Some(retries) = options.tcp_keepalive_retries {
            builder = builder.tcp_keepalive_retries(retries);
        }
        Ok(Self {
            pool: connect::pool(options, tls),
            client: builder
                .build()
                .map_err(|e| format!("the HTTP client: {e}"))?,
            tokens: Arc::default(),
            urls: Arc::default(),
            timeout: options.timeout,
            stream_timeout: options.stream_timeout,
            default_retries: options.retries,
        })
    }

    /// A client with a connection pool of its own and the same minted tokens: for a
    /// worker with a runtime of its own (a pool's connections are driven by the
    /// runtime that opened them).
    pub fn with_own_pool(&self, options: &UpstreamOptions) -> Result<Self, String> {
        Ok(Self {
            tokens: self.tokens.clone(),
            ..Self::with_options(options)?
        })
    }

    /// Retries of a model that sets none of its own.
    pub fn default_retries(&self) -> u32 {
        self.default_retries
    }

    /// Sends `outgoing` to the target's provider with the provider's credential.
    pub async fn send(
        &self,
        provider: &dyn Provider,
        target: &Target<'_>,
        outgoing: Outgoing,
        request_id: &str,
    ) -> Result<Answer, ProxyError> {
        let timeout = target.model.timeout.unwrap_or(self.timeout);
        let gap = target.model.stream_timeout.or(self.stream_timeout);
        let url = format!("{}{}", target.provider_key.api_base, outgoing.path);
        let request = match self.urls.parsed(url) {
            Ok(url) => self.client.post(url),
            // reqwest says what is wrong with it, when the request is sent.
            Err(url) => self.client.post(url),
        };
        let request = request
            .headers(outgoing.headers)
            .header("x-aisix-request-id", request_id);
        let request = match outgoing.payload {
            Payload::Json(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.into_reqwest()),
            Payload::Form(form) => request.multipart(form),
        };
        let request = self
            .authorize(provider, target.provider_key, request)
            .await
            .map_err(|detail| ProxyError::ProviderUnreachable {
                model: target.model.name.to_string(),
                detail,
            })?;
        let (stream, json_answer) = (outgoing.stream, outgoing.json_answer);
        let started = tokio::time::Instant::now();
        let response = tokio::time::timeout(timeout, self.pool.request(request))
            .await
            .map_err(|_| ProxyError::Timeout(timeout.as_millis()))?
            .map_err(|e| transport_failure(target, &e, e.is_connect()))?;
        let status = response.status();
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        if !status.is_success() {
            let remaining = timeout.saturating_sub(started.elapsed());
            // Boxed for the same reason as a token's minting: it is the rare path.
            return Err(Box::pin(rejected(provider, target, response, remaining)).await);
        }
        let framed = provider.aws_event_stream();
        if json_answer && stream && !is_stream_type(content_type.as_ref(), framed) {
            let expected = if framed {
                "an AWS event stream"
            } else {
                "server-sent events"
            };
            return Err(misshapen(target, status, expected));
        }
        let mut read = None;
        let body = if stream {
            let mut chunks = Chunks {
                inner: BodyDataStream::new(response.into_body()),
                frames: framed.then(EventStreamToSse::default),
                gap,
                model: target.model.name.clone(),
                request_id: Arc::from(request_id),
            };
            if json_answer {
                let remaining = timeout.saturating_sub(started.elapsed());
                let within = gap.map_or(remaining, |gap| gap.min(remaining));
                let held = chunks.first_event(within).await?;
                chunks.into_body(held)
            } else {
                chunks.into_body(Bytes::new())
            }
        } else {
            let remaining = timeout.saturating_sub(started.elapsed());
            let bytes = tokio::time::timeout(remaining, response.into_body().collect())
                .await
                .map_err(|_| ProxyError::Timeout(timeout.as_millis()))?
                .map_err(|e| transport_failure(target, &e, false))?
                .to_bytes();
            if json_answer {
                let answer = usage::read(&bytes, target.traced)
                    .map_err(|_| misshapen(target, status, "JSON"))?;
                read = Some(answer);
            }
            Body::from(bytes)
        };
        // A checked stream (or a converted event stream) is server-sent events from here
        // on, named as SDKs look for it (an upstream may spell it `Text/Event-Stream`).
        let content_type = match (stream && (framed || json_answer), content_type) {
            (true, _) => Some(HeaderValue::from_static("text/event-stream")),
            (false, content_type) => content_type,
        };
        Ok(Answer {
            status,
            content_type,
            body,
            read,
        })
    }

    /// Adds the key's credential: the adapter's header, or a bearer token (the key's
    /// own, or one minted from its Entra ID client credentials or service account).
    /// Why a token could not be had, when not.
    async fn authorize(
        &self,
        provider: &dyn Provider,
        key: &ProviderKey,
        request: reqwest::RequestBuilder,
    ) -> Result<http::Request<reqwest::Body>, String> {
        let request = provider.authorize(request, key);
        let source = match (&key.entra, key.vertex.as_ref().map(|v| &v.auth)) {
            (Some(entra), _) => Some(TokenSource::Entra(entra.clone())),
            (None, Some(GoogleAuth::ServiceAccount(account))) => {
                Some(TokenSource::Google(account.clone()))
            }
            (None, Some(GoogleAuth::AccessToken(_)) | None) => None,
        };
        let request = match (source, key.vertex.as_ref().map(|v| &v.auth)) {
            (Some(source), _) => {
                // Boxed: minting a token is a whole HTTP call, and its future inline
                // would grow every call's future (held as long as the call) by its size.
                let token = Box::pin(self.tokens.token(&self.client, &source)).await?;
                request.bearer_auth(token.expose())
            }
            (None, Some(GoogleAuth::AccessToken(token))) => request.bearer_auth(token.expose()),
            (None, _) => request,
        };
        let cannot = |e: reqwest::Error| format!("the request cannot be built: {e}");
        let mut request = request.build().map_err(cannot)?;
        provider.sign(&mut request, key)?;
        http::Request::try_from(request).map_err(cannot)
    }

    /// Relays a passthrough request as it is: the provider's credential added, its
    /// answer (errors included) returned unread. Bounded by the upstream timeout
    /// (`upstream.timeout_ms`) until the answer's head arrives.
    pub async fn forward(
        &self,
        provider: &dyn Provider,
        key: &ProviderKey,
        relayed: Relayed,
        request_id: &str,
    ) -> Result<http::Response<Incoming>, ProxyError> {
        let request = self
            .client
            .request(relayed.method, relayed.url)
            .headers(relayed.headers)
            .header("x-aisix-request-id", request_id)
            .body(relayed.body);
        let request = self
            .authorize(provider, key, request)
            .await
            .map_err(|detail| ProxyError::UpstreamFailed {
                detail: format!("passthrough to {}: {detail}", key.provider),
                retry_after: None,
            })?;
        tokio::time::timeout(self.timeout, self.pool.request(request))
            .await
            .map_err(|_| ProxyError::Timeout(self.timeout.as_millis()))?
            .map_err(|e| ProxyError::UpstreamFailed {
                detail: format!("passthrough to {}: {}", key.provider, transport_cause(&e)),
                retry_after: None,
            })
    }
}

/// Whether a stream's content type is the one its framing promises.
fn is_stream_type(content_type: Option<&HeaderValue>, aws_event_stream: bool) -> bool {
    let expected = if aws_event_stream {
        "application/vnd.amazon.eventstream"
    } else {
        "text/event-stream"
    };
    content_type
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with(expected))
}

/// A 2xx answer that is not what the route promises (an HTML page, a cut body): a
/// failed attempt like a 5xx, its body never shown.
fn misshapen(target: &Target<'_>, status: StatusCode, expected: &str) -> ProxyError {
    ProxyError::UpstreamFailed {
        detail: format!(
            "{} answered {status} with a body that is not {expected}",
            target.model.name
        ),
        retry_after: None,
    }
}

/// Maps a non-2xx upstream answer: 5xx become 502 without their body; 4xx keep
/// their status and, for native OpenAI errors, their fields.
async fn rejected(
    provider: &dyn Provider,
    target: &Target<'_>,
    response: http::Response<Incoming>,
    within: Duration,
) -> ProxyError {
    let status = response.status();
    let retry_after = retry_after(response.headers())
        .or_else(|| provider.throttle_hint().filter(|_| status.as_u16() == 429));
    if status.is_server_error() || !status.is_client_error() {
        return ProxyError::UpstreamFailed {
            detail: format!("{} answered {status}", target.model.name),
            retry_after,
        };
    }
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        // About the gateway's provider credential, not the caller's key: say so, and
        // never echo what the provider said about the credential.
        return ProxyError::UpstreamRejected {
            status,
            error: UpstreamErrorFields {
                message: format!(
                    "the upstream provider rejected the gateway's credential for model '{}'",
                    target.model.name
                ),
                kind: "upstream_error".to_owned(),
                param: None,
                code: Some("upstream_authentication_failed".to_owned()),
            },
            retry_after,
        };
    }
    let body = read_bounded(response, within).await;
    let error = provider.error_fields(status.as_u16(), &body);
    ProxyError::UpstreamRejected {
        status,
        error,
        retry_after,
    }
}

/// `Retry-After` as seconds: a number of seconds or an HTTP date (rounded up); else
/// Azure's `retry-after-ms` (rounded up).
pub fn retry_after(headers: &http::HeaderMap) -> Option<u64> {
    let Some(value) = headers.get(header::RETRY_AFTER) else {
        let millis = headers.get("retry-after-ms")?.to_str().ok()?.trim();
        return millis.parse::<u64>().ok().map(|ms| ms.div_ceil(1000));
    };
    let value = value.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(seconds);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let wait = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
}

/// The body, when it arrives whole within `within` and is at most [`MAX_ERROR_BODY`];
/// else nothing.
async fn read_bounded(response: http::Response<Incoming>, within: Duration) -> Bytes {
    let read = Limited::new(response.into_body(), MAX_ERROR_BODY).collect();
    match tokio::time::timeout(within, read).await {
        Ok(Ok(body)) => body.to_bytes(),
        _ => Bytes::new(),
    }
}

fn transport_failure(
    target: &Target<'_>,
    e: &(dyn std::error::Error + 'static),
    connecting: bool,
) -> ProxyError {
    let cause = transport_cause(e);
    if connecting {
        return ProxyError::ProviderUnreachable {
            model: target.model.name.to_string(),
            detail: format!("cannot connect: {cause} ({e})"),
        };
    }
    ProxyError::UpstreamFailed {
        detail: format!("{} transport error: {cause} ({e})", target.model.name),
        retry_after: None,
    }
}

/// What went wrong under a transport error, in an operator's words: refused, a DNS
/// failure, TLS, a timeout, a reset, or the innermost error's own text.
fn transport_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = None;
    let mut source = Some(e);
    while let Some(error) = source {
        source = error.source();
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return format!("TLS handshake failed: {tls}");
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            match io.kind() {
                ConnectionRefused => return "connection refused".to_owned(),
                ConnectionReset | ConnectionAborted | BrokenPipe => {
                    return "connection reset by the upstream".to_owned();
                }
                TimedOut => return "timed out".to_owned(),
                _ => {}
            }
            // An I/O error's `source` skips the error it wraps (rustls's, another
            // I/O error): go through it instead.
            if let Some(inner) = io.get_ref() {
                source = Some(inner);
            }
        }
        let text = error.to_string();
        if text.contains("dns error") || text.contains("failed to lookup address") {
            return format!("DNS lookup failed: {text}");
        }
        innermost = Some(text);
    }
    innermost.unwrap_or_else(|| e.to_string())
}

/// An upstream stream's chunks as they arrive, each gap bounded by `stream_timeout`.
/// A transport error or a longer gap is a [`StreamBreak`] (logged here).
struct Chunks {
    inner: BodyDataStream<Incoming>,
    /// Turns an AWS event stream into server-sent events as it arrives.
    frames: Option<EventStreamToSse>,
    gap: Option<Duration>,
    model: Arc<str>,
    request_id: Arc<str>,
}

impl Chunks {
    /// The next chunk as server-sent events (a converted event stream's partial
    /// message waits for the rest of it).
    async fn next(&mut self) -> Option<Result<Bytes, StreamBreak>> {
        loop {
            let chunk = match self.next_raw().await? {
                Ok(chunk) => chunk,
                Err(broke) => return Some(Err(broke)),
            };
            let Some(frames) = &mut self.frames else {
                return Some(Ok(chunk));
            };
            match frames.push(&chunk) {
                Ok(events) if events.is_empty() => {}
                Ok(events) => return Some(Ok(events)),
                Err(broke) => {
                    warn!(request_id = %self.request_id, model = %self.model, "upstream event stream unreadable");
                    return Some(Err(broke));
                }
            }
        }
    }

    async fn next_raw(&mut self) -> Option<Result<Bytes, StreamBreak>> {
        let next = match self.gap {
            Some(gap) => match tokio::time::timeout(gap, self.inner.next()).await {
                Ok(next) => next,
                Err(_) => {
                    let broke = StreamBreak::Stalled {
                        millis: gap.as_millis(),
                    };
                    warn!(request_id = %self.request_id, model = %self.model, gap_ms = gap.as_millis(), "upstream stream stalled");
                    return Some(Err(broke));
                }
            },
            None => self.inner.next().await,
        };
        match next? {
            Ok(chunk) => Some(Ok(chunk)),
            Err(e) => {
                warn!(request_id = %self.request_id, model = %self.model, error = %e, "upstream stream broke");
                Some(Err(StreamBreak::Cut))
            }
        }
    }

    /// Holds the stream until its first event with data: a stream that fails before
    /// it (breaks, ends, stalls past `within`, or begins with an error event) is a
    /// failed attempt, retried or failed over as if no answer had begun.
    async fn first_event(&mut self, within: Duration) -> Result<Bytes, ProxyError> {
        let failed = |detail: String| ProxyError::UpstreamFailed {
            detail,
            retry_after: None,
        };
        let deadline = tokio::time::Instant::now() + within;
        let mut held = BytesMut::new();
        loop {
            let next = tokio::time::timeout_at(deadline, self.next())
                .await
                .map_err(|_| ProxyError::Timeout(within.as_millis()))?;
            match next {
                Some(Ok(chunk)) => held.extend_from_slice(&chunk),
                Some(Err(StreamBreak::Stalled { .. })) => {
                    return Err(ProxyError::Timeout(within.as_millis()));
                }
                Some(Err(broke)) => {
                    return Err(failed(format!(
                        "{}: {broke}, before its first event",
                        self.model
                    )));
                }
                None => {
                    return Err(failed(format!(
                        "{} ended its stream before its first event",
                        self.model
                    )));
                }
            }
            if held.len() > MAX_HELD {
                return Err(failed(format!(
                    "{} sent {MAX_HELD} bytes without an event",
                    self.model
                )));
            }
            let first = sse::last_event_end(&held).and_then(|end| sse::events(&held[..end]).next());
            if let Some(first) = first {
                if let Some(message) = sse::error_message(&first) {
                    return Err(failed(format!(
                        "{} began its stream with an error: {message}",
                        self.model
                    )));
                }
                return Ok(held.freeze());
            }
        }
    }

    /// The rest of the stream after `held`, as a body whose errors are [`StreamBreak`]s.
    fn into_body(self, held: Bytes) -> Body {
        let rest = stream::unfold(self, |mut chunks| async move {
            chunks.next().await.map(|next| (next, chunks))
        });
        Body::from_stream(stream::once(async { Ok(held) }).chain(rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn failure(url: &str) -> String {
        let upstream = Upstream::with_options(&UpstreamOptions {
            connect_timeout: Duration::from_millis(300),
            ..UpstreamOptions::default()
        })
        .unwrap();
        let request = http::Request::get(url)
            .body(reqwest::Body::from(""))
            .unwrap();
        transport_cause(&upstream.pool.request(request).await.unwrap_err())
    }

    #[tokio::test]
    async fn a_transport_failure_says_what_failed() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        assert_eq!(
            failure(&format!("http://127.0.0.1:{port}/")).await,
            "connection refused"
        );
        // A plain-HTTP server asked for TLS: the handshake fails.
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = plain.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = plain.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = socket.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let tls = failure(&format!("https://{addr}/")).await;
        assert!(tls.starts_with("TLS handshake failed"), "{tls}");
        // A peer that accepts and never answers the handshake: the connect timeout.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
            }
        });
        assert_eq!(failure(&format!("https://{addr}/")).await, "timed out");
    }
}
