//! One Redis connection (standalone, sentinel or cluster), kept up in the background
//! and never waited for on the request path.
//!
//! A request uses the connection only when it is up: a missing connection, an error
//! or an answer later than `timeout` is a [`Trouble`] at once, and the caller falls
//! back (local counters, no cache). A lost connection is dropped and a background
//! task reconnects with backoff; in sentinel mode each connect asks the sentinels for
//! the current primary, so a failover is followed on the next connect (a demoted
//! primary's `READONLY` answer counts as lost). Failures are counted by kind for the
//! metrics and the last one is kept for `/status/config`, with the password scrubbed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, FromRedisValue,
    IntoConnectionInfo, RedisError, ScriptInvocation, TlsCertificates,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::backoff::{Backoff, BackoffPolicy};
use crate::secret::Secret;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    #[default]
    Standalone,
    Cluster,
    Sentinel,
}

/// `tls`: `true`, or the files of a private CA and a client certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RedisTls {
    On(bool),
    Files(RedisTlsFiles),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisTlsFiles {
    /// Trust this CA (PEM) instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

/// A `redis` section of the config file (`ratelimit.redis`, `cache.redis`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisOptions {
    pub mode: RedisMode,
    /// Standalone: `redis://host:port[/db]` or `rediss://` for TLS.
    pub url: Option<String>,
    /// Cluster: seed nodes, `host:port` or URLs.
    pub nodes: Vec<String>,
    /// Sentinel: the sentinels, `host:port` or URLs.
    pub sentinels: Vec<String>,
    /// Sentinel: the name of the monitored primary.
    pub master_name: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub database: i64,
    pub tls: Option<RedisTls>,
    /// Longest wait for one answer before the request goes on without Redis.
    pub timeout_ms: u64,
    pub connect_timeout_ms: u64,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            mode: RedisMode::Standalone,
            url: None,
            nodes: Vec::new(),
            sentinels: Vec::new(),
            master_name: None,
            username: None,
            password: None,
            database: 0,
            tls: None,
            timeout_ms: 5,
            connect_timeout_ms: 1000,
        }
    }
}

/// The standalone default.
const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

impl RedisOptions {
    /// Checks the options can make a client: a field name (below the section) and a
    /// message that never quotes a password.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.timeout_ms == 0 {
            return Err(("timeout_ms", "must be at least 1".to_owned()));
        }
        if self.connect_timeout_ms == 0 {
            return Err(("connect_timeout_ms", "must be at least 1".to_owned()));
        }
        if self.database < 0 {
            return Err(("database", "must be 0 or more".to_owned()));
        }
        match self.mode {
            RedisMode::Standalone => {
                address(self.url.as_deref().unwrap_or(DEFAULT_URL)).map_err(|m| ("url", m))?;
            }
            RedisMode::Cluster => {
                if self.nodes.is_empty() {
                    return Err(("nodes", "cluster mode needs at least one node".to_owned()));
                }
                if self.database != 0 {
                    return Err(("database", "a Redis cluster has only database 0".to_owned()));
                }
                for node in &self.nodes {
                    address(node).map_err(|m| ("nodes", m))?;
                }
            }
            RedisMode::Sentinel => {
                if self.sentinels.is_empty() {
                    return Err((
                        "sentinels",
                        "sentinel mode needs at least one sentinel".to_owned(),
                    ));
                }
                if self.master_name.as_deref().is_none_or(str::is_empty) {
                    return Err((
                        "master_name",
                        "sentinel mode needs the name of the primary".to_owned(),
                    ));
                }
                for sentinel in &self.sentinels {
                    address(sentinel).map_err(|m| ("sentinels", m))?;
                }
            }
        }
        if let Some(RedisTls::Files(files)) = &self.tls {
            if files.client_cert_file.is_some() != files.client_key_file.is_some() {
                return Err((
                    "tls",
                    "client_cert_file and client_key_file go together".to_owned(),
                ));
            }
            for (field, path) in [
                ("tls.ca_file", &files.ca_file),
                ("tls.client_cert_file", &files.client_cert_file),
                ("tls.client_key_file", &files.client_key_file),
            ] {
                if let Some(path) = path
                    && let Err(e) = std::fs::metadata(path)
                {
                    return Err((field, format!("cannot read {}: {e}", path.display())));
                }
            }
        }
        Ok(())
    }

    fn tls_on(&self) -> bool {
        match &self.tls {
            None | Some(RedisTls::On(false)) => false,
            Some(RedisTls::On(true) | RedisTls::Files(_)) => true,
        }
    }

    fn certificates(&self) -> Result<Option<TlsCertificates>, String> {
        let Some(RedisTls::Files(files)) = &self.tls else {
            return Ok(None);
        };
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let client_tls = match (&files.client_cert_file, &files.client_key_file) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read(cert)?,
                client_key: read(key)?,
            }),
            _ => None,
        };
        Ok(Some(TlsCertificates {
            client_tls,
            root_cert: files.ca_file.as_ref().map(read).transpose()?,
        }))
    }

    /// The connection info of one address, with this section's credentials, database
    /// and TLS applied.
    fn info(&self, text: &str) -> Result<ConnectionInfo, String> {
        let info = address(text)?;
        let mut settings = info.redis_settings().clone().set_db(self.database);
        if let Some(user) = &self.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password.expose());
        }
        let addr = match info.addr().clone() {
            ConnectionAddr::Tcp(host, port) if self.tls_on() => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                tls_params: None,
            },
            other => other,
        };
        Ok(info
            .set_redis_settings(settings)
            .set_addr(addr)
            .set_tcp_settings(tcp()))
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

