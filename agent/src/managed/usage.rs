//! Usage telemetry: the durable queue the proxy records into (the [`UsageSink`]) and
//! the sender that delivers it in batches to `POST /dp/telemetry`.
//!
//! The queue is a sled database, `state_dir/usage-queue`, keyed by a big-endian
//! sequence number, so it keeps its order across restarts. A call only appends its
//! event to an in-memory inbox; a group commit ([`UsageQueue::run_flusher`]: one at a
//! time, covering every event recorded before it began) writes the inbox to the
//! database and flushes it. The queue is also flushed after every acknowledged batch
//! and at shutdown. Every database operation runs on a blocking thread, so a slow or
//! failing disk never slows a call. When the disk fails (full, I/O errors) delivery goes
//! on from memory, so budgets keep their telemetry; what is undelivered is written to
//! the database when it opens again.
//!
//! So a restart loses nothing and re-sends nothing that was acknowledged; a `kill -9`
//! loses at most the events of the flush in progress (milliseconds), or re-sends the
//! last batch, which the control plane drops by `event_id`. Past
//! `managed.usage.queue_max_events` the oldest events are dropped and counted; the
//! count survives restarts and is reported in heartbeats.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use contract::telemetry::{TelemetryAnswer, TelemetryBatch};
use proxy_core::hooks::{UsageEvent, UsageSink};
use reqwest::Method;
use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::client::{CpClient, CpError};
use crate::backoff::{Backoff, BackoffPolicy};
use crate::cache::{CacheError, open_again, open_or_replace};

const DROPPED: &[u8] = b"dropped";
const NAME: &str = "usage-queue";
/// How often a database that failed is tried again.
const REOPEN_RETRY: Duration = Duration::from_secs(2);
/// How long shutdown waits for the last batches to be delivered.
const FINAL_SEND: Duration = Duration::from_secs(3);

/// The queue's size, as heartbeats report it.
#[derive(Debug, Default)]
pub struct UsageQueueStatus {
    pending: AtomicU64,
    dropped: AtomicU64,
    /// Events recorded since start.
    emitted: AtomicU64,
}

