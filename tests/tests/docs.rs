//! The doc check: every command in README.md and docs/*.md is exercised.
//!
//! Code blocks are tagged by what they are:
//! - ```` ```sh ````: run, for real, in order per document, by `bash -euo pipefail` in a
//!   scratch directory, against a live stack started here (real etcd, a self-hosted agent
//!   with its admin and status listeners, cloud-mock's control plane and console, the
//!   mock provider), with the workspace's binaries first on `PATH` and these variables:
//!   `AISIX_PROXY`, `AISIX_STATUS`, `AISIX_ADMIN`, `AISIX_API_KEY`, `AISIX_ADMIN_KEY`,
//!   `AISIX_CP`, `AISIX_CONSOLE`, `AISIX_CONSOLE_TOKEN`, `AISIX_MOCK` (the mock
//!   provider, also the guardrail detector mocks). Each must succeed.
//! - ```` ```sh no-run ````: host administration this machine cannot do (systemctl,
//!   docker, package installs) or commands that do not end (`scripts/demo`): each
//!   command's program must be one of a known list, scripts must exist.
//! - in every block, each invocation of `aisix-agent`, `aisix-certs` or `cloud-mock`
//!   (also in `ExecStart=` lines) must name an existing subcommand and only flags its
//!   `--help` lists.
//! - ```` ```yaml aisix-config ````: a config file that must load (exit status other than
//!   2 from `aisix-agent validate`).
//! - other shell-like tags (`bash`, `console`, `shell`) are refused, so nothing escapes
//!   the check.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cloud_mock::provider::MockProvider;
use serde_json::json;
use tests::cloud::CloudMockProcess;
use tests::etcd::Etcd;
use tests::{addr_in, binary, http_client, start_agent};

const BINARIES: [&str; 3] = ["aisix-agent", "aisix-certs", "cloud-mock"];
/// Programs `sh no-run` blocks may use.
const HOST_PROGRAMS: [&str; 11] = [
    "aisix-agent",
    "aisix-certs",
    "cloud-mock",
    "bash",
    "cargo",
    "install",
    "useradd",
    "systemctl",
    "journalctl",
    "docker",
    "export",
];
const ADMIN_KEY: &str = "doc-admin-key";
const CALLER_KEY: &str = "doc-caller-key";

