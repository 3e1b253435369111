//! A small etcd v3 client over etcd's JSON HTTP gateway (`/v3/kv/range`, `/v3/kv/put`,
//! `/v3/kv/deleterange`, `/v3/watch`, `/v3/auth/authenticate`). The same subset is what
//! the control plane serves over mutual TLS, so managed mode uses this client too.
//!
//! Keys and values travel base64-encoded; 64-bit integers may arrive as JSON strings
//! (etcd) or numbers (other servers), and fields at their default value may be absent.
//! Unary requests try the endpoints in order, starting with the last one that answered,
//! and move on after a transport failure or a 502/503/504; each attempt is bounded by
//! the request timeout, each connection by the dial timeout.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::{Bytes, BytesMut};
use contract::etcd::{self, RangeRequest, RangeResponse, WatchCreate, WatchRequest, WatchResponse};
use proxy_core::secret::Secret;
use proxy_core::snapshot::SourceEvent;
use reqwest::{StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

/// How many keys one range page asks for.
const PAGE: i64 = 1000;
/// Largest single watch message accepted (one line of the stream).
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("{endpoint}: {message}")]
    Transport { endpoint: String, message: String },
    #[error("{endpoint} answered {status}: {message}")]
    Status {
        endpoint: String,
        status: u16,
        message: String,
    },
    #[error("{endpoint}: malformed answer: {message}")]
    Malformed { endpoint: String, message: String },
    #[error("cannot build the etcd client: {0}")]
    Setup(String),
}

impl EtcdError {
    /// Worth trying the next endpoint.
    fn elsewhere(&self) -> bool {
        match self {
            EtcdError::Transport { .. } => true,
            EtcdError::Status { status, .. } => matches!(status, 502..=504),
            _ => false,
        }
    }

    fn unauthenticated(&self) -> bool {
        matches!(self, EtcdError::Status { status: 401, .. })
            || matches!(self, EtcdError::Status { message, .. }
                if message.contains("auth token") || message.contains("user name is empty"))
    }

    /// Whether the request was refused because history was compacted.
    pub fn compacted(&self) -> bool {
        matches!(self, EtcdError::Status { message, .. } if message.contains("compacted"))
    }
}

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub dial_timeout: Duration,
    pub request_timeout: Duration,
    pub credentials: Option<(String, Secret)>,
    pub tls: Option<rustls::ClientConfig>,
}

pub struct EtcdClient {
    http: reqwest::Client,
    endpoints: Vec<Url>,
    preferred: AtomicUsize,
    request_timeout: Duration,
    credentials: Option<(String, Secret)>,
    token: Mutex<Option<String>>,
}

/// One key-value pair with its last modification revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    pub mod_revision: i64,
}

/// A full listing of a prefix at one revision.
#[derive(Debug, Clone)]
pub struct Listing {
    pub revision: i64,
    pub kvs: Vec<KeyValue>,
}

impl EtcdClient {
    pub fn new(options: EtcdOptions) -> Result<Self, EtcdError> {
        proxy_core::install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(options.dial_timeout)
            .tcp_keepalive(Duration::from_secs(30))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("aisix-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(tls) = options.tls {
            builder = builder.tls_backend_preconfigured(tls);
        }
        let http = builder
            .build()
            .map_err(|e| EtcdError::Setup(e.to_string()))?;
        Self::with_http(
            http,
            &options.endpoints,
            options.request_timeout,
            options.credentials,
        )
    }

