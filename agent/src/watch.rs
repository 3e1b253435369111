//! The configuration watcher both modes use: list the prefix, apply it as a `Reset`,
//! then watch from the next revision and apply each response as one batch.
//!
//! - Compaction of the start revision answers with a full re-list (the `Reset` also
//!   removes keys deleted while we were away), so no update is lost.
//! - Progress notifications advance the snapshot revision and freshness, so a quiet,
//!   healthy watch does not look stale. Once two have arrived, their spacing sets the
//!   idle timeout (three intervals without any message ends the stream and reconnects),
//!   kept for later streams.
//! - Every failure waits out an exponential backoff with full jitter, capped, while the
//!   last good snapshot keeps serving; a successful watch start resets the backoff.
//! - On etcd, a watch quiet for [`FRESHNESS_CHECK`] confirms the snapshot is current
//!   with three cheap counts (nothing under the prefix changed since the applied
//!   revision: as many keys then as now, none modified since), and then counts as
//!   progress up to etcd's revision; so freshness needs no etcd flag (its progress
//!   notifications come every ten minutes by default), while a watch that missed a
//!   change still ages.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use proxy_core::snapshot::{SnapshotStore, Source, SourceEvent};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::{Backoff, BackoffPolicy};
use crate::etcd::{EtcdClient, EtcdError, WatchMessage};

/// Connection state, for health, heartbeats and metrics.
#[derive(Debug, Default)]
pub struct WatchStatus {
    connected: AtomicBool,
}

impl WatchStatus {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

pub struct Watcher {
    pub client: Arc<EtcdClient>,
    /// The storage prefix, without a trailing slash (`/aisix`).
    pub prefix: String,
    pub store: Arc<SnapshotStore>,
    pub source: Source,
    pub backoff: BackoffPolicy,
    /// The idle timeout until progress notifications show their interval.
    pub idle_timeout: Duration,
    pub status: Arc<WatchStatus>,
}

/// How long a watch may be quiet before the snapshot is confirmed current by counts.
pub const FRESHNESS_CHECK: Duration = Duration::from_secs(3);

enum Ended {
    Compacted,
    Closed,
}

impl Watcher {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.backoff);
        let mut next: Option<i64> = None;
        // Kept across streams: the server's progress interval does not change when a
        // stream is re-established, and a stall right after a reconnect must be seen.
        let mut idle = IdleClock::new(self.idle_timeout);
        loop {
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = self.cycle(&mut next, &mut backoff, &mut idle) => outcome,
            };
            self.status.connected.store(false, Ordering::Relaxed);
            let problem = match outcome {
                Ok(Ended::Compacted) => continue,
                Ok(Ended::Closed) => "the server ended the watch stream".to_owned(),
                Err(e) => e.to_string(),
            };
            let wait = backoff.next_delay();
            warn!(
                prefix = %self.prefix,
                error = %problem,
                retry_in_ms = wait.as_millis() as u64,
                "configuration watch interrupted; the last good snapshot keeps serving"
            );
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Lists when needed, then follows the watch until it ends.
    async fn cycle(
        &self,
        next: &mut Option<i64>,
        backoff: &mut Backoff,
        idle: &mut IdleClock,
    ) -> Result<Ended, EtcdError> {
        let dir = format!("{}/", self.prefix);
        let start = match *next {
            Some(revision) => revision,
            None => {
                let listing = self.client.list(&dir).await?;
                let count = listing.kvs.len();
                let entries = listing
                    .kvs
                    .into_iter()
                    .map(|kv| (kv.key, kv.value))
                    .collect();
                self.store.apply(
                    self.source,
                    [SourceEvent::Reset {
                        entries,
                        revision: listing.revision,
                    }],
                );
                info!(prefix = %self.prefix, revision = listing.revision, keys = count, source = self.source.as_str(), "configuration listed");
                *next = Some(listing.revision + 1);
                listing.revision + 1
            }
        };
        let mut stream = self.client.watch(&dir, start).await?;
        idle.new_stream();
        let mut heard = Instant::now();
        let mut check = Instant::now() + FRESHNESS_CHECK;
        loop {
            let deadline = heard + idle.timeout();
            let message = tokio::select! {
                message = tokio::time::timeout_at(deadline, stream.next()) => message,
                () = tokio::time::sleep_until(check), if self.source == Source::Etcd => {
                    if self.status.connected() {
                        self.confirm_current(&dir).await;
                    }
                    check = Instant::now() + FRESHNESS_CHECK;
                    continue;
                }
            };
            let message = message.map_err(|_| EtcdError::Transport {
                endpoint: String::new(),
                message: format!(
                    "watch idle for {} ms without events or progress",
                    idle.timeout().as_millis()
                ),
            })??;
            heard = Instant::now();
            check = heard + FRESHNESS_CHECK;
            let Some(message) = message else {
                return Ok(Ended::Closed);
            };
            match message {
                WatchMessage::Created { .. } => {
                    self.status.connected.store(true, Ordering::Relaxed);
                    backoff.reset();
                    info!(prefix = %self.prefix, from_revision = next.unwrap_or_default(), "watching configuration");
                }
                WatchMessage::Events { events, .. } => {
                    let last = events.iter().map(revision_of).max().unwrap_or_default();
                    self.store.apply(self.source, events);
                    *next = Some(next.unwrap_or_default().max(last + 1));
                }
                WatchMessage::Progress { revision } => {
                    idle.progress();
                    if revision + 1 >= next.unwrap_or_default() {
                        self.store
                            .apply(self.source, [SourceEvent::Progress { revision }]);
                        *next = Some(revision + 1);
                    }
                }
                WatchMessage::Compacted { compact_revision } => {
                    info!(prefix = %self.prefix, compact_revision, wanted = next.unwrap_or_default(), "watch start revision was compacted; listing again");
                    *next = None;
                    return Ok(Ended::Compacted);
                }
                WatchMessage::Canceled { reason } => {
                    return Err(EtcdError::Status {
                        endpoint: String::new(),
                        status: 500,
                        message: format!("watch canceled: {reason}"),
                    });
                }
            }
        }
    }
}

