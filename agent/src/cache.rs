//! The last good snapshot on disk, in a sled database under the state directory.
//!
//! After each committed change a background writer stores every key's last self-valid
//! document with the revision they reflect, as one generation: a SHA-256 checksum
//! followed by a JSON body. The previous generation is kept beside it, and both are
//! replaced in one atomic sled batch, then flushed, so a `kill -9` at any moment
//! leaves a complete generation behind. At start the agent restores the newest
//! generation that verifies, before contacting any source; a corrupt or unreadable
//! cache is reported and ignored (an unopenable database is moved aside), never fatal.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use proxy_core::snapshot::{Documents, SnapshotStore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

const CURRENT: &[u8] = b"snapshot/current";
const PREVIOUS: &[u8] = b"snapshot/previous";
const FORMAT: u32 = 1;
const NAME: &str = "snapshot-cache";
/// How soon a failed cache write is tried again when no new change comes first.
const RETRY: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("snapshot cache {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("snapshot cache: {0}")]
    Db(#[from] sled::Error),
    #[error("snapshot cache: {0}")]
    Encode(#[from] serde_json::Error),
}

/// One stored generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Generation {
    format: u32,
    prefix: String,
    revision: i64,
    saved_unix: u64,
    entries: Vec<(String, String)>,
}

/// What a restart begins from.
#[derive(Debug, Clone)]
pub struct Restored {
    pub revision: i64,
    pub saved_unix: u64,
    pub entries: Vec<(String, Bytes)>,
    /// Whether the newest generation was unusable and the previous one was used.
    pub fell_back: bool,
}

pub struct SnapshotCache {
    /// `None` after a failed write: sled refuses every later write once it has met an
    /// I/O error (a full disk), so the next save opens the database again.
    db: std::sync::Mutex<Option<sled::Db>>,
    path: PathBuf,
    prefix: String,
}

impl SnapshotCache {
    /// Opens (or creates) the cache under `dir`. A database that cannot be opened is
    /// moved aside, reported, and replaced by an empty one.
    pub fn open(dir: &Path, prefix: &str) -> Result<Self, CacheError> {
        Ok(Self {
            db: std::sync::Mutex::new(Some(open_or_replace(dir, NAME, "snapshot cache")?)),
            path: dir.join(NAME),
            prefix: prefix.to_owned(),
        })
    }

    /// The newest generation that verifies, if any. Problems are logged, not returned.
    pub fn restore(&self) -> Option<Restored> {
        let mut fell_back = false;
        for (name, key) in [("current", CURRENT), ("previous", PREVIOUS)] {
            match self.read(key) {
                Ok(Some(g)) => {
                    return Some(Restored {
                        revision: g.revision,
                        saved_unix: g.saved_unix,
                        entries: g
                            .entries
                            .into_iter()
                            .map(|(k, v)| (k, Bytes::from(v)))
                            .collect(),
                        fell_back,
                    });
                }
                Ok(None) => {}
                Err(problem) => {
                    warn!(generation = name, error = %problem, "snapshot cache generation ignored");
                    fell_back = true;
                }
            }
        }
        None
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Option<sled::Db>> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self, key: &[u8]) -> Result<Option<Generation>, String> {
        let db = self.db();
        let Some(db) = db.as_ref() else {
            return Ok(None);
        };
        let Some(blob) = db.get(key).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let (sum, body) = blob
            .split_at_checked(32)
            .ok_or_else(|| "truncated".to_owned())?;
        if Sha256::digest(body).as_slice() != sum {
            return Err("checksum mismatch".to_owned());
        }
        let g: Generation = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        if g.format != FORMAT {
            return Err(format!("unknown format {}", g.format));
        }
        if g.prefix != self.prefix {
            return Err(format!(
                "written for prefix {} (this agent uses {})",
                g.prefix, self.prefix
            ));
        }
        Ok(Some(g))
    }

    /// Stores `documents` as the current generation (the old one becomes previous) and
    /// flushes. Blocking: call from a blocking thread.
    pub fn save(&self, documents: &Documents) -> Result<(), CacheError> {
        let generation = Generation {
            format: FORMAT,
            prefix: self.prefix.clone(),
            revision: documents.revision,
            saved_unix: unix_now(),
            entries: documents
                .entries
                .iter()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                .collect(),
        };
        let body = serde_json::to_vec(&generation)?;
        let mut blob = Sha256::digest(&body).to_vec();
        blob.extend_from_slice(&body);
        let mut db = self.db();
        let handle = match db.take() {
            Some(handle) => handle,
            None => open_again(&self.path)?,
        };
        let written = (|| {
            let mut batch = sled::Batch::default();
            if let Some(current) = handle.get(CURRENT)? {
                batch.insert(PREVIOUS, current);
            }
            batch.insert(CURRENT, blob);
            handle.apply_batch(batch)?;
            handle.flush()?;
            Ok::<_, CacheError>(())
        })();
        if written.is_ok() {
            *db = Some(handle);
        }
        written
    }

    #[cfg(test)]
    fn corrupt_current(&self) {
        self.db()
            .as_ref()
            .unwrap()
            .insert(CURRENT, b"garbage".to_vec())
            .unwrap();
    }
}

/// Opens (or creates) the sled database `dir/name`. One that cannot be opened is moved
/// aside (`name.unreadable-<unix time>`), reported, and replaced by an empty one.
/// `what` names it in the report.
pub fn open_or_replace(dir: &Path, name: &str, what: &str) -> Result<sled::Db, CacheError> {
    let path = dir.join(name);
    std::fs::create_dir_all(dir).map_err(|e| CacheError::Open {
        path: dir.to_owned(),
        message: e.to_string(),
    })?;
    match open_db(&path) {
        Ok(db) => Ok(db),
        Err(Unopened::Locked(message)) => Err(CacheError::Open {
            path,
            message: format!(
                "in use by another process ({message}); each agent needs its own state directory"
            ),
        }),
        Err(Unopened::Damaged(message)) => {
            let aside = dir.join(format!("{name}.unreadable-{}", unix_now()));
            warn!(path = %path.display(), error = %message, moved_to = %aside.display(), "{what} unreadable; ignoring it and starting a new one");
            std::fs::rename(&path, &aside).map_err(|e| CacheError::Open {
                path: path.clone(),
                message: format!("{message}; and it cannot be moved aside: {e}"),
            })?;
            open_db(&path).map_err(|e| CacheError::Open {
                path,
                message: match e {
                    Unopened::Locked(m) | Unopened::Damaged(m) => m,
                },
            })
        }
    }
}

/// Opens a database again after its handle failed (nothing is moved aside: the
/// failure was the disk's, not the data's).
pub fn open_again(path: &Path) -> Result<sled::Db, CacheError> {
    open_db(path).map_err(|e| CacheError::Open {
        path: path.to_owned(),
        message: match e {
            Unopened::Locked(m) | Unopened::Damaged(m) => m,
        },
    })
}

/// Why a database did not open: held by someone else (never moved aside), or damaged.
enum Unopened {
    Locked(String),
    Damaged(String),
}

/// Opens a sled database. A lock held elsewhere is waited for briefly (a database
/// closed a moment ago in this process may still be releasing it), then reported.
fn open_db(path: &Path) -> Result<sled::Db, Unopened> {
    let mut waited = std::time::Duration::ZERO;
    loop {
        // sled reports most damage as errors, but a mangled file can also make it
        // panic; either way the cache is unusable and must not take the agent down.
        let attempt = std::panic::catch_unwind(|| {
            sled::Config::new()
                .path(path)
                .cache_capacity(PAGE_CACHE_BYTES)
                .open()
        });
        match attempt {
            Ok(Ok(db)) => return Ok(db),
            // sled says so only in its message (an `Other` I/O error).
            Ok(Err(sled::Error::Io(e))) if e.to_string().contains("could not acquire lock") => {
                if waited >= LOCK_WAIT {
                    return Err(Unopened::Locked(e.to_string()));
                }
                std::thread::sleep(LOCK_RETRY);
                waited += LOCK_RETRY;
            }
            Ok(Err(e)) => return Err(Unopened::Damaged(e.to_string())),
            Err(_) => return Err(Unopened::Damaged("the database is damaged".to_owned())),
        }
    }
}

/// sled's page cache per database. Its default (1 GiB) let the usage queue's
/// resident memory grow by ≈ 50 MiB for every 85,000 events queued during an outage
/// and keep it; both databases are written far more than they are read, so a small
/// cache costs nothing measurable.
const PAGE_CACHE_BYTES: u64 = 4 << 20;
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// Restores the cached snapshot into `store` (source `cache`). Returns whether one was
/// applied.
pub fn restore_into(cache: &SnapshotCache, store: &SnapshotStore) -> bool {
    let Some(restored) = cache.restore() else {
        info!("no snapshot cache to start from");
        return false;
    };
    let keys = restored.entries.len();
    store.apply(
        proxy_core::snapshot::Source::Cache,
        [proxy_core::snapshot::SourceEvent::Reset {
            entries: restored.entries,
            revision: restored.revision,
        }],
    );
    // The data is as old as the cache: operators read `snapshot_age_seconds` that way.
    store.backdate(std::time::Duration::from_secs(
        unix_now().saturating_sub(restored.saved_unix),
    ));
    info!(
        revision = restored.revision,
        keys,
        saved_unix = restored.saved_unix,
        previous_generation = restored.fell_back,
        "serving the cached snapshot until the configuration source answers"
    );
    true
}

/// Writes the snapshot after every committed change, off the request path, until
/// shutdown; a last write happens at shutdown if a change is pending.
pub async fn run_writer(
    cache: Arc<SnapshotCache>,
    store: Arc<SnapshotStore>,
    shutdown: CancellationToken,
) {
    let mut commits = store.subscribe();
    commits.mark_unchanged();
    let mut failed = false;
    loop {
        let stopping = tokio::select! {
            () = shutdown.cancelled() => true,
            changed = commits.changed() => changed.is_err(),
            () = tokio::time::sleep(RETRY), if failed => false,
        };
        if stopping && !failed && !commits.has_changed().unwrap_or(false) {
            return;
        }
        commits.mark_unchanged();
        let documents = store.documents();
        let revision = documents.revision;
        let cache = cache.clone();
        let saved = tokio::task::spawn_blocking(move || cache.save(&documents)).await;
        let ok = matches!(saved, Ok(Ok(())));
        match saved {
            Ok(Ok(())) if failed => {
                info!(revision, "snapshot cache written again");
            }
            Ok(Ok(())) => info!(revision, "snapshot cache written"),
            Ok(Err(e)) if failed => {
                debug!(error = %e, revision, "snapshot cache still not writable");
            }
            Ok(Err(e)) => {
                warn!(error = %e, revision, "cannot write the snapshot cache; serving is unaffected; retrying");
            }
            Err(e) => warn!(error = %e, "snapshot cache writer failed"),
        }
        failed = !ok;
        if stopping {
            return;
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(revision: i64, n: usize) -> Documents {
        Documents {
            revision,
            entries: (0..n)
                .map(|i| {
                    (
                        format!("/aisix/provider_keys/p{i}"),
                        Bytes::from(format!(r#"{{"display_name":"p{i}"}}"#)),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn round_trip_fallback_and_prefix_check() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = SnapshotCache::open(dir.path(), "/aisix").unwrap();
            assert!(cache.restore().is_none());
            cache.save(&docs(5, 2)).unwrap();
            cache.save(&docs(9, 3)).unwrap();
        }
        let cache = SnapshotCache::open(dir.path(), "/aisix").unwrap();
        let r = cache.restore().unwrap();
        assert_eq!((r.revision, r.entries.len(), r.fell_back), (9, 3, false));
        assert_eq!(&r.entries[2].1[..], br#"{"display_name":"p2"}"#);

        cache.corrupt_current();
        let r = cache.restore().unwrap();
        assert_eq!((r.revision, r.entries.len(), r.fell_back), (5, 2, true));
        drop(cache);

        let other = SnapshotCache::open(dir.path(), "/other").unwrap();
        assert!(other.restore().is_none());
    }

    #[test]
    fn a_database_in_use_is_reported_not_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let _held = SnapshotCache::open(dir.path(), "/aisix").unwrap();
        let e = SnapshotCache::open(dir.path(), "/aisix")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("in use by another process"), "{e}");
        let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(entries.len(), 1, "nothing was moved aside");
    }

    #[test]
    fn an_unreadable_database_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot-cache");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("conf"), b"\x00\xffnot a sled config").unwrap();
        std::fs::write(path.join("db"), vec![0xa5u8; 4096]).unwrap();
        let cache = SnapshotCache::open(dir.path(), "/aisix").unwrap();
        assert!(cache.restore().is_none());
        cache.save(&docs(3, 1)).unwrap();
        assert_eq!(cache.restore().unwrap().revision, 3);
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("snapshot-cache.unreadable-")
            });
        assert!(aside);
    }
}