    /// A client over a prepared HTTP client (for example one presenting a gateway
    /// certificate to the control plane).
    pub fn with_http(
        http: reqwest::Client,
        endpoints: &[String],
        request_timeout: Duration,
        credentials: Option<(String, Secret)>,
    ) -> Result<Self, EtcdError> {
        let endpoints = endpoints
            .iter()
            .map(|e| {
                Url::parse(e.trim_end_matches('/'))
                    .map_err(|err| EtcdError::Setup(format!("endpoint '{e}': {err}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(EtcdError::Setup("no endpoints".to_owned()));
        }
        Ok(Self {
            http,
            endpoints,
            preferred: AtomicUsize::new(0),
            request_timeout,
            credentials,
            token: Mutex::new(None),
        })
    }

    /// Every key under `prefix` at one revision, read page by page.
    pub async fn list(&self, prefix: &str) -> Result<Listing, EtcdError> {
        let end = etcd::encode(etcd::prefix_end(prefix.as_bytes()));
        let mut start = prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut kvs = Vec::new();
        loop {
            let body = RangeRequest {
                key: etcd::encode(&start),
                range_end: end.clone(),
                revision,
                limit: PAGE,
                ..RangeRequest::default()
            };
            let page: RangeResponse = self.call("/v3/kv/range", &json(&body)).await?;
            if revision == 0 {
                revision = page.header.revision;
            }
            let last = page.kvs.last().map(|kv| kv.key.clone());
            for kv in page.kvs {
                kvs.push(decode_kv(kv)?);
            }
            match last {
                Some(last) if page.more => {
                    start = B64.decode(last).unwrap_or_default();
                    start.push(0);
                }
                _ => break,
            }
        }
        Ok(Listing { revision, kvs })
    }

    /// How many keys are under `prefix` at `revision` (0: the newest), and the store's
    /// revision when etcd answered.
    pub async fn count(&self, prefix: &str, revision: i64) -> Result<(i64, i64), EtcdError> {
        let body = RangeRequest {
            key: etcd::encode(prefix),
            range_end: etcd::encode(etcd::prefix_end(prefix.as_bytes())),
            revision,
            count_only: true,
            ..RangeRequest::default()
        };
        let page: RangeResponse = self.call("/v3/kv/range", &json(&body)).await?;
        Ok((page.count, page.header.revision))
    }

    /// Whether a key under `prefix`, as of `revision`, was modified at `since` or later
    /// (etcd filters by modification before it limits; its count would not).
    pub async fn modified_since(
        &self,
        prefix: &str,
        revision: i64,
        since: i64,
    ) -> Result<bool, EtcdError> {
        let body = RangeRequest {
            key: etcd::encode(prefix),
            range_end: etcd::encode(etcd::prefix_end(prefix.as_bytes())),
            revision,
            limit: 1,
            keys_only: true,
            min_mod_revision: since,
            ..RangeRequest::default()
        };
        let page: RangeResponse = self.call("/v3/kv/range", &json(&body)).await?;
        Ok(!page.kvs.is_empty())
    }

    /// One key, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let body = RangeRequest {
            key: etcd::encode(key),
            ..RangeRequest::default()
        };
        let page: RangeResponse = self.call("/v3/kv/range", &json(&body)).await?;
        page.kvs.into_iter().next().map(decode_kv).transpose()
    }

    /// Writes `key`; returns the revision of the write.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<i64, EtcdError> {
        let body = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        let answer: WriteResponse = self.call("/v3/kv/put", &body).await?;
        Ok(answer.header.revision)
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, EtcdError> {
        let body = json!({ "key": B64.encode(key) });
        let answer: WriteResponse = self.call("/v3/kv/deleterange", &body).await?;
        Ok(answer.deleted > 0)
    }

    /// Opens a watch on `prefix` from `start_revision`, with progress notifications.
    pub async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, EtcdError> {
        let body = WatchRequest {
            create_request: WatchCreate {
                key: etcd::encode(prefix),
                range_end: etcd::encode(etcd::prefix_end(prefix.as_bytes())),
                start_revision,
                progress_notify: true,
            },
        };
        let (endpoint, response) = self.send("/v3/watch", &json(&body), None).await?;
        Ok(WatchStream {
            endpoint,
            response,
            buffer: BytesMut::new(),
        })
    }

    /// A unary request, failing over between endpoints.
    async fn call<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, EtcdError> {
        let (endpoint, response) = self.send(path, body, Some(self.request_timeout)).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|e| transport(&endpoint, &e))?;
        serde_json::from_slice(&bytes).map_err(|e| EtcdError::Malformed {
            endpoint,
            message: e.to_string(),
        })
    }

    /// Sends to the preferred endpoint, then the others; re-authenticates once when the
    /// token is missing or expired. Returns the endpoint and a successful response.
    async fn send(
        &self,
        path: &str,
        body: &Value,
        timeout: Option<Duration>,
    ) -> Result<(String, reqwest::Response), EtcdError> {
        let first = self.preferred.load(Ordering::Relaxed);
        let mut last_error = None;
        for i in 0..self.endpoints.len() {
            let index = (first + i) % self.endpoints.len();
            let base = &self.endpoints[index];
            let mut result = self.send_to(base, path, body, timeout).await;
            if self.credentials.is_some() && result.as_ref().is_err_and(EtcdError::unauthenticated)
            {
                *lock(&self.token) = None;
                result = self.send_to(base, path, body, timeout).await;
            }
            match result {
                Ok(response) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok((base.to_string(), response));
                }
                Err(e) if e.elsewhere() => {
                    tracing::debug!(endpoint = %base, error = %e, "etcd endpoint failed; trying the next");
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| EtcdError::Setup("no endpoints".to_owned())))
    }

    async fn send_to(
        &self,
        base: &Url,
        path: &str,
        body: &Value,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, EtcdError> {
        let endpoint = base.as_str();
        let mut request = self.http.post(join(base, path)).json(body);
        if let Some(t) = timeout {
            request = request.timeout(t);
        }
        if let Some(token) = self.token(base).await? {
            request = request.header(reqwest::header::AUTHORIZATION, token);
        }
        let response = request.send().await.map_err(|e| transport(endpoint, &e))?;
        check_status(endpoint, response).await
    }

    /// The auth token, fetched when credentials are configured and none is held.
    async fn token(&self, base: &Url) -> Result<Option<String>, EtcdError> {
        let Some((name, password)) = &self.credentials else {
            return Ok(None);
        };
        if let Some(token) = lock(&self.token).clone() {
            return Ok(Some(token));
        }
        let body = json!({ "name": name, "password": password.expose() });
        let endpoint = base.as_str();
        let response = self
            .http
            .post(join(base, "/v3/auth/authenticate"))
            .timeout(self.request_timeout)
            .json(&body)
            .send()
            .await
            .map_err(|e| transport(endpoint, &e))?;
        let response = check_status(endpoint, response).await?;
        let answer: AuthResponse = response.json().await.map_err(|e| EtcdError::Malformed {
            endpoint: endpoint.to_owned(),
            message: e.to_string(),
        })?;
        *lock(&self.token) = Some(answer.token.clone());
        Ok(Some(answer.token))
    }
}

/// A watch stream: one decoded message at a time.
pub struct WatchStream {
    endpoint: String,
    response: reqwest::Response,
    buffer: BytesMut,
}

/// What one watch response means.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchMessage {
    Created {
        revision: i64,
    },
    Events {
        revision: i64,
        events: Vec<SourceEvent>,
    },
    /// Everything up to `revision` has been delivered.
    Progress {
        revision: i64,
    },
    /// The start revision was compacted; the watch is over and a full list is needed.
    Compacted {
        compact_revision: i64,
    },
    Canceled {
        reason: String,
    },
}

impl WatchStream {
    /// The next message, or `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<WatchMessage>, EtcdError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line = self.buffer.split_to(end + 1);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return decode_watch(&self.endpoint, &line).map(Some);
            }
            if self.buffer.len() > MAX_MESSAGE {
                return Err(EtcdError::Malformed {
                    endpoint: self.endpoint.clone(),
                    message: format!("watch message larger than {MAX_MESSAGE} bytes"),
                });
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                Ok(None) if self.buffer.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                Ok(None) => {
                    let rest = self.buffer.split();
                    return decode_watch(&self.endpoint, &rest).map(Some);
                }
                Err(e) => return Err(transport(&self.endpoint, &e)),
            }
        }
    }
}

