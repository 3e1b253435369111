//! A real Redis for the tests (Debian's `redis-server` and `redis-sentinel`, which
//! `scripts/test` installs), on ephemeral ports with nothing saved to disk; replicas
//! and sentinels for failover tests. A missing binary fails the test loudly.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{Process, eventually, find_program, free_port};

const INSTALL: &str =
    "install Debian's redis-server and redis-sentinel packages; scripts/test does";

fn program(name: &str) -> PathBuf {
    let env = format!("AISIX_{}_BIN", name.to_uppercase().replace('-', "_"));
    find_program(name, &env, INSTALL)
}

/// `redis-cli -p PORT ARGS...`: what it printed.
pub fn cli(port: u16, args: &[&str]) -> String {
    cli_as(port, None, args)
}

fn cli_as(port: u16, password: Option<&str>, args: &[&str]) -> String {
    let mut command = Command::new(program("redis-cli"));
    command.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(password) = password {
        command.args(["--no-auth-warning", "-a", password]);
    }
    let output = command
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

pub struct RedisServer {
    process: Option<Process>,
    pub port: u16,
    replica_of: Option<u16>,
    password: Option<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        Self::launch_new(None, None).await
    }

    /// A server that requires `password` (`requirepass`).
    pub async fn with_password(password: &str) -> RedisServer {
        Self::launch_new(None, Some(password.to_owned())).await
    }

    /// A replica of the server on `primary`.
    pub async fn replica_of(primary: u16) -> RedisServer {
        Self::launch_new(Some(primary), None).await
    }

    async fn launch_new(replica_of: Option<u16>, password: Option<String>) -> RedisServer {
        let mut server = RedisServer {
            process: None,
            port: free_port(),
            replica_of,
            password,
            dir: tempfile::tempdir().unwrap(),
        };
        server.launch().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn launch(&mut self) {
        let port = self.port.to_string();
        let dir = self.dir.path().to_str().unwrap().to_owned();
        let mut args = vec![
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir,
        ];
        let primary = self.replica_of.map(|p| p.to_string());
        if let Some(primary) = &primary {
            args.extend(["--replicaof", "127.0.0.1", primary]);
        }
        if let Some(password) = &self.password {
            args.extend(["--requirepass", password]);
        }
        self.process = Some(Process::start(&program("redis-server"), &args, &[]));
        let port = self.port;
        let password = self.password.clone();
        eventually("redis answers PING", Duration::from_secs(20), || {
            let password = password.clone();
            async move { cli_as(port, password.as_deref(), &["PING"]) == "PONG" }
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

    /// Starts again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.launch().await;
    }

    pub fn cli(&self, args: &[&str]) -> String {
        cli_as(self.port, self.password.as_deref(), args)
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