impl Watcher {
    /// Counts as progress up to etcd's revision when nothing under the prefix changed
    /// since the applied revision; any doubt (a failed call, a compacted revision, a
    /// difference) leaves freshness alone.
    async fn confirm_current(&self, dir: &str) {
        let applied = self.store.load().revision;
        let Ok((now, head)) = self.client.count(dir, 0).await else {
            return;
        };
        let current = head <= applied || {
            let then = self.client.count(dir, applied).await;
            let newer = self.client.modified_since(dir, head, applied + 1).await;
            matches!((then, newer), (Ok((then, _)), Ok(false)) if then == now)
        };
        if current {
            let revision = head.max(applied);
            self.store
                .apply(self.source, [SourceEvent::Progress { revision }]);
        }
    }
}

fn revision_of(e: &SourceEvent) -> i64 {
    match e {
        SourceEvent::Put { revision, .. }
        | SourceEvent::Delete { revision, .. }
        | SourceEvent::Progress { revision }
        | SourceEvent::Reset { revision, .. } => *revision,
    }
}

/// The watch idle timeout: the configured one until two progress notifications (on one
/// stream) show the server's interval, then three intervals (at least three seconds).
struct IdleClock {
    initial: Duration,
    last_progress: Option<Instant>,
    interval: Option<Duration>,
}

impl IdleClock {
    fn new(initial: Duration) -> Self {
        Self {
            initial,
            last_progress: None,
            interval: None,
        }
    }

    /// Progress spacing is measured within one stream.
    fn new_stream(&mut self) {
        self.last_progress = None;
    }

    fn progress(&mut self) {
        let now = Instant::now();
        if let Some(last) = self.last_progress {
            self.interval = Some(now - last);
        }
        self.last_progress = Some(now);
    }

    fn timeout(&self) -> Duration {
        self.interval.map_or(self.initial, |i| {
            (i * 3).clamp(Duration::from_secs(3), self.initial)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_follows_progress_interval() {
        let mut clock = IdleClock::new(Duration::from_secs(600));
        assert_eq!(clock.timeout(), Duration::from_secs(600));
        clock.progress();
        assert_eq!(clock.timeout(), Duration::from_secs(600));
        tokio::time::advance(Duration::from_secs(5)).await;
        clock.progress();
        assert_eq!(clock.timeout(), Duration::from_secs(15));
        tokio::time::advance(Duration::from_millis(100)).await;
        clock.progress();
        assert_eq!(clock.timeout(), Duration::from_secs(3));
        // A new stream keeps the learned interval; spacing restarts with it.
        clock.new_stream();
        tokio::time::advance(Duration::from_secs(60)).await;
        clock.progress();
        assert_eq!(clock.timeout(), Duration::from_secs(3));
    }
}