struct Block {
    file: String,
    line: usize,
    info: String,
    body: String,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Every fenced block of README.md and docs/*.md.
fn blocks() -> Vec<Block> {
    let root = workspace();
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.strip_prefix(&root).unwrap().display().to_string();
        let mut open: Option<Block> = None;
        for (i, line) in text.lines().enumerate() {
            let trimmed = line.trim_start();
            if let Some(info) = trimmed.strip_prefix("```") {
                match open.take() {
                    Some(block) => out.push(block),
                    None => {
                        open = Some(Block {
                            file: file.clone(),
                            line: i + 1,
                            info: info.trim().to_owned(),
                            body: String::new(),
                        });
                    }
                }
            } else if let Some(block) = &mut open {
                block.body.push_str(line);
                block.body.push('\n');
            }
        }
        assert!(open.is_none(), "{file}: unclosed code block");
    }
    out
}

/// The commands of a shell block: continuation lines joined, comments and heredoc
/// bodies dropped, split at `|`, `&&`, `||`, `;` and `$(`; leading `VAR=value`
/// assignments skipped. Each command as its words.
fn commands(body: &str) -> Vec<Vec<String>> {
    let mut logical = Vec::new();
    let mut current = String::new();
    let mut heredoc: Option<String> = None;
    for line in body.lines() {
        if let Some(end) = &heredoc {
            if line.trim() == end {
                heredoc = None;
            }
            continue;
        }
        if let Some(pos) = line.find("<<'") {
            let end = line[pos + 3..].split('\'').next().unwrap().to_owned();
            heredoc = Some(end);
        }
        let line = line.split(" #").next().unwrap();
        if line.trim_start().starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(start) => current.push_str(start),
            None => {
                current.push_str(line);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut out = Vec::new();
    for line in logical {
        let line = line
            .replace("$(", ";")
            .replace("&&", ";")
            .replace("||", ";");
        for segment in line.split([';', '|']) {
            let words: Vec<String> = segment
                .split_whitespace()
                .map(|w| {
                    w.trim_matches(|c| c == '"' || c == '\'' || c == ')')
                        .to_owned()
                })
                .skip_while(|w| {
                    w.contains('=')
                        && !w.starts_with('-')
                        && w.split('=').next().is_some_and(|v| {
                            v.chars()
                                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                        })
                })
                .collect();
            if !words.is_empty() {
                out.push(words);
            }
        }
    }
    out
}

/// Checks an invocation of one of our binaries: its subcommand exists and every flag
/// is one its `--help` lists.
fn check_invocation(words: &[String], at: &str) {
    let program = Path::new(&words[0])
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let run_help = |args: &[&str]| {
        let out = Command::new(binary(&program)).args(args).output().unwrap();
        assert!(out.status.success(), "{at}: {program} {args:?} failed");
        String::from_utf8(out.stdout).unwrap()
    };
    let top = run_help(&["--help"]);
    let subcommands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    let sub = words[1..]
        .iter()
        .find(|w| !w.starts_with('-'))
        .filter(|w| subcommands.contains(w));
    let help = match sub {
        Some(sub) => run_help(&[sub, "--help"]),
        None => top,
    };
    if !subcommands.is_empty() && program != "aisix-agent" {
        assert!(
            sub.is_some(),
            "{at}: `{}` names no subcommand of {program}",
            words.join(" ")
        );
    }
    for flag in words[1..].iter().filter(|w| w.starts_with("--")) {
        let flag = flag.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{at}: {program} {} has no flag {flag}:\n{help}",
            sub.map_or("", String::as_str)
        );
    }
}

fn ours(word: &str) -> bool {
    let name = word.rsplit(['/', '=']).next().unwrap_or(word);
    BINARIES.contains(&name)
}

/// The live stack the `sh` blocks run against, and their environment.
struct Stack {
    _etcd: Etcd,
    _mock: MockProvider,
    _cloud: CloudMockProcess,
    _agent: tests::Process,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

async fn stack() -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start().await;
    let mock = MockProvider::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "etcd:\n  endpoints: [\"{}\"]\n  cache_dir: {}\nproxy:\n  addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\n  admin_keys: [{ADMIN_KEY}]\nshutdown:\n  min_drain_secs: 0\n",
            etcd.url(),
            dir.path().join("cache").display()
        ),
    )
    .unwrap();
    let (mut agent, proxy) = start_agent(&config).await;
    let within = Duration::from_secs(20);
    let admin = format!(
        "http://{}",
        addr_in(&agent.wait_for_line("admin listener ready", within).await)
    );
    let status = format!(
        "http://{}",
        addr_in(&agent.wait_for_line("metrics listener ready", within).await)
    );
    let http = http_client();
    let create = |kind: &str, body: serde_json::Value| {
        let request = http
            .post(format!("{admin}/admin/v1/{kind}"))
            .bearer_auth(ADMIN_KEY)
            .json(&body);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 201);
            response.json::<serde_json::Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let pk = create(
        "provider_keys",
        json!({"display_name": "mock", "provider": "openai", "api_base": mock.url(), "api_key": "sk-doc-upstream"}),
    )
    .await;
    create(
        "models",
        json!({"display_name": "gpt-4o-mini", "model_name": "gpt-4o-mini", "provider_key_id": pk}),
    )
    .await;
    create(
        "api_keys",
        json!({"key": CALLER_KEY, "allowed_models": ["*"]}),
    )
    .await;
    // A fresh control plane: the pages create what they use (nothing is prepared here
    // that a page does not show).
    let cloud = CloudMockProcess::start(&dir.path().join("cloud-mock"), None).await;
    let bin_dir = binary("aisix-agent").parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env = [
        ("PATH", path),
        ("AISIX_PROXY", proxy),
        ("AISIX_STATUS", status),
        ("AISIX_ADMIN", admin),
        ("AISIX_API_KEY", CALLER_KEY.to_owned()),
        ("AISIX_ADMIN_KEY", ADMIN_KEY.to_owned()),
        ("AISIX_CP", cloud.dp_url.clone()),
        ("AISIX_CONSOLE", cloud.console.url.clone()),
        ("AISIX_CONSOLE_TOKEN", cloud.console.token.clone()),
        ("AISIX_MOCK", mock.url()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Stack {
        _etcd: etcd,
        _mock: mock,
        _cloud: cloud,
        _agent: agent,
        env,
        _dir: dir,
    }
}

#[tokio::test]
async fn every_command_in_the_docs_is_exercised() {
    let blocks = blocks();
    let mut runnable: Vec<&Block> = Vec::new();
    let mut checked = 0;
    for block in &blocks {
        let at = format!("{}:{}", block.file, block.line);
        let kind = block.info.split_whitespace().next().unwrap_or("");
        assert!(
            !matches!(kind, "bash" | "console" | "shell" | "shell-session"),
            "{at}: tag shell blocks `sh` (run by the doc check) or `sh no-run`"
        );
        match block.info.as_str() {
            "sh" => runnable.push(block),
            "sh no-run" => {
                for words in commands(&block.body) {
                    let program = words[0].as_str();
                    assert!(
                        HOST_PROGRAMS.contains(&program),
                        "{at}: `{}`: {program} is neither run by the doc check nor a known host command",
                        words.join(" ")
                    );
                    if program == "bash" {
                        let script = workspace().join(&words[1]);
                        assert!(script.is_file(), "{at}: no script {}", script.display());
                    }
                }
            }
            "yaml aisix-config" => {
                let dir = tempfile::tempdir().unwrap();
                let config = dir.path().join("config.yaml");
                std::fs::write(&config, &block.body).unwrap();
                let out = Command::new(binary("aisix-agent"))
                    .args(["validate", "--config", config.to_str().unwrap()])
                    .output()
                    .unwrap();
                assert_ne!(
                    out.status.code(),
                    Some(2),
                    "{at}: the example config does not load: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                checked += 1;
            }
            _ => {}
        }
        // Invocations of our binaries, wherever they appear (ExecStart= included).
        let shell_like = kind == "sh";
        for line in block.body.lines() {
            let candidates: Vec<Vec<String>> = if shell_like {
                commands(line)
            } else if let Some(command) = line
                .strip_prefix("ExecStart=")
                .or_else(|| line.strip_prefix("ExecReload="))
            {
                vec![command.split_whitespace().map(str::to_owned).collect()]
            } else {
                Vec::new()
            };
            for words in candidates.iter().filter(|w| ours(&w[0])) {
                let mut words = words.clone();
                words[0] = words[0].rsplit('=').next().unwrap().to_owned();
                check_invocation(&words, &at);
                checked += 1;
            }
        }
    }

    // Run the `sh` blocks of each document in order, in their own directory.
    let stack = stack().await;
    let mut files: Vec<&str> = runnable.iter().map(|b| b.file.as_str()).collect();
    files.dedup();
    for file in &files {
        let dir = tempfile::tempdir().unwrap();
        let mut script = String::from("set -euo pipefail\n");
        for block in runnable.iter().filter(|b| b.file == *file) {
            script.push_str(&format!(
                "echo '::block {}:{}' >&2\n",
                block.file, block.line
            ));
            script.push_str(&block.body);
        }
        let mut command = Command::new("timeout");
        command
            .args(["120", "bash", "-c", &script])
            .current_dir(dir.path())
            .envs(stack.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        // Off the runtime's thread: the stack's in-process mock keeps answering.
        let out = tokio::task::spawn_blocking(move || command.output())
            .await
            .unwrap()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{file}: a command failed (the last '::block' line says which block):\n--- stdout\n{}\n--- stderr\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        checked += runnable.iter().filter(|b| b.file == *file).count();
    }
    println!(
        "doc check: {} blocks, {} run from {} documents, {checked} checks",
        blocks.len(),
        runnable.len(),
        files.len()
    );
}
