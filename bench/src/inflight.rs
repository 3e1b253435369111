//! Many slow calls at once, each on a connection of its own: what a call in flight
//! costs the gateway in resident memory, and whether the memory comes back after.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::fixed::{Request, one};

/// Opens `calls` connections to `url` and sends a chat completion on each (the
/// upstream holds every answer for a while). The calls run on the returned set.
pub fn start(url: &str, caller_key: &str, calls: usize) -> tokio::task::JoinSet<bool> {
    let request = Arc::new(Request::chat(url, caller_key, "bench"));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..calls {
        let request = request.clone();
        set.spawn(async move {
            // A pool of one, never shared: each call keeps a connection of its own.
            let idle = Mutex::new(Vec::new());
            one(&request, &idle).await.is_ok()
        });
    }
    set
}

/// Waits until every call is answered; returns how many were not a 200.
pub async fn finish(mut set: tokio::task::JoinSet<bool>, within: Duration) -> usize {
    let mut failed = 0;
    let all = async {
        while let Some(done) = set.join_next().await {
            if !done.unwrap_or(false) {
                failed += 1;
            }
        }
    };
    if tokio::time::timeout(within, all).await.is_err() {
        return usize::MAX;
    }
    failed
}
