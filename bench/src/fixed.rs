//! Load at a fixed rate, for latency without coordinated omission: requests are sent
//! on a schedule (one per millisecond tick of the harness's timer), each on an idle
//! keep-alive connection or a new one when every open one is busy, and a request's
//! latency runs from when it was due, not from when it could be sent. A target that
//! stalls therefore shows the wait of every request scheduled behind the stall, which
//! a closed loop (wrk) hides.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::load::Run;

/// Connections open at most; a request due while all are busy waits for one.
const MAX_CONNECTIONS: usize = 64;

/// Sends `per_second` requests a second (at most 1000: the timer's resolution) for
/// `duration`, and returns the latency percentiles measured from each due time.
pub async fn run(
    url: &str,
    caller_key: &str,
    model: &str,
    per_second: u32,
    duration: Duration,
) -> Run {
    let request = Arc::new(Request::chat(url, caller_key, model));
    let idle: Arc<Mutex<Vec<SendRequest<Full<Bytes>>>>> = Arc::default();
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let results: Arc<Mutex<Vec<Result<Duration, ()>>>> = Arc::default();
    let every = Duration::from_secs(1) / per_second.clamp(1, 1000);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    while started.elapsed() < duration {
        let due = ticks.tick().await.into_std();
        let (request, idle, open, results) =
            (request.clone(), idle.clone(), open.clone(), results.clone());
        tasks.spawn(async move {
            let Ok(_slot) = open.acquire().await else {
                return;
            };
            let outcome = one(&request, &idle).await;
            let latency = outcome.map(|()| due.elapsed());
            results
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(latency);
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let results = std::mem::take(&mut *results.lock().unwrap_or_else(PoisonError::into_inner));
    let mut latencies: Vec<f64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|d| d.as_secs_f64() * 1e6)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let at = |p: f64| {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        latencies[rank.clamp(1, latencies.len()) - 1]
    };
    Run {
        requests: results.len() as u64,
        errors: results.iter().filter(|r| r.is_err()).count() as u64,
        rps: results.len() as f64 / elapsed.as_secs_f64(),
        p50_us: at(50.0),
        p99_us: at(99.0),
    }
}

/// A chat completion request, sent again and again.
pub struct Request {
    uri: hyper::Uri,
    authority: String,
    auth: String,
    body: Bytes,
}

impl Request {
    pub fn chat(url: &str, caller_key: &str, model: &str) -> Self {
        let uri: hyper::Uri = url.parse().expect("target URL");
        let authority = uri.authority().expect("target host and port").to_string();
        let body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "Say hello."}],
        })
        .to_string();
        Self {
            uri,
            authority,
            auth: format!("Bearer {caller_key}"),
            body: Bytes::from(body),
        }
    }
}

/// One request on an idle connection (or a new one); `Err` unless a whole 200.
pub async fn one(request: &Request, idle: &Mutex<Vec<SendRequest<Full<Bytes>>>>) -> Result<(), ()> {
    let reused = idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
    let mut sender = match reused {
        Some(sender) => sender,
        None => connect(&request.authority).await?,
    };
    let message = hyper::Request::post(request.uri.clone())
        .header(hyper::header::HOST, &request.authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::AUTHORIZATION, &request.auth)
        .body(Full::new(request.body.clone()))
        .map_err(|_| ())?;
    sender.ready().await.map_err(|_| ())?;
    let response = sender.send_request(message).await.map_err(|_| ())?;
    let ok = response.status() == 200;
    response.into_body().collect().await.map_err(|_| ())?;
    idle.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(sender);
    if ok { Ok(()) } else { Err(()) }
}

pub async fn connect(authority: &str) -> Result<SendRequest<Full<Bytes>>, ()> {
    let tcp = TcpStream::connect(authority).await.map_err(|_| ())?;
    tcp.set_nodelay(true).map_err(|_| ())?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|_| ())?;
    tokio::spawn(connection);
    Ok(sender)
}
