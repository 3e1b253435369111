//! `scripts/demo` as README tells a new user to run it, on free loopback ports with the
//! binaries already built: every process it starts listens on loopback, it prints the
//! PIDs it started, its offline step (stop the control plane and the agent, start the
//! agent again) keeps chats answering from the cache, and stopping it stops them all.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tests::{Process, eventually, free_port, http_client};

/// Kills the processes the demo started, whatever the test's outcome.
struct Started(Vec<u32>);

impl Drop for Started {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// `started: agent PID A, control plane PID C, mock provider PID M`
fn pids(line: &str) -> Vec<u32> {
    line.split("PID ")
        .skip(1)
        .map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

async fn chat(proxy: &str) -> u16 {
    http_client()
        .post(format!("http://{proxy}/v1/chat/completions"))
        .bearer_auth("demo-caller-key")
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

#[tokio::test]
async fn the_demo_listens_on_loopback_prints_its_pids_and_serves_offline() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir: PathBuf = tests::binary("aisix-agent").parent().unwrap().to_owned();
    let work = tempfile::tempdir().unwrap();
    let addr = || format!("127.0.0.1:{}", free_port());
    let (proxy, cp, console, mock, status) = (addr(), addr(), addr(), addr(), addr());
    let envs = [
        ("AISIX_DEMO_BIN_DIR", bin_dir.to_str().unwrap()),
        ("AISIX_DEMO_DIR", work.path().to_str().unwrap()),
        ("AISIX_DEMO_PROXY_ADDR", proxy.as_str()),
        ("AISIX_DEMO_CP_ADDR", cp.as_str()),
        ("AISIX_DEMO_CONSOLE_ADDR", console.as_str()),
        ("AISIX_DEMO_MOCK_ADDR", mock.as_str()),
        ("AISIX_DEMO_STATUS_ADDR", status.as_str()),
        // The harness points agents at a free metrics port; the demo picks its own.
        (
            "AISIX_OBSERVABILITY__METRICS__PROMETHEUS__ADDR",
            status.as_str(),
        ),
    ];
    let script = repo.join("scripts/demo");
    let mut demo = Process::start(Path::new("bash"), &[script.to_str().unwrap()], &envs);
    demo.wait_for_line("Ctrl-C here stops", Duration::from_secs(60))
        .await;
    let printed = demo.output();
    let started = pids(
        printed
            .lines()
            .find(|l| l.contains("started: agent PID"))
            .expect("the demo prints the PIDs it started"),
    );
    assert_eq!(started.len(), 3, "{printed}");
    let guard = Started(started.clone());
    let (agent, control_plane, provider) = (started[0], started[1], started[2]);
    assert!(started.iter().all(|pid| alive(*pid)), "{printed}");
    assert!(!printed.contains("pgrep"), "{printed}");
    assert!(!printed.contains(" target/debug"), "{printed}");

    // Every listening socket of the three processes is on loopback.
    for pid in &started {
        let sockets = listening_addresses(*pid);
        assert!(!sockets.is_empty(), "process {pid} listens on nothing");
        for socket in sockets {
            assert!(
                socket.starts_with("127.0.0.1:"),
                "{pid} listens on {socket}"
            );
        }
    }
    assert_eq!(chat(&proxy).await, 200);
    let ready = tests::get_json(&format!("http://{status}/status/ready")).await;
    assert_eq!(ready["ready"], true, "{ready}");

    // The offline step as printed: stop the control plane and the agent, start the
    // agent again; it serves from its cache, and the mock provider still answers.
    let restart = printed
        .lines()
        .map(str::trim)
        .find(|l| l.ends_with("agent.yaml") && l.contains("aisix-agent --config"))
        .expect("the demo prints how to restart the agent")
        .to_owned();
    let kill = printed
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("kill "))
        .expect("the demo prints what to stop")
        .to_owned();
    assert_eq!(kill, format!("kill {control_plane} {agent}"));
    assert!(
        std::process::Command::new("sh")
            .args(["-c", &kill])
            .status()
            .unwrap()
            .success()
    );
    eventually("the agent has stopped", Duration::from_secs(15), || async {
        !alive(agent) && !alive(control_plane)
    })
    .await;
    let argv: Vec<&str> = restart.split_whitespace().collect();
    let mut again = Process::start(Path::new(argv[0]), &argv[1..], &envs);
    again
        .wait_for_line("proxy listener ready", Duration::from_secs(20))
        .await;
    eventually(
        "chats answer from the cache",
        Duration::from_secs(10),
        || async { chat(&proxy).await == 200 },
    )
    .await;
    let readyz = http_client()
        .get(format!("http://{proxy}/readyz?verbose=1"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(readyz.contains("source cache"), "{readyz}");
    drop(again);

    // Stopping the demo stops what it started.
    assert!(alive(provider));
    demo.signal("TERM");
    demo.wait_exit(Duration::from_secs(15)).await;
    eventually(
        "the mock provider has stopped",
        Duration::from_secs(10),
        || async { !alive(provider) },
    )
    .await;
    drop(guard);
}

/// The `address:port` of each TCP socket `pid` listens on (from /proc/net/tcp and the
/// socket inodes of its file descriptors).
fn listening_addresses(pid: u32) -> Vec<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|link| {
                    let link = link.to_string_lossy().into_owned();
                    Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, st (0A = LISTEN), inode
            if fields.len() > 9 && fields[3] == "0A" && inodes.iter().any(|i| i == fields[9]) {
                out.push(decode(fields[1]));
            }
        }
    }
    out
}

/// `0100007F:1F90` -> `127.0.0.1:8080` (IPv4); IPv6 addresses are shown as hex.
fn decode(hex: &str) -> String {
    let (ip, port) = hex.split_once(':').unwrap();
    let port = u16::from_str_radix(port, 16).unwrap();
    if ip.len() == 8 {
        let n = u32::from_str_radix(ip, 16).unwrap();
        let [a, b, c, d] = n.to_le_bytes();
        format!("{a}.{b}.{c}.{d}:{port}")
    } else {
        format!("[{ip}]:{port}")
    }
}
