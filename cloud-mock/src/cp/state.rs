//! What the control plane remembers: environments, gateways and the certificates issued
//! to them, enrollment tokens, budgets and spend, settings, and (with the CA and the
//! key-value image) how it is kept across restarts in a state directory.
//!
//! `state.json` (mode 0600, replaced atomically after every change; heartbeat records
//! ride along with the next change or the shutdown save) holds all of it but
//! the usage events, which are appended to `usage.jsonl` and synced before they are
//! acknowledged. The directory is 0700.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::kv::KvImage;

pub const STATE_FILE: &str = "state.json";
pub const USAGE_FILE: &str = "usage.jsonl";
const FORMAT: u32 = 1;
/// Usage events kept in memory for the console (all ids are kept for idempotency).
pub const RECENT_EVENTS: usize = 10_000;

/// A PEM certificate and its private key.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Everything in `state.json`.
#[derive(Serialize, Deserialize)]
pub struct Persisted {
    pub format: u32,
    pub console_token: String,
    /// Every CA this control plane has used, the current one last. Client
    /// certificates from any of them are trusted.
    pub cas: Vec<StoredCert>,
    pub server: Option<StoredCert>,
    pub registry: Registry,
    pub kv: KvImage,
}

impl Persisted {
    pub fn new(console_token: String, ca: StoredCert) -> Self {
        Self {
            format: FORMAT,
            console_token,
            cas: vec![ca],
            server: None,
            registry: Registry::default(),
            kv: KvImage::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    #[default]
    Open,
    Closed,
    Sticky,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
    /// Never resets.
    Total,
}

/// A caller key's budget in one environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub limit_usd: f64,
    pub period: Period,
    #[serde(default)]
    pub fail_mode: FailMode,
    /// How long gateways may cache the answer; the settings' default when unset.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

/// Spend in the period that started at `period_start_unix`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Spend {
    pub spent_usd: f64,
    pub period_start_unix: i64,
}

/// One certificate issued to a gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertRecord {
    pub serial: String,
    pub issued_unix: i64,
    pub not_after_unix: i64,
    /// `bundle`, `enrollment` or `rotation`.
    pub how: String,
}

/// One agent process (instance) of a gateway, as its heartbeats describe it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    pub last_seen_unix_ms: i64,
    pub heartbeats: u64,
    pub last: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gateway {
    pub env_id: String,
    pub dp_id: String,
    pub revoked: bool,
    /// Lifetime given to certificates issued on rotation.
    pub validity_secs: u64,
    /// The next heartbeat answer asks for a rotation (cleared when one happens).
    pub rotate_requested: bool,
    pub certificates: Vec<CertRecord>,
    pub instances: BTreeMap<String, Instance>,
}

impl Gateway {
    pub fn new(env_id: &str, dp_id: &str, validity_secs: u64) -> Self {
        Self {
            env_id: env_id.to_owned(),
            dp_id: dp_id.to_owned(),
            revoked: false,
            validity_secs,
            rotate_requested: false,
            certificates: Vec::new(),
            instances: BTreeMap::new(),
        }
    }
}

/// An enrollment token, stored by the SHA-256 of its secret (never the token itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub env_id: String,
    pub dp_id: String,
    pub expires_unix: i64,
    pub used_unix: Option<i64>,
    pub validity_secs: u64,
}

/// Knobs the console can turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Sent in heartbeat answers when set.
    pub heartbeat_interval_secs: Option<u64>,
    /// Gap between watch progress notifications.
    pub progress_interval_ms: u64,
    /// The fail mode answered for keys without a budget.
    pub default_fail_mode: FailMode,
    /// Budget answers' TTL when a budget does not set one.
    pub budget_ttl_seconds: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            heartbeat_interval_secs: None,
            progress_interval_ms: 5_000,
            default_fail_mode: FailMode::Open,
            budget_ttl_seconds: 5,
        }
    }
}

