//! The configuration snapshot every request reads, and the store that swaps it.
//!
//! A source (file, etcd, control plane, cache) turns what it sees into [`SourceEvent`]s.
//! [`SnapshotStore::apply`] prepares the next snapshot with the incremental builder
//! (which may reject single resources, never the batch) and commits it with one
//! `ArcSwap::store`. Requests call [`SnapshotStore::load`] once and keep that snapshot
//! to the end, so no request sees half of an update.

mod builder;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::Serialize;
use tokio::time::Instant;

pub use builder::BatchReport;
use builder::Builder;

use crate::resources::{ApiKey, Attachment, Guardrail, KeyHash, Model, ProviderKey, ResourceKey};

/// Where the serving configuration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Etcd,
    ControlPlane,
    Cache,
    File,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Etcd => "etcd",
            Source::ControlPlane => "control_plane",
            Source::Cache => "cache",
            Source::File => "file",
        }
    }
}

/// What a configuration source reports. Keys are full storage keys (`<prefix>/<kind>/<id>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// The complete set of resources as of `revision` (after a full list).
    Reset {
        entries: Vec<(String, Bytes)>,
        revision: i64,
    },
    Put {
        key: String,
        value: Bytes,
        revision: i64,
    },
    Delete {
        key: String,
        revision: i64,
    },
    /// The source is healthy and has nothing newer than `revision`.
    Progress {
        revision: i64,
    },
}

/// A resource the snapshot does not serve as written, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub key: ResourceKey,
    pub error: String,
    pub since_unix: u64,
    /// True when the key's previous good value is still being served.
    pub serving_previous: bool,
}

/// An immutable, indexed view of the configuration. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub revision: i64,
    provider_keys: imbl::HashMap<Arc<str>, Arc<ProviderKey>>,
    models: imbl::HashMap<Arc<str>, Arc<Model>>,
    api_keys: imbl::HashMap<KeyHash, Arc<ApiKey>>,
    /// In evaluation order ([`Guardrail::order`]).
    guardrails: imbl::OrdMap<(bool, i128, Arc<str>), Arc<Guardrail>>,
    /// By (guardrail id, attachment id).
    attachments: imbl::OrdMap<(Arc<str>, Arc<str>), Arc<Attachment>>,
    rejected: imbl::OrdMap<ResourceKey, Rejection>,
}

impl Snapshot {
    /// The model a caller names in `"model"`.
    pub fn model(&self, alias: &str) -> Option<&Arc<Model>> {
        self.models.get(alias)
    }

    pub fn provider_key(&self, id: &str) -> Option<&Arc<ProviderKey>> {
        self.provider_keys.get(id)
    }

    pub fn api_key(&self, hash: &KeyHash) -> Option<&Arc<ApiKey>> {
        self.api_keys.get(hash)
    }

    pub fn models(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.models.values()
    }

    /// Guardrails in evaluation order: by `created_at`, oldest first, then those
    /// without it; ties by id.
    pub fn guardrails(&self) -> impl Iterator<Item = &Arc<Guardrail>> {
        self.guardrails.values()
    }

    /// The attachments that name guardrail `id`.
    pub fn attachments_of<'a>(
        &'a self,
        id: &'a Arc<str>,
    ) -> impl Iterator<Item = &'a Arc<Attachment>> {
        // The smallest attachment id: the range starts at the guardrail's first one.
        static FIRST: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
        let from: (Arc<str>, Arc<str>) = (id.clone(), FIRST.clone());
        self.attachments
            .range(from..)
            .take_while(move |((g, _), _)| g == id)
            .map(|(_, a)| a)
    }

    pub fn attachment_count(&self) -> usize {
        self.attachments.len()
    }

    pub fn rejections(&self) -> impl Iterator<Item = &Rejection> {
        self.rejected.values()
    }

    /// Served resources per kind: (provider keys, models, api keys).
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.provider_keys.len(),
            self.models.len(),
            self.api_keys.len(),
        )
    }
}

/// A rejected resource in status reports (heartbeats, `/status/config`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectedResource {
    /// The full storage key.
    pub key: String,
    pub kind: &'static str,
    pub error: String,
    pub since_unix: u64,
    /// The previous good version of the resource is still served.
    pub serving_previous: bool,
}

/// Snapshot freshness, as admin health and heartbeats report it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Freshness {
    pub source: Option<Source>,
    pub revision: i64,
    /// Time since the last apply or progress; `None` before the first.
    pub age: Option<Duration>,
}

/// Holds the current snapshot and applies source events to it.
pub struct SnapshotStore {
    prefix: String,
    current: ArcSwap<Snapshot>,
    builder: Mutex<Builder>,
    freshness: Mutex<(Option<Source>, Option<Instant>)>,
    commits: tokio::sync::watch::Sender<u64>,
}

/// The resources worth keeping across a restart: every key's last self-valid document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Documents {
    pub revision: i64,
    pub entries: Vec<(String, Bytes)>,
}

