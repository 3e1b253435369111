//! A real Redis for the tests (Debian's `redis-server` and `redis-sentinel`, which
//! `scripts/test` installs), on ephemeral ports with nothing saved to disk; replicas
//! and sentinels for failover tests. A missing binary fails the test loudly.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{Process, TlsFiles, eventually, find_program, free_port};

const INSTALL: &str =
    "install Debian's redis-server and redis-sentinel packages; scripts/test does";

fn program(name: &str) -> PathBuf {
    let env = format!("AISIX_{}_BIN", name.to_uppercase().replace('-', "_"));
    find_program(name, &env, INSTALL)
}

/// `redis-cli -p PORT ARGS...`: what it printed.
pub fn cli(port: u16, args: &[&str]) -> String {
    cli_with(port, &[], args)
}

/// `client` are connection arguments (`-a`, `--tls`...).
fn cli_with(port: u16, client: &[String], args: &[&str]) -> String {
    let output = Command::new(program("redis-cli"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(client)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

pub struct RedisServer {
    process: Option<Process>,
    pub port: u16,
    /// `redis-server` arguments beyond the port and the no-persistence defaults.
    server: Vec<String>,
    /// redis-cli's connection arguments.
    client: Vec<String>,
    dir: tempfile::TempDir,
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        Self::launch_new(Vec::new(), Vec::new()).await
    }

    /// A server that requires `password` (`requirepass`).
    pub async fn with_password(password: &str) -> RedisServer {
        Self::launch_new(
            owned(&["--requirepass", password]),
            owned(&["--no-auth-warning", "-a", password]),
        )
        .await
    }

    /// A replica of the server on `primary`.
    pub async fn replica_of(primary: u16) -> RedisServer {
        Self::launch_new(
            owned(&["--replicaof", "127.0.0.1", &primary.to_string()]),
            Vec::new(),
        )
        .await
    }

    /// TLS only (no plain port), client certificates required.
    pub async fn with_tls(files: &TlsFiles) -> RedisServer {
        let path = |p: &PathBuf| p.to_str().unwrap().to_owned();
        Self::launch_new(
            vec![
                "--tls-cert-file".into(),
                path(&files.server_cert),
                "--tls-key-file".into(),
                path(&files.server_key),
                "--tls-ca-cert-file".into(),
                path(&files.ca),
                "--tls-auth-clients".into(),
                "yes".into(),
            ],
            vec![
                "--tls".into(),
                "--cacert".into(),
                path(&files.ca),
                "--cert".into(),
                path(&files.client_cert),
                "--key".into(),
                path(&files.client_key),
            ],
        )
        .await
    }

    async fn launch_new(server: Vec<String>, client: Vec<String>) -> RedisServer {
        let mut redis = RedisServer {
            process: None,
            port: free_port(),
            server,
            client,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.launch().await;
        redis
    }

    fn tls(&self) -> bool {
        self.server.iter().any(|a| a == "--tls-cert-file")
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    async fn launch(&mut self) {
        let port = self.port.to_string();
        let dir = self.dir.path().to_str().unwrap().to_owned();
        let listen: [&str; 4] = if self.tls() {
            ["--port", "0", "--tls-port", &port]
        } else {
            ["--port", &port, "--tls-port", "0"]
        };
        let mut args = listen.to_vec();
        args.extend([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir,
        ]);
        args.extend(self.server.iter().map(String::as_str));
        self.process = Some(Process::start(&program("redis-server"), &args, &[]));
        let (port, client) = (self.port, self.client.clone());
        eventually("redis answers PING", Duration::from_secs(20), || {
            let client = client.clone();
            async move { cli_with(port, &client, &["PING"]) == "PONG" }
        })
        .await;
    }

    /// SIGKILL: gone at once, nothing saved.
    pub async fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal("KILL");
            p.wait_exit(Duration::from_secs(10)).await;
        }
    }

    /// SIGSTOP: connections stay open, nothing answers (a slow Redis).
    pub fn pause(&self) {
        self.process.as_ref().unwrap().signal("STOP");
    }

    pub fn resume(&self) {
        self.process.as_ref().unwrap().signal("CONT");
    }

    /// Starts again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.launch().await;
    }

    pub fn cli(&self, args: &[&str]) -> String {
        cli_with(self.port, &self.client, args)
    }
}

/// A Redis cluster of three primaries (no replicas), every slot assigned.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let mut node = RedisServer {
                process: None,
                port: free_port(),
                server: owned(&["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]),
                client: Vec::new(),
                dir: tempfile::tempdir().unwrap(),
            };
            let config = node.dir.path().join("nodes.conf");
            node.server.extend([
                "--cluster-config-file".to_owned(),
                config.display().to_string(),
            ]);
            node.launch().await;
            nodes.push(node);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new(program("redis-cli"))
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli --cluster create: {e}"));
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        for node in &nodes {
            let port = node.port;
            eventually(
                "the cluster is up",
                Duration::from_secs(20),
                || async move { cli(port, &["CLUSTER", "INFO"]).contains("cluster_state:ok") },
            )
            .await;
        }
        RedisCluster { nodes }
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// `redis-cli -c` (following redirections) on the first node.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        cli(self.nodes[0].port, &all)
    }
}

/// One sentinel watching a primary as `mymaster`, quorum 1, quick to fail over.
pub struct Sentinel {
    _process: Process,
    pub port: u16,
    _dir: tempfile::TempDir,
}

pub const MASTER_NAME: &str = "mymaster";

impl Sentinel {
    pub async fn watch(primary: u16) -> Sentinel {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 1\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 400\n\
                 sentinel failover-timeout {MASTER_NAME} 2000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                dir = dir.path().display()
            ),
        )
        .unwrap();
        let process = Process::start(&program("redis-sentinel"), &[config.to_str().unwrap()], &[]);
        eventually(
            "sentinel knows the primary",
            Duration::from_secs(20),
            || async move {
                cli(port, &["SENTINEL", "get-master-addr-by-name", MASTER_NAME])
                    .ends_with(&primary.to_string())
            },
        )
        .await;
        Sentinel {
            _process: process,
            port,
            _dir: dir,
        }
    }

    /// The port of the primary the sentinel names now.
    pub fn primary(&self) -> Option<u16> {
        cli(
            self.port,
            &["SENTINEL", "get-master-addr-by-name", MASTER_NAME],
        )
        .lines()
        .nth(1)
        .and_then(|p| p.trim().parse().ok())
    }
}