/// Keys of the per-environment maps: `<env>/<id>`.
pub fn scoped(env: &str, id: &str) -> String {
    format!("{env}/{id}")
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Registry {
    pub environments: BTreeSet<String>,
    /// By `<env>/<dp>`.
    pub gateways: BTreeMap<String, Gateway>,
    /// By SHA-256 (hex) of the token's secret.
    pub tokens: BTreeMap<String, EnrollmentToken>,
    /// By `<env>/<api_key_id>`.
    pub budgets: BTreeMap<String, Budget>,
    /// By `<env>/<api_key_id>`.
    pub spend: BTreeMap<String, Spend>,
    pub settings: Settings,
}

/// A usage event as received, with the environment of the gateway that sent it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredEvent {
    pub env_id: String,
    pub dp_id: String,
    pub received_unix_ms: i64,
    pub event: Value,
}

/// Received usage events: every id seen (for idempotency) and the most recent events.
/// The ids are a B-tree, which grows a node at a time: a hash set doubles, and moving
/// millions of ids at once stalled the whole machine in the soak.
#[derive(Default)]
pub struct UsageLog {
    seen: BTreeSet<(String, String)>,
    pub recent: VecDeque<StoredEvent>,
    /// Events received again (same `event_id`) per environment since the start.
    pub duplicates: HashMap<String, u64>,
    file: Option<fs::File>,
}

impl UsageLog {
    /// Opens (or creates) `usage.jsonl` in `dir` and reads what it holds; a damaged
    /// line is skipped and reported.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(USAGE_FILE);
        let mut log = Self::default();
        if let Ok(file) = fs::File::open(&path) {
            for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
                let parsed = line
                    .map_err(anyhow::Error::from)
                    .and_then(|l| Ok(serde_json::from_str::<StoredEvent>(&l)?));
                match parsed {
                    Ok(event) => log.remember(event),
                    Err(e) => tracing::warn!(
                        file = %path.display(),
                        line = n + 1,
                        error = %e,
                        "skipping a damaged usage event"
                    ),
                }
            }
        }
        log.file = Some(
            fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&path)?,
        );
        Ok(log)
    }

    fn remember(&mut self, event: StoredEvent) {
        if let Some(id) = event.event.get("event_id").and_then(Value::as_str) {
            self.seen.insert((event.env_id.clone(), id.to_owned()));
        }
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(event);
    }

    pub fn seen(&self, env: &str, event_id: &str) -> bool {
        self.seen.contains(&(env.to_owned(), event_id.to_owned()))
    }

    /// Records new events, durably (synced) when the log has a file.
    pub fn append(&mut self, events: Vec<StoredEvent>) -> std::io::Result<()> {
        if let Some(file) = &mut self.file {
            let mut lines = Vec::new();
            for event in &events {
                serde_json::to_writer(&mut lines, event)?;
                lines.push(b'\n');
            }
            file.write_all(&lines)?;
            file.sync_data()?;
        }
        for event in events {
            self.remember(event);
        }
        Ok(())
    }
}

/// The state directory: creates it (0700) and reads `state.json` if present.
pub struct StateDir {
    pub path: PathBuf,
}

impl StateDir {
    pub fn open(path: &Path) -> anyhow::Result<(Self, Option<Persisted>)> {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(path)
            .map_err(|e| anyhow::anyhow!("state directory {}: {e}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
        let file = path.join(STATE_FILE);
        let persisted = match fs::read(&file) {
            Ok(bytes) => {
                let state: Persisted = serde_json::from_slice(&bytes).map_err(|e| {
                    anyhow::anyhow!(
                        "{} is not a valid cloud-mock state file ({e}); move it away to start afresh",
                        file.display()
                    )
                })?;
                if state.format != FORMAT {
                    anyhow::bail!(
                        "{}: unsupported state format {}",
                        file.display(),
                        state.format
                    );
                }
                Some(state)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => anyhow::bail!("{}: {e}", file.display()),
        };
        Ok((
            Self {
                path: path.to_owned(),
            },
            persisted,
        ))
    }

    pub fn save(&self, state: &Persisted) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(state)?;
        certs::write_file_atomic(&self.path.join(STATE_FILE), &bytes, 0o600)?;
        Ok(())
    }
}