/// Requests are small and waited for: never held back by Nagle's algorithm.
fn tcp() -> TcpSettings {
    TcpSettings::default().set_nodelay(true)
}

/// `host:port` or a `redis://` / `rediss://` URL.
fn address(text: &str) -> Result<ConnectionInfo, String> {
    let url = if text.contains("://") {
        text.to_owned()
    } else {
        format!("redis://{text}")
    };
    let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
    match url.as_str().into_connection_info() {
        Ok(info) if scheme_ok => Ok(info),
        _ => Err("expected host:port or a redis:// or rediss:// URL".to_owned()),
    }
}

/// Why Redis could not answer a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// Not connected (down, or reconnecting).
    Unavailable,
    /// No answer within `timeout_ms`.
    Timeout,
    /// An error answer or a broken connection.
    Error,
}

impl Trouble {
    const ALL: [Trouble; 3] = [Trouble::Unavailable, Trouble::Timeout, Trouble::Error];

    /// The `kind` label of `aisix_redis_failures_total`.
    pub fn kind(self) -> &'static str {
        match self {
            Trouble::Unavailable => "unavailable",
            Trouble::Timeout => "timeout",
            Trouble::Error => "error",
        }
    }
}

/// What `/status/config` and the metrics show of one connection.
#[derive(Debug, Clone, Serialize)]
pub struct RedisStatus {
    /// `ratelimit` or `cache`.
    pub component: &'static str,
    pub mode: RedisMode,
    pub connected: bool,
    /// Failures by kind since start.
    pub failures: std::collections::BTreeMap<&'static str, u64>,
    pub last_error: Option<String>,
}

enum Connector {
    Single(Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    Cluster(ClusterClient),
}

#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// One request to Redis: a script or a command.
pub enum Op<'a> {
    Script(ScriptInvocation<'a>),
    Cmd(Cmd),
}

impl Op<'_> {
    async fn run<C: ConnectionLike, T: FromRedisValue>(
        &self,
        conn: &mut C,
    ) -> Result<T, RedisError> {
        match self {
            Op::Script(script) => script.invoke_async(conn).await,
            Op::Cmd(cmd) => cmd.query_async(conn).await,
        }
    }
}

/// A shared handle on one Redis connection.
#[derive(Clone)]
pub struct Redis(Arc<Link>);

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("component", &self.0.component)
            .field("mode", &self.0.mode)
            .finish_non_exhaustive()
    }
}

struct Link {
    component: &'static str,
    mode: RedisMode,
    connector: Connector,
    conn: ArcSwapOption<Conn>,
    timeout: Duration,
    connect_timeout: Duration,
    /// Asks the background task to reconnect.
    lost: Arc<Notify>,
    up: AtomicBool,
    failures: [AtomicU64; 3],
    last_error: Mutex<Option<String>>,
    /// Scrubbed from every error text.
    password: Option<Secret>,
}