/// Decodes one line of a watch stream.
pub fn decode_watch(endpoint: &str, line: &[u8]) -> Result<WatchMessage, EtcdError> {
    let malformed = |message: String| EtcdError::Malformed {
        endpoint: endpoint.to_owned(),
        message,
    };
    let envelope: WatchResponse =
        serde_json::from_slice(line).map_err(|e| malformed(format!("watch message: {e}")))?;
    if let Some(error) = envelope.error {
        return Err(EtcdError::Status {
            endpoint: endpoint.to_owned(),
            status: error.http_code.unwrap_or(500),
            message: error.message,
        });
    }
    let r = envelope
        .result
        .ok_or_else(|| malformed("watch message without result".to_owned()))?;
    let revision = r.header.revision;
    if r.compact_revision > 0 {
        return Ok(WatchMessage::Compacted {
            compact_revision: r.compact_revision,
        });
    }
    if r.canceled {
        return Ok(WatchMessage::Canceled {
            reason: r.cancel_reason,
        });
    }
    if r.created {
        return Ok(WatchMessage::Created { revision });
    }
    if r.events.is_empty() {
        return Ok(WatchMessage::Progress { revision });
    }
    let mut events = Vec::with_capacity(r.events.len());
    for e in r.events {
        let kv = decode_kv(e.kv).map_err(|e| malformed(e.to_string()))?;
        events.push(match e.kind.as_deref() {
            Some("DELETE") => SourceEvent::Delete {
                key: kv.key,
                revision: kv.mod_revision,
            },
            None | Some("PUT") => SourceEvent::Put {
                key: kv.key,
                value: kv.value,
                revision: kv.mod_revision,
            },
            Some(other) => return Err(malformed(format!("unknown event type '{other}'"))),
        });
    }
    Ok(WatchMessage::Events { revision, events })
}

