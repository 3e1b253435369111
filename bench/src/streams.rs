//! Many streams at once: every stream on a connection of its own, its events timed as
//! they arrive. The gaps between a stream's events, against the upstream's interval,
//! say what the path in between adds; a stream whose events stop coming (no event for
//! a second) or that never ends is stalled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;

use crate::fixed::{Request, connect, nearest_rank};

/// What one burst of streams saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Burst {
    pub streams: usize,
    /// Streams that ended with `[DONE]`, with no gap of a second or more.
    pub finished: usize,
    pub stalled: usize,
    /// Gaps between consecutive events of a stream, every stream's, in µs.
    pub gap_p50_us: f64,
    pub gap_p99_us: f64,
    pub gap_max_us: f64,
}

/// Opens `streams` streamed chat completions to `url` at once and reads them to the
/// end (at most `within`).
pub async fn burst(url: &str, caller_key: &str, streams: usize, within: Duration) -> Burst {
    let request = Arc::new(Request::chat_streamed(url, caller_key, "bench"));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let request = request.clone();
        set.spawn(async move {
            tokio::time::timeout(within, one(&request))
                .await
                .ok()
                .flatten()
        });
    }
    let (mut gaps, mut finished, mut stalled) = (Vec::new(), 0, 0);
    while let Some(done) = set.join_next().await {
        match done.ok().flatten() {
            Some(stream) if stream.iter().all(|g| *g < 1e6) => {
                finished += 1;
                gaps.extend(stream);
            }
            _ => stalled += 1,
        }
    }
    gaps.sort_by(f64::total_cmp);
    let at = |p| nearest_rank(&gaps, p);
    Burst {
        streams,
        finished,
        stalled,
        gap_p50_us: at(50.0),
        gap_p99_us: at(99.0),
        gap_max_us: gaps.last().copied().unwrap_or(f64::NAN),
    }
}

/// One stream: the gaps between its events (µs), or `None` when it failed or did not
/// end with `[DONE]`.
async fn one(request: &Request) -> Option<Vec<f64>> {
    let mut sender = connect(request.authority()).await.ok()?;
    let message = request.message()?;
    sender.ready().await.ok()?;
    let response = sender.send_request(message).await.ok()?;
    if response.status() != 200 {
        return None;
    }
    let mut body = response.into_body();
    let (mut gaps, mut last, mut tail) = (Vec::new(), None::<Instant>, Vec::new());
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        if data.windows(2).any(|w| w == b"\n\n") {
            if let Some(last) = last {
                gaps.push(now.duration_since(last).as_secs_f64() * 1e6);
            }
            last = Some(now);
        }
        // Only the end is kept, to see the closing `[DONE]`.
        tail.extend_from_slice(data);
        if tail.len() > 64 {
            tail.drain(..tail.len() - 64);
        }
    }
    let done = String::from_utf8_lossy(&tail)
        .trim_end()
        .ends_with("data: [DONE]");
    done.then_some(gaps)
}