impl Redis {
    /// A handle for `component` (`ratelimit`, `cache`); connects in the background,
    /// so it must be called inside a Tokio runtime. Errors name the field at fault.
    pub fn start(
        component: &'static str,
        options: &RedisOptions,
    ) -> Result<Redis, (&'static str, String)> {
        options.validate()?;
        let certificates = options.certificates().map_err(|m| ("tls", m))?;
        let connector = match options.mode {
            RedisMode::Standalone => {
                let info = options
                    .info(options.url.as_deref().unwrap_or(DEFAULT_URL))
                    .map_err(|m| ("url", m))?;
                let client = match certificates {
                    Some(certs) => Client::build_with_tls(info, certs),
                    None => Client::open(info),
                };
                Connector::Single(client.map_err(|e| ("url", e.to_string()))?)
            }
            RedisMode::Cluster => {
                let nodes = options
                    .nodes
                    .iter()
                    .map(|n| options.info(n))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|m| ("nodes", m))?;
                let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                    .tcp_settings(tcp())
                    .connection_timeout(options.connect_timeout())
                    .response_timeout(options.timeout())
                    .retries(0);
                if let Some(certs) = certificates {
                    builder = builder.certs(certs);
                }
                Connector::Cluster(builder.build().map_err(|e| ("nodes", e.to_string()))?)
            }
            RedisMode::Sentinel => {
                let sentinels = options
                    .sentinels
                    .iter()
                    .map(|s| address(s).map(|info| info.addr().clone()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|m| ("sentinels", m))?;
                let master = options.master_name.clone().unwrap_or_default();
                let mut builder =
                    SentinelClientBuilder::new(sentinels, master, SentinelServerType::Master)
                        .map_err(|e| ("sentinels", e.to_string()))?
                        .set_client_to_redis_db(options.database)
                        .set_client_to_redis_tcp_settings(tcp())
                        .set_client_to_sentinel_tcp_settings(tcp());
                if let Some(user) = &options.username {
                    builder = builder.set_client_to_redis_username(user);
                }
                if let Some(password) = &options.password {
                    builder = builder.set_client_to_redis_password(password.expose());
                }
                if options.tls_on() {
                    builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
                    if let Some(certs) = certificates {
                        builder = builder.set_client_to_redis_certificates(certs);
                    }
                }
                let client = builder.build().map_err(|e| ("sentinels", e.to_string()))?;
                Connector::Sentinel(tokio::sync::Mutex::new(client))
            }
        };
        let link = Arc::new(Link {
            component,
            mode: options.mode,
            connector,
            conn: ArcSwapOption::empty(),
            timeout: options.timeout(),
            connect_timeout: options.connect_timeout(),
            lost: Arc::new(Notify::new()),
            up: AtomicBool::new(false),
            failures: Default::default(),
            last_error: Mutex::new(None),
            password: options.password.clone(),
        });
        tokio::spawn(keep_connected(Arc::downgrade(&link), link.lost.clone()));
        Ok(Redis(link))
    }

    /// Runs `op` if connected, within the timeout. Every failure is counted.
    pub async fn run<T: FromRedisValue>(&self, op: Op<'_>) -> Result<T, Trouble> {
        let link = &self.0;
        let Some(conn) = link.conn.load_full() else {
            return Err(link.failed(Trouble::Unavailable));
        };
        let mut conn = Conn::clone(&conn);
        let answer = tokio::time::timeout(link.timeout, async {
            match &mut conn {
                Conn::Single(c) => op.run(c).await,
                Conn::Cluster(c) => op.run(c).await,
            }
        })
        .await;
        match answer {
            Ok(Ok(value)) => Ok(value),
            Err(_) => Err(link.failed(Trouble::Timeout)),
            Ok(Err(error)) => {
                link.note(&error);
                if lost(&error) {
                    link.drop_connection();
                }
                Err(link.failed(Trouble::Error))
            }
        }
    }