impl SnapshotStore {
    /// `prefix` is the storage prefix without a trailing slash, e.g. `/aisix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into().trim_end_matches('/').to_owned(),
            current: ArcSwap::from_pointee(Snapshot::default()),
            builder: Mutex::new(Builder::default()),
            freshness: Mutex::new((None, None)),
            commits: tokio::sync::watch::Sender::new(0),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The snapshot to use for one whole request.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Applies a batch of events from `source` and commits the result atomically.
    /// Keys outside the prefix or of unknown kinds are ignored (and logged at debug).
    pub fn apply(
        &self,
        source: Source,
        events: impl IntoIterator<Item = SourceEvent>,
    ) -> BatchReport {
        let mut builder = lock(&self.builder);
        let mut dirty = BTreeSet::new();
        let mut changed = 0;
        let mut revision = builder.snapshot.revision;
        for event in events {
            match event {
                SourceEvent::Reset {
                    entries,
                    revision: r,
                } => {
                    let mut seen = BTreeSet::new();
                    for (key, value) in entries {
                        if let Some(k) = self.key(&key) {
                            seen.insert(k.clone());
                            changed += usize::from(builder.put(k, value, &mut dirty));
                        }
                    }
                    let gone: Vec<ResourceKey> = builder
                        .keys()
                        .filter(|k| !seen.contains(*k))
                        .cloned()
                        .collect();
                    for k in gone {
                        changed += usize::from(builder.delete(&k, &mut dirty));
                    }
                    revision = r;
                }
                SourceEvent::Put {
                    key,
                    value,
                    revision: r,
                } => {
                    if let Some(k) = self.key(&key) {
                        changed += usize::from(builder.put(k, value, &mut dirty));
                    }
                    revision = revision.max(r);
                }
                SourceEvent::Delete { key, revision: r } => {
                    if let Some(k) = self.key(&key) {
                        changed += usize::from(builder.delete(&k, &mut dirty));
                    }
                    revision = revision.max(r);
                }
                SourceEvent::Progress { revision: r } => revision = revision.max(r),
            }
        }
        let mut report = BatchReport {
            changed_keys: changed,
            ..BatchReport::default()
        };
        builder.settle(dirty, &mut report);
        builder.snapshot.revision = revision;
        self.current.store(Arc::new(builder.snapshot.clone()));
        drop(builder);
        *lock(&self.freshness) = (Some(source), Some(Instant::now()));
        log_report(&self.prefix, &report);
        if report.changed_keys > 0 || !report.newly_rejected.is_empty() {
            self.commits.send_modify(|n| *n += 1);
        }
        report
    }

    /// Changes whenever a batch changed the configuration (not on progress alone), so a
    /// writer can persist the latest state off the request path.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// Every key's last self-valid document and the revision they reflect, consistent
    /// with each other. O(n); meant for the cache writer, not the request path.
    pub fn documents(&self) -> Documents {
        let builder = lock(&self.builder);
        let mut entries: Vec<(String, Bytes)> = builder
            .good_documents()
            .map(|(k, raw)| (k.full(&self.prefix), raw.clone()))
            .collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Documents {
            revision: builder.snapshot.revision,
            entries,
        }
    }

    /// SHA-256 (hex) over every key and kept document: equal hashes, equal config.
    pub fn config_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for (key, value) in self.documents().entries {
            hasher.update(key.as_bytes());
            hasher.update([0]);
            hasher.update(&value);
            hasher.update([0]);
        }
        hex::encode(hasher.finalize())
    }

    /// The rejected resources of the current snapshot, as status reports show them.
    pub fn rejected(&self) -> Vec<RejectedResource> {
        self.load()
            .rejections()
            .map(|r| RejectedResource {
                key: r.key.full(&self.prefix),
                kind: r.key.kind.as_str(),
                error: r.error.clone(),
                since_unix: r.since_unix,
                serving_previous: r.serving_previous,
            })
            .collect()
    }

    /// Configuration batches that changed the snapshot since start.
    pub fn applies(&self) -> u64 {
        *self.commits.borrow()
    }

    /// Dates the data being served back by `age`: a snapshot restored from a cache is
    /// as old as the cache, not as the restore, until the live source applies.
    pub fn backdate(&self, age: Duration) {
        let mut freshness = lock(&self.freshness);
        if let Some(at) = Instant::now().checked_sub(age) {
            freshness.1 = Some(at);
        }
    }

    pub fn freshness(&self) -> Freshness {
        let (source, at) = *lock(&self.freshness);
        Freshness {
            source,
            revision: self.current.load().revision,
            age: at.map(|t| t.elapsed()),
        }
    }

    fn key(&self, key: &str) -> Option<ResourceKey> {
        ResourceKey::parse(&self.prefix, key)
            .inspect_err(|e| tracing::debug!(key, error = %e, "ignoring key"))
            .ok()
    }
}

fn log_report(prefix: &str, report: &BatchReport) {
    for r in &report.newly_rejected {
        tracing::warn!(
            key = %r.key.full(prefix),
            error = %r.error,
            serving_previous = r.serving_previous,
            "resource rejected"
        );
    }
    for key in &report.recovered {
        tracing::info!(key = %format!("{prefix}/{key}"), "resource accepted again");
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the builder half-written in a way
    // that matters more than stopping the configuration flow, so keep going.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
