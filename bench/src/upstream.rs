//! The fast mock upstream: an OpenAI-compatible `/v1/chat/completions` that costs as
//! little as possible, so the figures measure the proxy and not the provider.
//!
//! Bodies are built once at start; connections are kept alive with TCP_NODELAY; one
//! thread serves everything (the harness pins it beside the load generator). A request
//! whose body asks for `"stream":true` gets `--sse-chunks` content events, one every
//! `--sse-interval-us`, then a finish event, a usage event and `[DONE]`. `POST
//! /v1/traces` is an OTLP/HTTP receiver that accepts and drops every export. Bedrock's
//! `/model/{id}/converse` and Gemini's `...:generateContent` get a whole answer of
//! their own shape (signatures and keys are not checked), for the translated rows.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Debug, Clone, clap::Args)]
pub struct UpstreamArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub addr: SocketAddr,
    /// Delay before every answer, in microseconds.
    #[arg(long, default_value_t = 0)]
    pub delay_us: u64,
    /// Content events in a streamed answer.
    #[arg(long, default_value_t = 50)]
    pub sse_chunks: usize,
    /// Gap between streamed events, in microseconds.
    #[arg(long, default_value_t = 2000)]
    pub sse_interval_us: u64,
}

struct Bodies {
    json: Bytes,
    /// Bedrock's Converse and Gemini's generateContent answers, for translated calls.
    converse: Bytes,
    gemini: Bytes,
    events: Vec<Bytes>,
    delay: Duration,
    interval: Duration,
}

type Body = BoxBody<Bytes, Infallible>;

pub fn run(args: UpstreamArgs) -> std::io::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: UpstreamArgs) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.addr).await?;
    println!("upstream listening on {}", listener.local_addr()?);
    let bodies = Arc::new(Bodies::new(&args));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("upstream: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let bodies = bodies.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, bodies.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

impl Bodies {
    fn new(args: &UpstreamArgs) -> Self {
        let chunk = |delta: &str, finish: &str| {
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"up-bench\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]}}\n\n"
            ))
        };
        let mut events: Vec<Bytes> = (0..args.sse_chunks)
            .map(|i| chunk(&format!("{{\"content\":\"token{i} \"}}"), "null"))
            .collect();
        events.push(chunk("{}", "\"stop\""));
        events.push(Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"up-bench\",\"choices\":[],\"usage\":{{\"prompt_tokens\":9,\"completion_tokens\":{},\"total_tokens\":{}}}}}\n\n",
            args.sse_chunks,
            args.sse_chunks + 9
        )));
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        Self {
            json: Bytes::from_static(
                br#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"up-bench","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}"#,
            ),
            converse: Bytes::from_static(
                br#"{"output":{"message":{"role":"assistant","content":[{"text":"Hello! How can I help you today?"}]}},"stopReason":"end_turn","usage":{"inputTokens":9,"outputTokens":9,"totalTokens":18},"metrics":{"latencyMs":1}}"#,
            ),
            gemini: Bytes::from_static(
                br#"{"candidates":[{"content":{"role":"model","parts":[{"text":"Hello! How can I help you today?"}]},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":9,"candidatesTokenCount":9,"totalTokenCount":18},"modelVersion":"gemini-bench","responseId":"bench"}"#,
            ),
            events,
            delay: Duration::from_micros(args.delay_us),
            interval: Duration::from_micros(args.sse_interval_us),
        }
    }
}

async fn answer(req: Request<Incoming>, bodies: Arc<Bodies>) -> Result<Response<Body>, Infallible> {
    // Also the collector of the traced gateway: exports are taken and dropped.
    let otlp = req.uri().path() == "/v1/traces";
    let translated = match req.uri().path() {
        p if p.ends_with("/converse") => Some(bodies.converse.clone()),
        p if p.ends_with(":generateContent") => Some(bodies.gemini.clone()),
        _ => None,
    };
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    if otlp {
        return Ok(Response::builder()
            .header("content-type", "application/x-protobuf")
            .body(Full::new(Bytes::new()).boxed())
            .unwrap_or_default());
    }
    if !bodies.delay.is_zero() {
        tokio::time::sleep(bodies.delay).await;
    }
    if let Some(answer) = translated {
        return Ok(Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(answer).boxed())
            .unwrap_or_default());
    }
    let streamed = [&b"\"stream\":true"[..], b"\"stream\": true"]
        .iter()
        .any(|needle| body.windows(needle.len()).any(|w| w == *needle));
    let response = if streamed {
        // The first event goes at once (a timer, even an expired one, waits for the
        // next millisecond tick), the others each at their own tick.
        let start = tokio::time::Instant::now();
        let ticks = tokio::time::interval_at(start + bodies.interval, bodies.interval);
        let events = bodies.events.clone().into_iter().enumerate();
        let frames =
            futures_util::stream::unfold((ticks, events), |(mut ticks, mut events)| async move {
                let (i, event) = events.next()?;
                if i > 0 {
                    ticks.tick().await;
                }
                Some((Ok::<_, Infallible>(Frame::data(event)), (ticks, events)))
            });
        Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            // nginx passes the events on as they come instead of buffering them.
            .header("x-accel-buffering", "no")
            .body(StreamBody::new(frames).boxed())
    } else {
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(bodies.json.clone()).boxed())
    };
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed())))
}
