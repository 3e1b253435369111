//! The control plane's key-value store: one global revision, per-key create/mod
//! revisions and versions, a history of changes for watches (trimmed by compaction),
//! and a broadcast of every change to open watches. Semantics follow etcd's MVCC as far
//! as the agent's watcher can observe them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// One stored key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub value: String,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
}

/// One change, as watches deliver it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub revision: i64,
    pub key: String,
    /// `None` for a delete.
    pub entry: Option<Entry>,
    /// The key's entry before this change (to read the past).
    prev: Option<Entry>,
}

/// What the store persists: current keys and revisions (not the history; after a
/// restart watches older than the restored revision are answered as compacted).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KvImage {
    pub revision: i64,
    pub keys: BTreeMap<String, Entry>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error("mvcc: required revision has been compacted")]
    Compacted { compact_revision: i64 },
    #[error("mvcc: required revision is a future revision")]
    Future,
}

struct State {
    revision: i64,
    compact_revision: i64,
    keys: BTreeMap<String, Entry>,
    history: VecDeque<Arc<Change>>,
}

pub struct Kv {
    state: Mutex<State>,
    changes: broadcast::Sender<Arc<Change>>,
}

/// The start of a watch: past changes to replay, then the live feed.
pub struct WatchStart {
    pub revision: i64,
    pub replay: Vec<Arc<Change>>,
    pub live: broadcast::Receiver<Arc<Change>>,
}