    /// Whether a connection is up now.
    pub fn connected(&self) -> bool {
        self.0.up.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> RedisStatus {
        let link = &self.0;
        RedisStatus {
            component: link.component,
            mode: link.mode,
            connected: self.connected(),
            failures: Trouble::ALL
                .iter()
                .map(|t| (t.kind(), link.failures[*t as usize].load(Ordering::Relaxed)))
                .collect(),
            last_error: link
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// An error after which the connection is not worth using again.
fn lost(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_unrecoverable_error()
        || matches!(error.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
}

impl Link {
    fn failed(&self, trouble: Trouble) -> Trouble {
        self.failures[trouble as usize].fetch_add(1, Ordering::Relaxed);
        trouble
    }

    fn note(&self, error: &dyn std::fmt::Display) {
        let mut text = error.to_string();
        if let Some(password) = self.password.as_ref().filter(|p| !p.is_empty()) {
            text = text.replace(password.expose(), "[redacted]");
        }
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(text);
    }

    fn drop_connection(&self) {
        if self.conn.swap(None).is_some() {
            self.up.store(false, Ordering::Relaxed);
            tracing::warn!(
                component = self.component,
                error = self.last_error().as_deref().unwrap_or(""),
                "redis connection lost; falling back until it is back"
            );
        }
        self.lost.notify_one();
    }

    fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn connect(&self) -> Result<Conn, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(None);
        match &self.connector {
            Connector::Single(client) => client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map(Conn::Single),
            Connector::Sentinel(client) => {
                let mut client = client.lock().await;
                let mut conn = client.get_async_connection_with_config(&config).await?;
                // The sentinels may still name a primary that was just demoted.
                let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
                let primary =
                    matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master");
                if !primary {
                    return Err(RedisError::from((
                        redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                        "the sentinels named a replica as the primary",
                    )));
                }
                Ok(Conn::Single(conn))
            }
            Connector::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
        }
    }
}

/// Connects, and reconnects whenever the connection is lost, until the handle is gone.
async fn keep_connected(link: Weak<Link>, lost: Arc<Notify>) {
    let mut backoff = Backoff::new(BackoffPolicy {
        min: Duration::from_millis(50),
        max: Duration::from_secs(2),
    });
    loop {
        {
            let Some(link) = link.upgrade() else { return };
            if link.conn.load().is_none() {
                let attempt = tokio::time::timeout(link.connect_timeout * 2, link.connect()).await;
                match attempt {
                    Ok(Ok(conn)) => {
                        link.conn.store(Some(Arc::new(conn)));
                        link.up.store(true, Ordering::Relaxed);
                        backoff.reset();
                        tracing::info!(component = link.component, "redis connected");
                    }
                    failed => {
                        match failed {
                            Ok(Err(error)) => link.note(&error),
                            _ => link.note(&"connecting timed out"),
                        }
                        let wait = backoff.next_delay().max(Duration::from_millis(20));
                        drop(link);
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            }
        }
        // Woken when a request finds the connection lost; the periodic check ends
        // the task once the handle is dropped.
        tokio::select! {
            () = lost.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn options_name_the_field_at_fault_and_never_the_password() {
        let bad = |options: RedisOptions| options.validate().err().unwrap();
        assert_eq!(
            bad(RedisOptions {
                url: Some("http://:hunter2@x:1".into()),
                ..RedisOptions::default()
            })
            .0,
            "url"
        );
        let (field, message) = bad(RedisOptions {
            url: Some("redis://:hunter2@[nonsense".into()),
            ..RedisOptions::default()
        });
        assert_eq!(field, "url");
        assert!(!message.contains("hunter2"), "{message}");
        assert_eq!(
            bad(RedisOptions {
                mode: RedisMode::Cluster,
                ..RedisOptions::default()
            })
            .0,
            "nodes"
        );
        assert_eq!(
            bad(RedisOptions {
                mode: RedisMode::Sentinel,
                sentinels: vec!["127.0.0.1:26379".into()],
                ..RedisOptions::default()
            })
            .0,
            "master_name"
        );
        assert!(RedisOptions::default().validate().is_ok());
        assert!(
            RedisOptions {
                mode: RedisMode::Cluster,
                nodes: vec!["10.0.0.1:7000".into(), "redis://10.0.0.2:7000".into()],
                ..RedisOptions::default()
            }
            .validate()
            .is_ok()
        );
    }

    #[tokio::test]
    async fn nothing_listening_is_unavailable_at_once_and_counted() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let redis = Redis::start(
            "ratelimit",
            &RedisOptions {
                url: Some(format!("redis://127.0.0.1:{port}")),
                password: Some(Secret::new("hunter2")),
                ..RedisOptions::default()
            },
        )
        .unwrap();
        let started = std::time::Instant::now();
        let answer: Result<i64, _> = redis.run(Op::Cmd(redis::cmd("PING"))).await;
        assert_eq!(answer, Err(Trouble::Unavailable));
        assert!(started.elapsed() < Duration::from_millis(50));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = redis.status();
        assert!(!status.connected);
        assert_eq!(status.failures["unavailable"], 1);
        let error = status.last_error.unwrap();
        assert!(!error.contains("hunter2"), "{error}");
    }
}
