//! The bodies of the fuzz targets in `fuzz/` (cargo-fuzz), kept here so the regression
//! test (`tests/tests/fuzz_regressions.rs`) runs every committed seed and every input
//! that once crashed through exactly the same code on stable Rust.
//!
//! Each takes arbitrary bytes and must return without panicking; what a parser
//! rejects it rejects with an error. Where a result can be checked against itself
//! (a translation must produce JSON; an accepted resource must re-serialise), it is.

use futures_util::FutureExt as _;
use std::sync::Arc;

use proxy_core::formats::chat;
use proxy_core::resources::{Kind, Resource, ResourceKey};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (as in `fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[(&str, Target)] = &[
    ("resource_json", resource_json),
    ("chat_request", chat_request),
    ("guardrail_scan", guardrail_scan),
    ("chat_answer", chat_answer),
    ("messages_request", messages_request),
    ("sse_stream", sse_stream),
    ("etcd_watch", etcd_watch),
    ("pem_bundle", pem_bundle),
    ("aws_event_stream", aws_event_stream),
    ("upstream_answer", upstream_answer),
];

/// A resource document of each kind: parsed and validated.
pub fn resource_json(data: &[u8]) {
    for kind in [
        Kind::ProviderKeys,
        Kind::Models,
        Kind::ApiKeys,
        Kind::Guardrails,
    ] {
        let key = ResourceKey {
            kind,
            id: Arc::from("fuzz"),
        };
        let _ = Resource::parse(&key, data);
    }
}

/// A chat-completions body: parsed as the proxy does, then translated to a messages
/// body; an accepted translation is JSON.
pub fn chat_request(data: &[u8]) {
    let _ = proxy_core::formats::body::RequestBody::parse(data);
    if let Ok(out) = chat::translate_request(
        data,
        &chat::OpenAiChat,
        &chat::AnthropicMessages,
        "upstream-model",
    ) {
        assert!(
            serde_json::from_slice::<serde_json::Value>(&out).is_ok(),
            "chat_to_messages produced invalid JSON"
        );
    }
}

/// A messages body: parsed, then translated to a chat-completions body.
pub fn messages_request(data: &[u8]) {
    let _ = proxy_core::formats::body::RequestBody::parse(data);
    if let Ok(out) = chat::translate_request(
        data,
        &chat::AnthropicMessages,
        &chat::OpenAiChat,
        "upstream-model",
    ) {
        assert!(
            serde_json::from_slice::<serde_json::Value>(&out).is_ok(),
            "messages_to_chat produced invalid JSON"
        );
    }
}

/// A whole upstream answer, translated both ways (Anthropic message to chat completion
/// and back): an accepted answer comes out as a JSON object.
pub fn chat_answer(data: &[u8]) {
    let (openai, anthropic): (&'static chat::OpenAiChat, &'static chat::AnthropicMessages) =
        (&chat::OpenAiChat, &chat::AnthropicMessages);
    for conversion in [
        chat::Conversion::Translate {
            upstream: anthropic,
            caller: openai,
        },
        chat::Conversion::Translate {
            upstream: openai,
            caller: anthropic,
        },
        chat::Conversion::Translate {
            upstream: &chat::GeminiContent,
            caller: openai,
        },
        chat::Conversion::Translate {
            upstream: &chat::GeminiContent,
            caller: anthropic,
        },
        chat::Conversion::Translate {
            upstream: &chat::BedrockConverse,
            caller: openai,
        },
        chat::Conversion::Translate {
            upstream: &chat::BedrockConverse,
            caller: anthropic,
        },
    ] {
        if let Ok(out) = conversion.answer(bytes::Bytes::copy_from_slice(data), "m") {
            assert!(
                serde_json::from_slice::<serde_json::Value>(&out).is_ok_and(|v| v.is_object()),
                "a translated answer is not a JSON object"
            );
        }
    }
}

/// An SSE byte stream, cut at an arbitrary point (the first byte chooses it): event
/// splitting, data lines, the usage filter and the stream translators (a Gemini one
/// continued on another upstream at the cut, as a resumed stream is).
pub fn sse_stream(data: &[u8]) {
    let Some((&cut, run)) = data.split_first() else {
        return;
    };
    let _ = proxy_core::formats::sse::events(run).count();
    let _ = proxy_core::formats::sse::data_lines(run).count();
    let _ = proxy_core::formats::sse::without_usage_chunk(bytes::Bytes::copy_from_slice(run));
    let at = usize::from(cut).min(run.len());
    let (first, second) = run.split_at(at);
    let mut to_openai = chat::StreamTranslator::new(&chat::AnthropicMessages, &chat::OpenAiChat);
    let _ = to_openai.translate(first);
    let _ = to_openai.translate(second);
    let mut to_anthropic = chat::StreamTranslator::new(&chat::OpenAiChat, &chat::AnthropicMessages);
    let _ = to_anthropic.translate(first);
    let _ = to_anthropic.translate(second);
    let mut from_gemini =
        chat::StreamTranslator::following(&chat::GeminiContent, &chat::OpenAiChat);
    let _ = from_gemini.translate(first);
    from_gemini.continue_with(&chat::OpenAiChat, first.len());
    let _ = from_gemini.translate(second);
}

/// Lines of an etcd v3 JSON watch stream.
pub fn etcd_watch(data: &[u8]) {
    for line in data.split(|b| *b == b'\n') {
        let _ = agent::etcd::decode_watch("fuzz", line);
    }
}

/// A certificate bundle from PEM text: the input is split into certificate, key and
/// CA at the first two NUL bytes.
pub fn pem_bundle(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let mut next = || certs::PemSource::Inline(parts.next().unwrap_or_default().to_owned());
    let (cert, key, ca) = (next(), next(), next());
    let _ = certs::Bundle::load(&cert, &key, &ca, time::OffsetDateTime::now_utc());
    let _ = certs::inspect_pem("fuzz", &text);
}

/// The guardrail property: a forbidden word in a message's content is seen by the
/// input scan whatever else the body carries, or the body is refused. The input picks
/// the shape: the first byte a nesting depth, each following byte an array or an
/// object level (its low bit) and where the word goes (its second bit: the message's
/// content, a text part, a nested field).
pub fn guardrail_scan(data: &[u8]) {
    const WORD: &str = "forbidden-fuzz-word";
    let Some((&depth, shape)) = data.split_first() else {
        return;
    };
    let mut nested = String::new();
    let levels: Vec<u8> = (0..usize::from(depth))
        .map(|i| shape.get(i).copied().unwrap_or(0))
        .collect();
    for level in &levels {
        nested.push_str(if level & 1 == 0 { "[" } else { "{\"k\":" });
    }
    nested.push('1');
    for level in levels.iter().rev() {
        nested.push(if level & 1 == 0 { ']' } else { '}' });
    }
    let content = match shape.first().map_or(0, |b| (b >> 1) & 3) {
        0 => format!("\"{WORD}\""),
        1 => format!("[{{\"type\":\"text\",\"text\":\"{WORD}\"}}]"),
        _ => format!(
            "[{{\"type\":\"text\",\"text\":\"x\",\"deep\":{nested}}},{{\"type\":\"text\",\"text\":\"{WORD}\"}}]"
        ),
    };
    let body = format!(
        "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":{content},\"extra\":{nested}}}]}}"
    );
    let Ok(request) = proxy_core::formats::body::RequestBody::parse(body.as_bytes()) else {
        return;
    };
    let spec = serde_json::json!({"name": "fuzz", "patterns": [{"value": WORD}]});
    let Ok(rule) = serde_json::from_value(spec)
        .map_err(|_| ())
        .and_then(|spec| proxy_core::resources::Guardrail::from_spec("g", spec).map_err(|_| ()))
    else {
        unreachable!("the fuzz guardrail is valid")
    };
    let rules = [std::sync::Arc::new(rule)];
    let record = proxy_core::observe::record::Record::new("fuzz".into(), None);
    let metrics = proxy_core::observe::metrics::Metrics::default();
    let detectors = proxy_core::policy::guardrails::Detectors::standalone();
    let chain = proxy_core::policy::guardrails::Chain {
        rules: &rules,
        stage: proxy_core::policy::guardrails::Stage::Input,
        request_id: "fuzz",
        record: &record,
        metrics: &metrics,
        detectors: &detectors,
    };
    // In-process rules never wait: each check is done when first polled.
    let blocked = |checked: Option<Result<Option<bytes::Bytes>, _>>| {
        checked.is_some_and(|c: Result<_, proxy_core::failure::ProxyError>| c.is_err())
    };
    assert!(
        blocked(chain.request(&request).now_or_never()),
        "a body nested {depth} deep was accepted but its text was not blocked"
    );
    assert!(
        blocked(chain.raw(body.as_bytes()).now_or_never()),
        "a passthrough body nested {depth} deep was not blocked"
    );
}

/// An AWS event stream (Bedrock's `converse-stream`), cut at an arbitrary point (the
/// first byte chooses it): framed into server-sent events as it arrives and translated
/// to both caller formats. A frame that does not decode stops the conversion.
pub fn aws_event_stream(data: &[u8]) {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let at = usize::from(cut).min(stream.len());
    let mut frames = proxy_core::formats::eventstream::EventStreamToSse::default();
    let mut to_openai = chat::StreamTranslator::new(&chat::BedrockConverse, &chat::OpenAiChat);
    let mut to_anthropic =
        chat::StreamTranslator::new(&chat::BedrockConverse, &chat::AnthropicMessages);
    for part in [&stream[..at], &stream[at..]] {
        let Ok(events) = frames.push(part) else {
            return;
        };
        let _ = to_openai.translate(&events);
        let _ = to_anthropic.translate(&events);
    }
}

/// The raw HTTP answer of an upstream (everything after the first byte, which says
/// whether the caller streams; `$HERE` stands for the upstream's own address), sent to
/// a real proxy over real sockets. Whatever it is, the proxy never follows a redirect
/// (no request for any other path reaches the upstream), never relays a redirect on a
/// call, relays a whole 2xx only as JSON and a streamed 2xx only as server-sent
/// events, and when it refuses a 2xx or 3xx answer shows nothing of it (`SECRET`, the
/// `Location`).
pub fn upstream_answer(data: &[u8]) {
    let Some((&first, answer)) = data.split_first() else {
        return;
    };
    let rig = answer_rig::rig();
    let answer = String::from_utf8_lossy(answer).replace("$HERE", &rig.upstream);
    let upstream_status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok());
    let stream = first & 1 == 1;
    let (status, content_type, body) = rig.call(answer.into_bytes(), stream);
    for path in rig.paths() {
        assert_eq!(
            path, "/v1/chat/completions",
            "the proxy followed a redirect"
        );
    }
    assert!(
        !(300..400).contains(&status),
        "a redirect was relayed on a call: {status}"
    );
    // A 2xx is relayed with the upstream's status; the proxy's refusals are 4xx/5xx.
    let relayed = (200..300).contains(&status);
    if relayed && !stream {
        assert!(
            serde_json::from_slice::<serde_json::Value>(&body).is_ok(),
            "a whole 2xx that is not JSON was relayed"
        );
    }
    if relayed && stream {
        assert!(
            content_type.starts_with("text/event-stream"),
            "a streamed 2xx that is not server-sent events: {content_type}"
        );
    }
    let refused_success = upstream_status.is_some_and(|s| (200..400).contains(&s));
    if !relayed && refused_success {
        let shown = String::from_utf8_lossy(&body);
        assert!(
            !shown.contains("SECRET"),
            "the refused answer was shown: {shown}"
        );
        assert!(
            !shown.contains("/internal"),
            "the redirect was shown: {shown}"
        );
    }
}

/// A proxy in front of an upstream that answers every request with the bytes it is
/// given, started once per process.
mod answer_rig {
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::Duration;

    use bytes::Bytes;
    use proxy_core::http::{Hooks, ListenerOptions, ProxyOptions, ProxyState, router, serve};
    use proxy_core::providers::client::{Upstream, UpstreamOptions};
    use proxy_core::resources::KeyHash;
    use proxy_core::snapshot::{SnapshotStore, Source, SourceEvent};
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;

    const CALLER: &str = "fuzz-caller-key";

    pub struct Rig {
        runtime: tokio::runtime::Runtime,
        pub upstream: String,
        proxy: String,
        client: reqwest::Client,
        answer: Arc<Mutex<Vec<u8>>>,
        paths: Arc<Mutex<Vec<String>>>,
    }

    pub fn rig() -> &'static Rig {
        static RIG: OnceLock<Rig> = OnceLock::new();
        RIG.get_or_init(start)
    }

    fn start() -> Rig {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let answer = Arc::new(Mutex::new(Vec::new()));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let (upstream, proxy) = runtime.block_on(async {
            let raw = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let upstream = raw.local_addr().expect("addr").to_string();
            let (answer, paths) = (answer.clone(), paths.clone());
            tokio::spawn(async move {
                while let Ok((socket, _)) = raw.accept().await {
                    tokio::spawn(answer_once(socket, answer.clone(), paths.clone()));
                }
            });
            (upstream.clone(), start_proxy(&upstream).await)
        });
        Rig {
            runtime,
            upstream,
            proxy,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(10))
                .build()
                .expect("a client"),
            answer,
            paths,
        }
    }

    async fn start_proxy(upstream: &str) -> String {
        let store = Arc::new(SnapshotStore::new("/aisix"));
        let docs = [
            (
                "provider_keys/raw",
                json!({"display_name": "raw", "provider": "openai", "api_base": format!("http://{upstream}/v1"), "api_key": "sk-raw"}),
            ),
            (
                "models/m",
                json!({"display_name": "m", "model_name": "m", "provider_key_id": "raw"}),
            ),
            (
                "api_keys/k",
                json!({"key_hash": hex::encode(KeyHash::of_plaintext(CALLER).0), "allowed_models": ["*"]}),
            ),
        ];
        let entries = docs
            .into_iter()
            .map(|(k, v)| (format!("/aisix/{k}"), Bytes::from(v.to_string())))
            .collect();
        store.apply(
            Source::File,
            [SourceEvent::Reset {
                entries,
                revision: 1,
            }],
        );
        let options = UpstreamOptions {
            timeout: Duration::from_secs(2),
            ..UpstreamOptions::default()
        };
        let state = ProxyState::new(
            store,
            Upstream::with_options(&options).expect("a client"),
            ProxyOptions::default(),
            CancellationToken::new(),
            Default::default(),
            Hooks::default(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(serve(
            listener,
            router(state),
            CancellationToken::new(),
            ListenerOptions::plain("proxy"),
        ));
        url
    }

    /// Reads one request (its head, and a body of the declared length), notes its
    /// path, writes the answer and closes.
    async fn answer_once(
        mut socket: TcpStream,
        answer: Arc<Mutex<Vec<u8>>>,
        paths: Arc<Mutex<Vec<String>>>,
    ) {
        let mut read = Vec::new();
        let mut buf = [0u8; 8192];
        let head_end = loop {
            if let Some(at) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&read[..head_end]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while read.len() < head_end + length {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
        }
        let path = head
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        lock(&paths).push(path);
        let bytes = lock(&answer).clone();
        let _ = socket.write_all(&bytes).await;
        let _ = socket.shutdown().await;
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    impl Rig {
        /// One chat call answered by `answer`: the caller's status, content type and
        /// body (what arrived of it).
        pub fn call(&self, answer: Vec<u8>, stream: bool) -> (u16, String, Vec<u8>) {
            *lock(&self.answer) = answer;
            lock(&self.paths).clear();
            self.runtime.block_on(async {
                let response = self
                    .client
                    .post(format!("{}/v1/chat/completions", self.proxy))
                    .bearer_auth(CALLER)
                    .json(&json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .expect("the proxy answers");
                let status = response.status().as_u16();
                let content_type = response
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let mut body = Vec::new();
                let mut response = response;
                while let Ok(Some(chunk)) = response.chunk().await {
                    body.extend_from_slice(&chunk);
                }
                (status, content_type, body)
            })
        }

        /// The paths of the requests the upstream received during the last call.
        pub fn paths(&self) -> Vec<String> {
            lock(&self.paths).clone()
        }
    }
}