impl Kv {
    pub fn new(image: KvImage) -> Self {
        Self {
            state: Mutex::new(State {
                revision: image.revision.max(1),
                // The history before a restart is gone.
                compact_revision: image.revision.max(1),
                keys: image.keys,
                history: VecDeque::new(),
            }),
            changes: broadcast::channel(4096).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn image(&self) -> KvImage {
        let s = self.lock();
        KvImage {
            revision: s.revision,
            keys: s.keys.clone(),
        }
    }

    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    pub fn compact_revision(&self) -> i64 {
        self.lock().compact_revision
    }

    pub fn put(&self, key: &str, value: String) -> i64 {
        let mut s = self.lock();
        s.revision += 1;
        let revision = s.revision;
        let prev = s.keys.get(key).cloned();
        let entry = Entry {
            value,
            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
            mod_revision: revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
        };
        s.keys.insert(key.to_owned(), entry.clone());
        self.record(
            &mut s,
            Change {
                revision,
                key: key.to_owned(),
                entry: Some(entry),
                prev,
            },
        );
        revision
    }

    /// Deletes `key`; `None` when it did not exist (no revision is used).
    pub fn delete(&self, key: &str) -> Option<i64> {
        let mut s = self.lock();
        let prev = s.keys.remove(key)?;
        s.revision += 1;
        let revision = s.revision;
        self.record(
            &mut s,
            Change {
                revision,
                key: key.to_owned(),
                entry: None,
                prev: Some(prev),
            },
        );
        Some(revision)
    }

    fn record(&self, s: &mut State, change: Change) {
        let change = Arc::new(change);
        s.history.push_back(change.clone());
        // Nobody listening is fine.
        let _ = self.changes.send(change);
    }

    /// Forgets history before `revision` (at most the current revision).
    pub fn compact(&self, revision: i64) -> Result<i64, KvError> {
        let mut s = self.lock();
        if revision > s.revision {
            return Err(KvError::Future);
        }
        if revision < s.compact_revision {
            return Err(KvError::Compacted {
                compact_revision: s.compact_revision,
            });
        }
        s.compact_revision = revision;
        while s.history.front().is_some_and(|c| c.revision < revision) {
            s.history.pop_front();
        }
        Ok(revision)
    }

    /// Keys in `[start, end)` (or just `start` when `end` is `None`) as of `at` (0 means
    /// now), with the store revision they were read at.
    pub fn range(
        &self,
        start: &str,
        end: Option<&str>,
        at: i64,
    ) -> Result<(i64, Vec<(String, Entry)>), KvError> {
        let s = self.lock();
        let at = if at <= 0 { s.revision } else { at };
        if at > s.revision {
            return Err(KvError::Future);
        }
        if at < s.compact_revision {
            return Err(KvError::Compacted {
                compact_revision: s.compact_revision,
            });
        }
        let in_range = |k: &str| match end {
            Some(end) => k >= start && k < end,
            None => k == start,
        };
        let mut view: BTreeMap<String, Entry> = match end {
            Some(end) if start < end => s
                .keys
                .range(start.to_owned()..end.to_owned())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            Some(_) => BTreeMap::new(),
            None => s
                .keys
                .get_key_value(start)
                .map(|(k, v)| (k.clone(), v.clone()))
                .into_iter()
                .collect(),
        };
        // Undo what happened after `at`, newest first.
        for change in s.history.iter().rev().take_while(|c| c.revision > at) {
            if !in_range(&change.key) {
                continue;
            }
            match &change.prev {
                Some(prev) => view.insert(change.key.clone(), prev.clone()),
                None => view.remove(&change.key),
            };
        }
        Ok((s.revision, view.into_iter().collect()))
    }

    /// Opens a watch from `start_revision` (0 means from now on).
    pub fn watch(&self, start_revision: i64) -> Result<WatchStart, KvError> {
        let s = self.lock();
        if start_revision > 0 && start_revision < s.compact_revision {
            return Err(KvError::Compacted {
                compact_revision: s.compact_revision,
            });
        }
        let replay = if start_revision > 0 {
            s.history
                .iter()
                .filter(|c| c.revision >= start_revision)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        Ok(WatchStart {
            revision: s.revision,
            replay,
            live: self.changes.subscribe(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv() -> Kv {
        Kv::new(KvImage::default())
    }

    fn keys(v: &[(String, Entry)]) -> Vec<(&str, &str)> {
        v.iter()
            .map(|(k, e)| (k.as_str(), e.value.as_str()))
            .collect()
    }

    #[test]
    fn revisions_versions_and_ranges() {
        let kv = kv();
        assert_eq!(kv.put("/a/1", "x".into()), 2);
        assert_eq!(kv.put("/a/2", "y".into()), 3);
        assert_eq!(kv.put("/a/1", "x2".into()), 4);
        assert_eq!(kv.put("/b/1", "z".into()), 5);
        let (rev, now) = kv.range("/a/", Some("/a0"), 0).unwrap();
        assert_eq!(rev, 5);
        assert_eq!(keys(&now), [("/a/1", "x2"), ("/a/2", "y")]);
        assert_eq!(
            (
                now[0].1.create_revision,
                now[0].1.mod_revision,
                now[0].1.version
            ),
            (2, 4, 2)
        );
        assert_eq!(kv.delete("/a/2"), Some(6));
        assert_eq!(kv.delete("/a/2"), None);
        // Reading the past undoes later changes.
        let (_, then) = kv.range("/a/", Some("/a0"), 3).unwrap();
        assert_eq!(keys(&then), [("/a/1", "x"), ("/a/2", "y")]);
        let (_, one) = kv.range("/a/1", None, 0).unwrap();
        assert_eq!(keys(&one), [("/a/1", "x2")]);
        assert_eq!(kv.range("/a/", Some("/a0"), 99), Err(KvError::Future));
    }

    #[test]
    fn compaction_limits_history() {
        let kv = kv();
        for i in 0..5 {
            kv.put(&format!("/k/{i}"), "v".into());
        }
        assert_eq!(kv.compact(4), Ok(4));
        assert_eq!(
            kv.range("/k/", Some("/k0"), 3).unwrap_err(),
            KvError::Compacted {
                compact_revision: 4
            }
        );
        assert!(matches!(
            kv.watch(3),
            Err(KvError::Compacted {
                compact_revision: 4
            })
        ));
        let w = kv.watch(4).unwrap();
        assert_eq!(
            w.replay.iter().map(|c| c.revision).collect::<Vec<_>>(),
            [4, 5, 6]
        );
        assert_eq!(
            kv.compact(2),
            Err(KvError::Compacted {
                compact_revision: 4
            })
        );
    }

    #[tokio::test]
    async fn watches_replay_then_follow_live_changes() {
        let kv = kv();
        kv.put("/k/a", "1".into());
        let mut w = kv.watch(2).unwrap();
        assert_eq!(w.replay.len(), 1);
        kv.delete("/k/a");
        let live = w.live.recv().await.unwrap();
        assert_eq!((live.revision, live.entry.is_none()), (3, true));
        // A restored store answers older watches as compacted.
        let restored = Kv::new(kv.image());
        assert!(matches!(restored.watch(2), Err(KvError::Compacted { .. })));
        assert_eq!(restored.revision(), 3);
    }
}