impl UsageQueueStatus {
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn emitted(&self) -> u64 {
        self.emitted.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

pub struct UsageQueue {
    /// Recorded, not yet written to the database: the only thing a call touches.
    inbox: Mutex<Inbox>,
    state: Mutex<State>,
    path: PathBuf,
    max_events: u64,
    batch_size: usize,
    status: Arc<UsageQueueStatus>,
    /// Woken when a full batch is waiting.
    full: Notify,
    /// Woken when events were queued since the last flush began, or the database
    /// must be opened again.
    dirty: Notify,
}

struct Inbox {
    /// The sequence number of the next event (assigned here, so the inbox is in order).
    next: u64,
    events: Vec<(u64, sled::IVec)>,
}

struct State {
    /// `None` after an I/O error (a full disk): sled refuses every later write then,
    /// so the flusher opens the database again.
    store: Option<Store>,
    /// Events written but not yet known to be on disk, in order; written again after
    /// a reopen.
    unflushed: VecDeque<(u64, sled::IVec)>,
}

#[derive(Clone)]
struct Store {
    db: sled::Db,
    events: sled::Tree,
    meta: sled::Tree,
    /// The last budget decision per caller key (what a fail-closed key needs after a
    /// restart with the control plane away).
    decisions: sled::Tree,
}

impl Store {
    fn open(db: sled::Db) -> Result<Self, sled::Error> {
        Ok(Self {
            events: db.open_tree("events")?,
            meta: db.open_tree("meta")?,
            decisions: db.open_tree("budget_decisions")?,
            db,
        })
    }
}

impl UsageQueue {
    pub fn open(dir: &Path, max_events: u64, batch_size: usize) -> Result<Self, CacheError> {
        let store = Store::open(open_or_replace(dir, NAME, "usage queue")?)?;
        let next = match store.events.last()? {
            Some((key, _)) => sequence(&key).map_or(0, |n| n.saturating_add(1)),
            None => 0,
        };
        let dropped = store
            .meta
            .get(DROPPED)?
            .and_then(|v| v.as_ref().try_into().ok())
            .map_or(0, u64::from_be_bytes);
        let status = Arc::new(UsageQueueStatus {
            pending: AtomicU64::new(store.events.len() as u64),
            dropped: AtomicU64::new(dropped),
            emitted: AtomicU64::new(0),
        });
        if status.pending() > 0 || dropped > 0 {
            info!(
                pending = status.pending(),
                dropped, "usage queue restored; pending events will be sent"
            );
        }
        Ok(Self {
            inbox: Mutex::new(Inbox {
                next,
                events: Vec::new(),
            }),
            state: Mutex::new(State {
                store: Some(store),
                unflushed: VecDeque::new(),
            }),
            path: dir.join(NAME),
            max_events,
            batch_size,
            status,
            full: Notify::new(),
            dirty: Notify::new(),
        })
    }

    pub fn status(&self) -> Arc<UsageQueueStatus> {
        self.status.clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the last budget decision for `api_key_id` beside the events (best effort:
    /// without a working disk it is simply not kept; budget checks never wait for it).
    pub fn keep_decision(&self, api_key_id: &str, decision: &[u8]) {
        let state = self.state();
        if let Some(store) = &state.store
            && let Err(e) = store.decisions.insert(api_key_id, decision)
        {
            debug!(error = %e, "usage queue: cannot keep a budget decision");
        }
    }

    /// The budget decisions kept by earlier runs, by caller key.
    pub fn kept_decisions(&self) -> Vec<(String, sled::IVec)> {
        let state = self.state();
        let Some(store) = &state.store else {
            return Vec::new();
        };
        store
            .decisions
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| Some((String::from_utf8(k.to_vec()).ok()?, v)))
            .collect()
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open database, or an error while it waits to be opened again.
    /// Forgets the database handle after an I/O error; the flusher opens it again.
    fn broken(&self, state: &mut State, error: &sled::Error) {
        if state.store.take().is_some() {
            warn!(error = %error, "usage queue: cannot write to disk; events are kept in memory until it can");
        }
        self.dirty.notify_one();
    }

    fn push(&self, event: &contract::telemetry::UsageEvent) -> Result<(), String> {
        let bytes = sled::IVec::from(serde_json::to_vec(event).map_err(|e| e.to_string())?);
        {
            let mut inbox = self.inbox();
            let n = inbox.next;
            inbox.next += 1;
            inbox.events.push((n, bytes));
        }
        self.status.pending.fetch_add(1, Ordering::Relaxed);
        self.status.emitted.fetch_add(1, Ordering::Relaxed);
        self.dirty.notify_one();
        Ok(())
    }

    /// Writes the inbox to the database (blocking), then drops the oldest events past
    /// `max_events`. Without a database (after an I/O error) the events wait in memory.
    fn write_inbox(&self) {
        let recorded = std::mem::take(&mut self.inbox().events);
        let mut state = self.state();
        if let Some(store) = state.store.clone()
            && !recorded.is_empty()
        {
            let mut batch = sled::Batch::default();
            for (n, bytes) in &recorded {
                batch.insert(&n.to_be_bytes(), bytes.clone());
            }
            if let Err(e) = store.events.apply_batch(batch) {
                self.broken(&mut state, &e);
            }
        }
        state.unflushed.extend(recorded);
        let mut pending = self.status.pending();
        while pending > self.max_events {
            let oldest = match &state.store {
                Some(store) => store
                    .events
                    .pop_min()
                    .map(|p| p.and_then(|(k, _)| sequence(&k))),
                None => Ok(state.unflushed.front().map(|(n, _)| *n)),
            };
            match oldest {
                Ok(Some(n)) => {
                    if state
                        .unflushed
                        .front()
                        .is_some_and(|(first, _)| *first == n)
                    {
                        state.unflushed.pop_front();
                    }
                    pending = self.status.pending.fetch_sub(1, Ordering::Relaxed) - 1;
                    self.count_dropped_in(&state, 1);
                }
                Ok(None) => break,
                Err(e) => {
                    self.broken(&mut state, &e);
                    break;
                }
            }
        }
        drop(state);
        if pending >= self.batch_size as u64 {
            self.full.notify_one();
        }
    }

    /// Writes and flushes newly recorded events until `shutdown`: one flush at a time,
    /// the next one as soon as more events have arrived (many per flush under load).
    /// After an I/O error the database is opened again (every 2 s until it opens) and
    /// the events it may have lost are written again.
    pub async fn run_flusher(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let reopening = self.state().store.is_none();
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.dirty.notified() => {}
                () = tokio::time::sleep(REOPEN_RETRY), if reopening => {}
            }
            if self.state().store.is_none() {
                let queue = self.clone();
                match tokio::task::spawn_blocking(move || queue.reopen()).await {
                    Ok(Ok(())) => info!("usage queue: writing to disk again"),
                    Ok(Err(e)) => debug!(error = %e, "usage queue: still cannot open the database"),
                    Err(e) => warn!(error = %e, "usage queue: reopening failed"),
                }
            }
            self.flush().await;
        }
    }

    /// Opens the database again and writes the events it may have lost.
    fn reopen(&self) -> Result<(), CacheError> {
        let store = Store::open(open_again(&self.path)?)?;
        let mut state = self.state();
        for (n, bytes) in &state.unflushed {
            store.events.insert(n.to_be_bytes(), bytes.clone())?;
        }
        // Events may already have been removed (acknowledged) from the lost handle's
        // view; the pending count follows what the database holds now.
        let recorded = self.inbox().events.len();
        self.status
            .pending
            .store((store.events.len() + recorded) as u64, Ordering::Relaxed);
        state.store = Some(store);
        Ok(())
    }

    fn count_dropped(&self, n: u64) {
        let state = self.state();
        self.count_dropped_in(&state, n);
    }

    fn count_dropped_in(&self, state: &State, n: u64) {
        let total = self.status.dropped.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(store) = &state.store
            && let Err(e) = store.meta.insert(DROPPED, &total.to_be_bytes())
        {
            warn!(error = %e, "usage queue: cannot record the dropped count");
        }
        if total == n || total.is_power_of_two() {
            warn!(
                dropped_total = total,
                max_events = self.max_events,
                "usage queue full: oldest events dropped"
            );
        }
    }

    /// Up to `batch_size` events from the front, with their keys, as stored (JSON,
    /// checked but not parsed into values). Entries that are not JSON are removed and
    /// counted as dropped.
    fn front(&self) -> Result<Vec<(sled::IVec, Box<RawValue>)>, sled::Error> {
        // Bound apart: a guard in a `let ... else` would live through the `else`.
        let store = self.state().store.clone();
        let Some(store) = store else {
            return Ok(self.front_in_memory());
        };
        let mut batch = Vec::with_capacity(self.batch_size);
        for item in store.events.iter() {
            let (key, bytes) = item?;
            match serde_json::from_slice(&bytes) {
                Ok(event) => batch.push((key, event)),
                Err(e) => {
                    warn!(error = %e, "usage queue: unreadable event dropped");
                    self.remove(&[key])?;
                    self.count_dropped(1);
                    continue;
                }
            }
            if batch.len() == self.batch_size {
                break;
            }
        }
        Ok(batch)
    }

    /// Without a database (a full or failing disk) delivery goes on from memory: the
    /// events written since it failed, in order. Budgets depend on this telemetry, so
    /// the disk failing must not stop it.
    fn front_in_memory(&self) -> Vec<(sled::IVec, Box<RawValue>)> {
        let mut state = self.state();
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut unreadable = Vec::new();
        for (n, bytes) in &state.unflushed {
            match serde_json::from_slice(bytes) {
                Ok(event) => batch.push((sled::IVec::from(&n.to_be_bytes()), event)),
                Err(_) => unreadable.push(*n),
            }
            if batch.len() == self.batch_size {
                break;
            }
        }
        if !unreadable.is_empty() {
            state.unflushed.retain(|(n, _)| !unreadable.contains(n));
            let count = unreadable.len() as u64;
            self.status.pending.fetch_sub(count, Ordering::Relaxed);
            self.count_dropped_in(&state, count);
        }
        batch
    }

    fn remove(&self, keys: &[sled::IVec]) -> Result<(), sled::Error> {
        let acknowledged: Vec<u64> = keys.iter().filter_map(|k| sequence(k)).collect();
        let store = self.state().store.clone();
        let Some(store) = store else {
            // In memory only: the acknowledged events leave the memory queue.
            let mut state = self.state();
            let before = state.unflushed.len();
            state.unflushed.retain(|(n, _)| !acknowledged.contains(n));
            let removed = (before - state.unflushed.len()) as u64;
            self.status.pending.fetch_sub(removed, Ordering::Relaxed);
            return Ok(());
        };
        for key in keys {
            if store.events.remove(key)?.is_some() {
                self.status.pending.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let mut state = self.state();
        state.unflushed.retain(|(n, _)| !acknowledged.contains(n));
        Ok(())
    }

    /// Writes what is recorded to disk; events recorded before it began are then safe.
    async fn flush(self: &Arc<Self>) {
        let queue = self.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || queue.write_inbox()).await {
            warn!(error = %e, "usage queue: writing recorded events failed");
        }
        let (store, written) = {
            let state = self.state();
            (state.store.clone(), state.unflushed.back().map(|(n, _)| *n))
        };
        let Some(store) = store else {
            return;
        };
        match store.db.flush_async().await {
            Ok(_) => {
                if let Some(last) = written {
                    self.state().unflushed.retain(|(n, _)| *n > last);
                }
            }
            Err(e) => {
                let mut state = self.state();
                self.broken(&mut state, &e);
            }
        }
    }
}

impl UsageSink for UsageQueue {
    fn record(&self, event: UsageEvent) {
        let event = wire_event(event);
        if let Err(e) = self.push(&event) {
            warn!(error = %e, request_id = %event.request_id, "usage event not queued");
            self.count_dropped(1);
        }
    }
}

/// The proxy's usage event as the contract's.
fn wire_event(e: UsageEvent) -> contract::telemetry::UsageEvent {
    contract::telemetry::UsageEvent {
        event_id: e.event_id,
        request_id: e.request_id,
        api_key_id: e.api_key_id,
        model: e.model,
        provider: e.provider,
        served_by: e.served_by,
        prompt_tokens: e.prompt_tokens,
        completion_tokens: e.completion_tokens,
        cache_read_tokens: e.cache_read_tokens,
        cache_write_tokens: e.cache_write_tokens,
        cost_usd: e.cost_usd,
        status_code: e.status_code,
        stream: e.stream,
        latency_ms: e.latency_ms,
        ttft_ms: e.ttft_ms,
        timestamp_unix_ms: e.timestamp_unix_ms,
        finish_reason: e.finish_reason,
        guardrails: e
            .guardrails
            .into_iter()
            .map(|v| contract::telemetry::GuardrailVerdict {
                guardrail: v.guardrail,
                kind: v.kind,
                hook: v.hook,
                outcome: v.outcome,
                found: v.found,
                reason: v.reason,
            })
            .collect(),
    }
}

fn sequence(key: &[u8]) -> Option<u64> {
    key.try_into().ok().map(u64::from_be_bytes)
}

/// Delivers the queue: every `flush_interval`, or as soon as a full batch waits.
pub struct UsageSender {
    pub queue: Arc<UsageQueue>,
    pub cp: Arc<CpClient>,
    pub interval: Duration,
    pub backoff: BackoffPolicy,
}

impl UsageSender {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.backoff);
        let mut failing = false;
        loop {
            let healthy = match self.send_all().await {
                Ok(sent) => {
                    if failing {
                        info!(sent, "usage telemetry delivered again");
                    }
                    failing = false;
                    backoff.reset();
                    true
                }
                Err(e) => {
                    if !failing {
                        warn!(error = %e, pending = self.queue.status.pending(), "usage telemetry not delivered; events stay queued");
                    }
                    failing = true;
                    false
                }
            };
            let wait = if healthy {
                self.interval
            } else {
                backoff.next_delay().max(self.interval)
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
                () = self.queue.full.notified(), if healthy => {}
            }
        }
        match tokio::time::timeout(FINAL_SEND, self.send_all()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => debug!(error = %e, "usage telemetry: last send at shutdown failed"),
            Err(_) => debug!("usage telemetry: last send at shutdown timed out"),
        }
        self.queue.flush().await;
        let pending = self.queue.status.pending();
        if pending > 0 {
            info!(pending, "usage events kept for the next start");
        }
    }

    /// Sends batches until the queue is empty; returns how many events were delivered.
    async fn send_all(&self) -> Result<u64, CpError> {
        let mut sent = 0;
        loop {
            let batch = self.on_disk(UsageQueue::front).await?;
            if batch.is_empty() {
                return Ok(sent);
            }
            let full = batch.len() == self.queue.batch_size;
            sent += self.deliver(batch).await?;
            self.queue.flush().await;
            if !full {
                return Ok(sent);
            }
        }
    }

    /// Sends one batch and removes what the control plane acknowledged. A batch refused
    /// as invalid (400) is retried event by event so one bad event does not hold back
    /// the rest; the refused one is dropped and counted.
    async fn deliver(&self, batch: Vec<(sled::IVec, Box<RawValue>)>) -> Result<u64, CpError> {
        let (keys, events): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        match self.post(&events).await {
            Ok(()) => {
                let sent = keys.len() as u64;
                self.on_disk(move |queue| queue.remove(&keys)).await?;
                Ok(sent)
            }
            Err(CpError::Status { status: 400, .. }) => {
                let mut sent = 0;
                for (key, event) in keys.into_iter().zip(events) {
                    match self.post(std::slice::from_ref(&event)).await {
                        Ok(()) => sent += 1,
                        Err(CpError::Status {
                            status: 400,
                            message,
                        }) => {
                            warn!(error = %message, "usage event refused by the control plane; dropped");
                            self.queue.count_dropped(1);
                        }
                        Err(e) => return Err(e),
                    }
                    self.on_disk(move |queue| queue.remove(&[key])).await?;
                }
                Ok(sent)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs a database operation on a blocking thread: sled may wait for its writes, and
    /// the runtime's threads serve calls.
    async fn on_disk<T: Send + 'static>(
        &self,
        operation: impl FnOnce(&UsageQueue) -> Result<T, sled::Error> + Send + 'static,
    ) -> Result<T, CpError> {
        let queue = self.queue.clone();
        tokio::task::spawn_blocking(move || operation(&queue))
            .await
            .map_err(|e| CpError::Transport(format!("usage queue: {e}")))?
            .map_err(store_error)
    }

    /// Posts events as they are stored: their JSON is copied into the body, not parsed.
    async fn post(&self, events: &[Box<RawValue>]) -> Result<(), CpError> {
        let batch = TelemetryBatch {
            events: events.iter().map(AsRef::as_ref).collect::<Vec<&RawValue>>(),
        };
        let answer = self
            .cp
            .call(Method::POST, "/dp/telemetry", Some(&batch))
            .await?;
        let answer: TelemetryAnswer =
            serde_json::from_value(answer).map_err(|e| CpError::Malformed(e.to_string()))?;
        let duplicates = answer.duplicates;
        if duplicates > 0 {
            debug!(
                duplicates,
                "usage telemetry: the control plane had some events already"
            );
        }
        Ok(())
    }
}

/// A failure of the local queue, said as such (not as the control plane's).
fn store_error(e: sled::Error) -> CpError {
    CpError::Transport(format!(
        "the local usage queue failed (not the control plane): {e}"
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn event(n: u32) -> UsageEvent {
        UsageEvent {
            event_id: format!("e{n}"),
            request_id: format!("r{n}"),
            api_key_id: "k".into(),
            model: "m".into(),
            provider: "openai".into(),
            served_by: "m".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            cost_usd: 0.0,
            status_code: 200,
            stream: false,
            latency_ms: 1,
            ttft_ms: None,
            timestamp_unix_ms: 1,
            finish_reason: None,
            guardrails: Vec::new(),
        }
    }

    fn ids(queue: &UsageQueue) -> Vec<String> {
        queue
            .front()
            .unwrap()
            .into_iter()
            .map(|(_, raw)| {
                let event: serde_json::Value = serde_json::from_str(raw.get()).unwrap();
                event["event_id"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    #[tokio::test]
    async fn events_keep_their_order_across_reopening_and_the_oldest_go_first_when_full() {
        let dir = tempfile::tempdir().unwrap();
        {
            let queue = Arc::new(UsageQueue::open(dir.path(), 3, 10).unwrap());
            for n in 0..5 {
                queue.record(event(n));
            }
            assert_eq!(queue.status.pending(), 5, "recorded, not yet written");
            assert!(ids(&queue).is_empty());
            queue.flush().await;
            assert_eq!(queue.status.pending(), 3);
            assert_eq!(queue.status.dropped(), 2);
            assert_eq!(ids(&queue), ["e2", "e3", "e4"]);
        }
        let queue = Arc::new(UsageQueue::open(dir.path(), 10, 2).unwrap());
        assert_eq!(queue.status.pending(), 3);
        assert_eq!(queue.status.dropped(), 2, "the dropped count survives");
        assert_eq!(ids(&queue), ["e2", "e3"], "batches are bounded");
        queue.record(event(5));
        queue.flush().await;
        let front = queue.front().unwrap();
        let keys: Vec<_> = front.into_iter().map(|(k, _)| k).collect();
        queue.remove(&keys).unwrap();
        assert_eq!(
            ids(&queue),
            ["e4", "e5"],
            "new events go after restored ones"
        );
        assert_eq!(queue.status.pending(), 2);
    }

    #[tokio::test]
    async fn an_unreadable_event_is_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(UsageQueue::open(dir.path(), 10, 10).unwrap());
        queue.record(event(0));
        queue.flush().await;
        queue
            .state()
            .store
            .clone()
            .unwrap()
            .events
            .insert(u64::MAX.to_be_bytes(), b"{not json".to_vec())
            .unwrap();
        queue.status.pending.fetch_add(1, Ordering::Relaxed);
        assert_eq!(ids(&queue), ["e0"]);
        assert_eq!(queue.status.pending(), 1);
        assert_eq!(queue.status.dropped(), 1);
    }

    #[tokio::test]
    async fn without_the_database_events_are_delivered_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(UsageQueue::open(dir.path(), 10, 2).unwrap());
        // The disk fails (as on a full disk: sled refuses writes, the handle is dropped).
        {
            let mut state = queue.state();
            let error = sled::Error::Unsupported("disk full".into());
            queue.broken(&mut state, &error);
        }
        for n in 0..3 {
            queue.record(event(n));
        }
        queue.flush().await;
        assert_eq!(queue.status.pending(), 3);
        // The sender reads and acknowledges in batches, in order, from memory.
        let front = queue.front().unwrap();
        assert_eq!(ids(&queue), ["e0", "e1"]);
        let keys: Vec<_> = front.into_iter().map(|(k, _)| k).collect();
        queue.remove(&keys).unwrap();
        assert_eq!(ids(&queue), ["e2"]);
        assert_eq!(queue.status.pending(), 1);
        // When the disk is back, what was not delivered is written to it.
        queue.reopen().unwrap();
        assert_eq!(ids(&queue), ["e2"]);
        assert_eq!(queue.status.pending(), 1);
    }

    #[tokio::test]
    async fn recording_never_waits_for_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(UsageQueue::open(dir.path(), 10, 10).unwrap());
        // A write in progress (a slow disk) holds the database side; a call records anyway.
        let writing = queue.state();
        let recorder = queue.clone();
        let recorded = std::thread::spawn(move || recorder.record(event(0)));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !recorded.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "record() waited for the database"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(writing);
        assert_eq!(queue.status.pending(), 1);
        queue.flush().await;
        assert_eq!(ids(&queue), ["e0"]);
    }
}