fn join(base: &Url, path: &str) -> String {
    format!("{}{path}", base.as_str().trim_end_matches('/'))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn transport(endpoint: &str, e: &reqwest::Error) -> EtcdError {
    let message = if e.is_timeout() {
        "timed out".to_owned()
    } else {
        let mut message = String::from(if e.is_connect() {
            "cannot connect"
        } else {
            "request failed"
        });
        let mut source = std::error::Error::source(e);
        let mut innermost = None;
        while let Some(s) = source {
            innermost = Some(s.to_string());
            source = s.source();
        }
        if let Some(cause) = innermost {
            message.push_str(": ");
            message.push_str(&cause);
        }
        message
    };
    EtcdError::Transport {
        endpoint: endpoint.to_owned(),
        message,
    }
}

async fn check_status(
    endpoint: &str,
    response: reqwest::Response,
) -> Result<reqwest::Response, EtcdError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.bytes().await.unwrap_or_default();
    let message = serde_json::from_slice::<etcd::GatewayError>(&body)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    Err(EtcdError::Status {
        endpoint: endpoint.to_owned(),
        status: if status == StatusCode::OK {
            500
        } else {
            status.as_u16()
        },
        message,
    })
}

/// etcd's gateway encodes 64-bit integers as strings; accept numbers too.
fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        N(i64),
        S(String),
    }
    match Int::deserialize(d)? {
        Int::N(n) => Ok(n),
        Int::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

/// `/v3/kv/put` and `/v3/kv/deleterange` (self-hosted writes; not in the control
/// plane's subset).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WriteResponse {
    header: etcd::Header,
    #[serde(deserialize_with = "int")]
    deleted: i64,
}

#[derive(Debug, Deserialize)]
struct AuthResponse {
    token: String,
}

/// A key and value from the wire: base64 decoded, the key as UTF-8.
fn decode_kv(kv: etcd::KeyValue) -> Result<KeyValue, EtcdError> {
    let malformed = |message: String| EtcdError::Malformed {
        endpoint: String::new(),
        message,
    };
    let key = etcd::decode("key", &kv.key).map_err(malformed)?;
    let key = String::from_utf8(key).map_err(|_| malformed("key is not UTF-8".to_owned()))?;
    let value = etcd::decode(&format!("value of {key}"), &kv.value).map_err(malformed)?;
    Ok(KeyValue {
        key,
        value: Bytes::from(value),
        mod_revision: kv.mod_revision,
    })
}

fn json(body: &impl serde::Serialize) -> Value {
    serde_json::to_value(body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        B64.encode(s)
    }

    #[test]
    fn watch_messages_decode() {
        let created = br#"{"result":{"header":{"revision":"7"},"created":true}}"#;
        assert_eq!(
            decode_watch("e", created).unwrap(),
            WatchMessage::Created { revision: 7 }
        );
        let progress = br#"{"result":{"header":{"cluster_id":"1","revision":"9"}}}"#;
        assert_eq!(
            decode_watch("e", progress).unwrap(),
            WatchMessage::Progress { revision: 9 }
        );
        let events = format!(
            r#"{{"result":{{"header":{{"revision":12}},"events":[{{"kv":{{"key":"{}","value":"{}","mod_revision":"11"}}}},{{"type":"DELETE","kv":{{"key":"{}","mod_revision":"12"}}}}]}}}}"#,
            b64("/aisix/models/a"),
            b64("{}"),
            b64("/aisix/models/b")
        );
        let WatchMessage::Events { revision, events } =
            decode_watch("e", events.as_bytes()).unwrap()
        else {
            panic!("expected events");
        };
        assert_eq!(revision, 12);
        assert!(
            matches!(&events[0], SourceEvent::Put { key, revision: 11, .. } if key == "/aisix/models/a")
        );
        assert!(
            matches!(&events[1], SourceEvent::Delete { key, revision: 12 } if key == "/aisix/models/b")
        );
        let compacted =
            br#"{"result":{"header":{"revision":"30"},"canceled":true,"compact_revision":"25"}}"#;
        assert_eq!(
            decode_watch("e", compacted).unwrap(),
            WatchMessage::Compacted {
                compact_revision: 25
            }
        );
        let error = br#"{"error":{"grpc_code":14,"http_code":503,"message":"no leader"}}"#;
        assert!(matches!(
            decode_watch("e", error),
            Err(EtcdError::Status { status: 503, .. })
        ));
        assert!(matches!(
            decode_watch("e", b"{\"result\":"),
            Err(EtcdError::Malformed { .. })
        ));
        let bad_type = format!(
            r#"{{"result":{{"events":[{{"type":"MOVE","kv":{{"key":"{}"}}}}]}}}}"#,
            b64("k")
        );
        assert!(decode_watch("e", bad_type.as_bytes()).is_err());
    }
}
