//! Load at a fixed rate, for latency without coordinated omission, and the requests
//! the in-flight bursts send.
//!
//! [`run`] sends on a schedule, blocking its thread, over one keep-alive
//! connection: it sleeps until a request is due (then spins the last stretch, so the
//! send is on time to a few microseconds), and a request's latency runs from when it
//! was due, not from when it could be sent. A target that stalls therefore shows the
//! wait of every request scheduled behind the stall, which a closed loop (wrk) hides.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream as StdTcpStream;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::load::Run;

/// Sends `per_second` chat completions a second to `url` for `duration` (blocking),
/// and returns the latency percentiles measured from each due time.
pub fn run(url: &str, caller_key: &str, model: &str, per_second: u32, duration: Duration) -> Run {
    let request = Request::chat(url, caller_key, model);
    let mut wire = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAuthorization: {}\r\nContent-Length: {}\r\n\r\n",
        request.uri.path(),
        request.authority,
        request.auth,
        request.body.len()
    )
    .into_bytes();
    wire.extend_from_slice(&request.body);
    let every = Duration::from_secs(1) / per_second.max(1);
    let mut connection: Option<BufReader<StdTcpStream>> = None;
    let (mut latencies, mut errors, mut sent) = (Vec::new(), 0u64, 0u64);
    let started = Instant::now();
    let mut due = started;
    while due.duration_since(started) < duration {
        wait_until(due);
        sent += 1;
        let answered = exchange(&mut connection, &request.authority, &wire);
        match answered {
            Some(true) => latencies.push(due.elapsed().as_secs_f64() * 1e6),
            _ => {
                errors += 1;
                connection = None;
            }
        }
        due += every;
    }
    let elapsed = started.elapsed();
    latencies.sort_by(f64::total_cmp);
    let at = |p| nearest_rank(&latencies, p);
    Run {
        requests: sent,
        errors,
        rps: sent as f64 / elapsed.as_secs_f64(),
        p50_us: at(50.0),
        p99_us: at(99.0),
    }
}

/// The nearest-rank `p`th percentile of `sorted` (NaN when empty).
pub fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sleeps until shortly before `due`, then spins to it.
fn wait_until(due: Instant) {
    const SPIN: Duration = Duration::from_micros(100);
    let now = Instant::now();
    if due > now + SPIN {
        std::thread::sleep(due - now - SPIN);
    }
    while Instant::now() < due {
        std::hint::spin_loop();
    }
}

/// One request on the kept connection (opened when there is none): `Some(true)` for a
/// whole 200, `Some(false)` for another status, `None` when the connection failed.
fn exchange(
    connection: &mut Option<BufReader<StdTcpStream>>,
    authority: &str,
    wire: &[u8],
) -> Option<bool> {
    if connection.is_none() {
        let tcp = StdTcpStream::connect(authority).ok()?;
        tcp.set_nodelay(true).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        *connection = Some(BufReader::new(tcp));
    }
    let reader = connection.as_mut()?;
    reader.get_mut().write_all(wire).ok()?;
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let ok = line.starts_with("HTTP/1.1 200");
    let mut length = 0usize;
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(ok)
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
        Self::new(url, caller_key, model, false)
    }

    pub fn chat_streamed(url: &str, caller_key: &str, model: &str) -> Self {
        Self::new(url, caller_key, model, true)
    }

    fn new(url: &str, caller_key: &str, model: &str, stream: bool) -> Self {
        let uri: hyper::Uri = url.parse().expect("target URL");
        let authority = uri.authority().expect("target host and port").to_string();
        let body = serde_json::json!({
            "model": model,
            "stream": stream,
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

    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The request as hyper sends it.
    pub fn message(&self) -> Option<hyper::Request<Full<Bytes>>> {
        hyper::Request::post(self.uri.clone())
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::AUTHORIZATION, &self.auth)
            .body(Full::new(self.body.clone()))
            .ok()
    }
}

/// One request on an idle connection (or a new one); `Err` unless a whole 200.
pub async fn one(request: &Request, idle: &Mutex<Vec<SendRequest<Full<Bytes>>>>) -> Result<(), ()> {
    let reused = idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
    let mut sender = match reused {
        Some(sender) => sender,
        None => connect(&request.authority).await?,
    };
    let message = request.message().ok_or(())?;
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
