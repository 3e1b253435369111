//! A real etcd for the tests, on ephemeral ports, in a temporary data directory, and a
//! TCP gate that can cut an agent off from it.
//!
//! The `etcd` binary comes from `AISIX_ETCD_BIN` or the PATH (Debian's `etcd-server`
//! package, which `scripts/test` installs); a missing binary fails the test loudly.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::{Process, eventually, free_port, http_client};

/// How often etcd sends watch progress notifications in the tests.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

fn find(name: &str, env: &str) -> PathBuf {
    crate::find_program(
        name,
        env,
        "install Debian's etcd-server and etcd-client packages; scripts/test does",
    )
}

/// TLS files for an etcd that requires client certificates.
pub use crate::TlsFiles as EtcdTls;

pub struct Etcd {
    process: Option<Process>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    http: reqwest::Client,
    tls: Option<EtcdTls>,
    /// `user:password` for etcdctl once auth is enabled.
    pub user: Option<String>,
    extra: Vec<String>,
    /// Started with [`PROGRESS_INTERVAL`] (else etcd's default, ten minutes).
    fast_progress: bool,
}

impl Etcd {
    pub async fn start() -> Etcd {
        Self::start_with(None, &[]).await
    }

    /// With `tls`, an etcd serving HTTPS and requiring client certificates issued by
    /// `tls.ca`; `extra` flags are passed to etcd as they are.
    pub async fn start_with(tls: Option<EtcdTls>, extra: &[&str]) -> Etcd {
        let mut etcd = Etcd {
            process: None,
            dir: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
            http: http_client(),
            tls,
            user: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            fast_progress: true,
        };
        etcd.launch().await;
        etcd
    }

    /// An etcd with its default flags: progress notifications every ten minutes.
    pub async fn start_with_defaults() -> Etcd {
        let mut etcd = Etcd {
            process: None,
            dir: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
            http: http_client(),
            tls: None,
            user: None,
            extra: Vec::new(),
            fast_progress: false,
        };
        etcd.launch().await;
        etcd
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn port(&self) -> u16 {
        self.client_port
    }

    async fn launch(&mut self) {
        let url = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let data = self.dir.path().join("data");
        let interval = format!("{}ms", PROGRESS_INTERVAL.as_millis());
        let mut tls_args = Vec::new();
        if let Some(tls) = &self.tls {
            for (flag, path) in [
                ("--cert-file", &tls.server_cert),
                ("--key-file", &tls.server_key),
                ("--trusted-ca-file", &tls.ca),
            ] {
                tls_args.push(flag.to_owned());
                tls_args.push(path.to_str().unwrap().to_owned());
            }
            tls_args.push("--client-cert-auth".to_owned());
        }
        tls_args.extend(self.extra.iter().cloned());
        let mut process = Process::start(
            &find("etcd", "AISIX_ETCD_BIN"),
            &[
                "--name",
                "test",
                "--data-dir",
                data.to_str().unwrap(),
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("test={peer}"),
            ]
            .into_iter()
            .chain(
                [
                    "--experimental-watch-progress-notify-interval",
                    interval.as_str(),
                ]
                .into_iter()
                .filter(|_| self.fast_progress),
            )
            .chain(tls_args.iter().map(String::as_str))
            .collect::<Vec<_>>(),
            &[],
        );
        if self.tls.is_some() {
            process
                .wait_for_line("ready to serve client requests", Duration::from_secs(30))
                .await;
            self.process = Some(process);
            return;
        }
        self.process = Some(process);
        let http = self.http.clone();
        eventually("etcd answers", Duration::from_secs(30), || {
            let http = http.clone();
            let url = url.clone();
            async move {
                http.post(format!("{url}/v3/kv/range"))
                    .body(r#"{"key":"AA=="}"#)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            }
        })
        .await;
    }

    /// Kills etcd (SIGKILL); its data directory stays.
    pub async fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal("KILL");
            p.wait_exit(Duration::from_secs(10)).await;
        }
    }

    /// Starts etcd again on the same ports and data.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.launch().await;
    }

    async fn call(&self, path: &str, body: Value) -> Value {
        let r = self
            .http
            .post(format!("{}{path}", self.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "etcd {path}");
        r.json().await.unwrap()
    }

    /// Writes a key directly; returns the revision.
    pub async fn put(&self, key: &str, value: &str) -> i64 {
        let v = self
            .call(
                "/v3/kv/put",
                json!({"key": B64.encode(key), "value": B64.encode(value)}),
            )
            .await;
        v["header"]["revision"].as_str().unwrap().parse().unwrap()
    }

    pub async fn delete(&self, key: &str) {
        self.call("/v3/kv/deleterange", json!({"key": B64.encode(key)}))
            .await;
    }

    /// Compacts history up to the current revision; returns it.
    pub async fn compact(&self) -> i64 {
        let v = self.call("/v3/kv/range", json!({"key": "AA=="})).await;
        let revision: i64 = v["header"]["revision"].as_str().unwrap().parse().unwrap();
        self.call(
            "/v3/kv/compaction",
            json!({"revision": revision.to_string(), "physical": true}),
        )
        .await;
        revision
    }

    /// Runs `etcdctl` (v3 API) against this etcd; returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let mut command = Command::new(find("etcdctl", "AISIX_ETCDCTL_BIN"));
        command
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.url());
        if let Some(tls) = &self.tls {
            command
                .arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.client_cert)
                .arg("--key")
                .arg(&tls.client_key);
        }
        if let Some(user) = &self.user {
            command.arg("--user").arg(user);
        }
        let out = command.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A TCP forwarder in front of a server: `cut` closes every connection and refuses new
/// ones until `restore`.
pub struct Gate {
    pub port: u16,
    open: Arc<AtomicBool>,
    generation: Arc<std::sync::Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Gate {
    pub async fn start(target_port: u16) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (o, g, s) = (open.clone(), generation.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = s.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                if !o.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let cut = g.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        () = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Gate {
            port,
            open,
            generation,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        let mut g = self.generation.lock().unwrap();
        g.cancel();
        *g = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
