//! Support for end-to-end tests: locating the workspace's binaries, running them as
//! child processes (killed on drop), capturing their logs, and waiting for readiness by
//! polling, never by sleeping.
//!
//! The binaries are built by the test command (`scripts/test`) before the tests run;
//! a missing binary fails the test with the command that builds it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support: a failure here should fail the test loudly"
)]

pub mod cloud;
pub mod etcd;
pub mod fuzz;
pub mod metrics;
pub mod otlp;
pub mod redis;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of a workspace binary in the same target directory as the running test.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    // A test runs from target/<profile>/deps/, a tool (soak, bench) from
    // target/<profile>/: the binaries sit in target/<profile>/.
    let mut dir = exe.parent().expect("target directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target directory");
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo build --workspace --bins` (scripts/test does this)",
        path.display()
    );
    path
}

/// PEM files of a private CA, a server certificate for 127.0.0.1 (with clientAuth
/// too: etcd's gateway dials itself with it) and a client certificate, for servers
/// under test that speak TLS and ask for client certificates.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Issues a day's certificates from a new CA named `ca_name`, written into `dir`.
    pub fn generate(dir: &Path, ca_name: &str) -> TlsFiles {
        Self::generate_for(dir, ca_name, &[])
    }

    /// Like [`TlsFiles::generate`], the server certificate also valid for `names`.
    pub fn generate_for(dir: &Path, ca_name: &str, names: &[&str]) -> TlsFiles {
        const DAY: Duration = Duration::from_secs(86_400);
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let ca = certs::CertificateAuthority::generate(ca_name, DAY).unwrap();
        let server = ca
            .issue_server_and_client(
                &names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
                &["127.0.0.1".parse().unwrap()],
                DAY,
            )
            .unwrap();
        let client = ca
            .issue_gateway(&certs::GatewayIdentity::new("env", "dp").unwrap(), DAY)
            .unwrap();
        TlsFiles {
            ca: write("ca.pem", ca.cert_pem()),
            server_cert: write("server.pem", &server.cert_pem),
            server_key: write("server-key.pem", server.key_pem.expose()),
            client_cert: write("client.pem", &client.cert_pem),
            client_key: write("client-key.pem", client.key_pem.expose()),
        }
    }
}

/// A program from `env` or the PATH; a missing one fails the test with `install`.
pub fn find_program(name: &str, env: &str, install: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env) {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{name} not found on PATH (set {env}, or {install})"))
}

/// A TCP port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process whose stdout and stderr lines are collected. Killed on drop.
pub struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    pub fn start(program: &Path, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut command = Command::new(program);
        command
            .args(args)
            // Agents under test never take the default metrics port (9090): each gets
            // a free one, printed in its "metrics listener ready" line. `envs` may
            // override this.
            .env(
                "AISIX_OBSERVABILITY__METRICS__PROMETHEUS__ADDR",
                "127.0.0.1:0",
            )
            // The caller's RUST_LOG would change what the processes print.
            .env_remove("RUST_LOG")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Self { child, lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process has printed so far.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until a printed line contains `needle`; returns that line.
    pub async fn wait_for_line(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the reader threads a moment to drain the pipes.
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "process exited ({status}) before printing {needle:?}; output:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?} within {within:?}; output:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a signal by name (`HUP`, `TERM`, `KILL`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill(1) is available");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit and returns its status.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process still running after {within:?}; output:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the `addr` field out of a log line, text (`addr=HOST:PORT`) or JSON.
pub fn addr_in(line: &str) -> String {
    if let Some(start) = line.find("\"addr\":\"") {
        let rest = &line[start + "\"addr\":\"".len()..];
        return rest.split('"').next().unwrap_or_default().to_owned();
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .map(|a| a.trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("no addr= in {line:?}"))
}

/// Polls `probe` until it returns true.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !probe().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Starts `aisix-agent --config CONFIG` and waits until its proxy answers `/livez`.
/// Returns the process and the proxy's base URL.
pub async fn start_agent(config: &Path) -> (Process, String) {
    start_agent_with(config, &[]).await
}

/// [`start_agent`] with `envs` in the agent's environment.
pub async fn start_agent_with(config: &Path, envs: &[(&str, &str)]) -> (Process, String) {
    let within = Duration::from_secs(20);
    let config = config.to_str().expect("UTF-8 config path");
    let mut process = Process::start(&binary("aisix-agent"), &["--config", config], envs);
    let line = process.wait_for_line("proxy listener ready", within).await;
    let url = format!("http://{}", addr_in(&line));
    let client = http_client();
    eventually("agent answers /livez", within, || async {
        client
            .get(format!("{url}/livez"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    (process, url)
}

/// A file-mode agent: `resources` written to `dir/resources.yaml`, the config file
/// `resources_file: <it>` followed by `config` (YAML with a metrics listener). Returns
/// the process, the proxy's base URL and the metrics listener's.
pub async fn start_file_agent(
    dir: &Path,
    resources: &str,
    config: &str,
) -> (Process, String, String) {
    let file = dir.join("resources.yaml");
    std::fs::write(&file, resources).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!("resources_file: {}\n{config}", file.display()),
    )
    .unwrap();
    let (mut process, proxy) = start_agent(&path).await;
    let line = process
        .wait_for_line("metrics listener ready", Duration::from_secs(10))
        .await;
    let metrics = format!("http://{}", addr_in(&line));
    (process, proxy, metrics)
}

/// SHA-256 hex of a caller key, as `api_keys[].key_hash` stores it.
pub fn key_hash(plaintext: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(plaintext.as_bytes()))
}

/// `GET url`, expecting 200 and a JSON body.
pub async fn get_json(url: &str) -> serde_json::Value {
    let response = http_client().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET {url}");
    response.json().await.unwrap()
}

/// An HTTP client for talking to the processes under test.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// An answer read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Writes `request` as given (no client tidies it up) to `addr` and reads the answer
/// until the server closes the connection (send `Connection: close`). `None` when the
/// server closed without answering.
pub async fn raw_http(addr: &str, request: &[u8]) -> Option<RawResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading everything: keep what it said.
    let _ = stream.write_all(request).await;
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "{addr}: no answer and no close within 20 s");
    parse_raw(&raw)
}

fn parse_raw(raw: &[u8]) -> Option<RawResponse> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            if size == 0 {
                break;
            }
            out.push_str(after.get(..size)?);
            rest = after.get(size + 2..)?;
        }
        out
    } else {
        body.to_owned()
    };
    Some(RawResponse {
        status,
        headers,
        body,
    })
}
