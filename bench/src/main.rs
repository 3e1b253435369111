//! aisix-bench: the performance harness (`bash scripts/bench`; docs/performance.md).
//!
//! Everything runs on this machine: the gateway (release build) and the nginx baseline
//! pinned to one core, the load generator (wrk), the fast mock upstream, etcd and
//! cloud-mock pinned to the other. The latency, throughput and streaming figures are
//! medians of interleaved rounds (direct, nginx, gateway in a rotating order); the
//! results go to `<out>/results.md` and `<out>/results.json`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark tool: a failure should stop it loudly"
)]

mod fixed;
mod guardrails;
mod inflight;
mod limiter;
mod load;
mod nginx;
mod procs;
mod report;
mod scale;
mod streaming;
mod streams;
mod upstream;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};

use procs::{Pinned, cpu_time, free_port, rss_mib};
use report::{Figures, Target};

const CALLER: &str = "bench-caller-key";
/// A caller with rate limits (high enough never to refuse): what the limiter costs.
const LIMITED: &str = "bench-limited-key";

#[derive(Parser)]
#[command(
    name = "aisix-bench",
    about = "Measures the gateway against direct calls and nginx"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Runs only the fast mock upstream.
    Upstream(upstream::UpstreamArgs),
    /// Measures configuration scale in this process and prints JSON.
    Scale(scale::ScaleArgs),
    /// Times the shared rate limiter's admissions against a Redis, in this process.
    Limiter(limiter::LimiterArgs),
}

#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct RunArgs {
    /// Interleaved rounds of the latency, throughput and streaming runs.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Length of each concurrency-1 run.
    #[arg(long, default_value_t = 5)]
    latency_secs: u64,
    /// Length of each throughput run.
    #[arg(long, default_value_t = 5)]
    throughput_secs: u64,
    /// Connections of the throughput and steady-load runs.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Streams per target per round.
    #[arg(long, default_value_t = 10)]
    streams: usize,
    /// Content events per stream and the gap between events (µs).
    #[arg(long, default_value_t = 50)]
    sse_chunks: usize,
    #[arg(long, default_value_t = 2000)]
    sse_interval_us: u64,
    /// Length of the steady-load run that watches memory.
    #[arg(long, default_value_t = 600)]
    steady_secs: u64,
    /// How long after the load the idle memory is read.
    #[arg(long, default_value_t = 60)]
    after_secs: u64,
    /// Configuration writes timed from etcd and from cloud-mock each.
    #[arg(long, default_value_t = 100)]
    writes: usize,
    /// Cold starts timed.
    #[arg(long, default_value_t = 10)]
    cold_starts: usize,
    /// Calls held in flight at once, one burst each, for the memory per call.
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 5000])]
    inflight: Vec<usize>,
    /// Concurrent streams of the streams-at-scale burst, their content events and the
    /// gap between events (ms).
    #[arg(long, default_value_t = 5000)]
    scale_streams: usize,
    #[arg(long, default_value_t = 100)]
    scale_chunks: usize,
    #[arg(long, default_value_t = 20)]
    scale_interval_ms: u64,
    /// Requests a second of the fixed-rate latency runs.
    #[arg(long, default_value_t = 1000)]
    fixed_rate: u32,
    /// Write access logs (the agent's default) to a file.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    access_log: bool,
    #[arg(long, default_value_t = 0)]
    gateway_core: usize,
    #[arg(long, default_value_t = 1)]
    load_core: usize,
    /// Where results.md and results.json are written.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Upstream(args)) => match upstream::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("upstream: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Scale(args)) => {
            scale::run(&args);
            ExitCode::SUCCESS
        }
        Some(Command::Limiter(args)) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(limiter::run(&args));
            ExitCode::SUCCESS
        }
        None => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(bench(cli.run));
            ExitCode::SUCCESS
        }
    }
}

/// The places a benchmark run keeps its files and the processes it shares.
struct Bench {
    args: RunArgs,
    dir: tempfile::TempDir,
    agent: PathBuf,
    http: reqwest::Client,
    upstream: String,
    /// The mock upstream process, stopped when the run ends.
    _mock: Pinned,
}

async fn bench(args: RunArgs) {
    let bench = Bench::prepare(args);
    let args = &bench.args;
    let mut figures = Figures::default();
    let (clean, found) = guardrails::measure();
    println!(
        "guardrails: pii chain of every detector on a 2 KB prompt: {:.1} µs clean, {:.1} µs with 3 masks",
        clean.as_secs_f64() * 1e6,
        found.as_secs_f64() * 1e6
    );
    figures.guardrail_chain = Some((clean, found));
    let script = load::script(bench.dir.path(), "bench", CALLER);

    // The file-mode gateway, the nginx baseline and the mock itself.
    let mut gateway = bench.start_agent("gateway", &bench.file_mode_config());
    let gateway_url = format!("http://{}/v1/chat/completions", gateway.1);
    let nginx_port = free_port();
    let nginx = nginx::start(
        args.gateway_core,
        bench.dir.path(),
        "nginx",
        nginx_port,
        &bench.upstream,
    );
    let targets = [
        Target::new(
            "direct",
            format!("http://{}/v1/chat/completions", bench.upstream),
            None,
        ),
        Target::new(
            "nginx",
            format!("http://127.0.0.1:{nginx_port}/v1/chat/completions"),
            Some(nginx.pid()),
        ),
        Target::new("gateway", gateway_url.clone(), Some(gateway.0.pid())),
    ];
    for t in &targets {
        bench.chat_ok(&t.url).await;
    }
    let gateway_pid = gateway.0.pid();
    figures.rss_idle_mib = rss_mib(gateway_pid);
    println!("idle gateway: {:.1} MiB resident", figures.rss_idle_mib);
    for t in &targets {
        load::wrk(&t.url, args.connections, Duration::from_secs(2), &script);
    }

    for round in 0..args.rounds {
        let order = rotated(&targets, round);
        for t in &order {
            let run = load::wrk(&t.url, 1, Duration::from_secs(args.latency_secs), &script);
            figures.latency(t.name, run);
        }
        for t in &order {
            let cpu_before = t.pid.map(cpu_time);
            let run = load::wrk(
                &t.url,
                args.connections,
                Duration::from_secs(args.throughput_secs),
                &script,
            );
            let cpu = t
                .pid
                .zip(cpu_before)
                .map(|(pid, before)| cpu_time(pid) - before);
            figures.throughput(t.name, run, cpu);
            if t.name == "gateway" {
                figures.rss_rounds.push(rss_mib(gateway_pid));
            }
        }
        println!(
            "round {}/{} of latency and throughput done",
            round + 1,
            args.rounds
        );
    }

    bench.fixed_rounds(&mut figures, &targets).await;
    bench
        .limiter_rounds(&mut figures, &gateway_url, gateway_pid)
        .await;
    bench
        .traced_rounds(&mut figures, &gateway_url, gateway_pid)
        .await;
    bench.translated_rounds(&mut figures, &gateway_url, gateway_pid);
    bench.static_rounds(&mut figures).await;
    bench.inflight_rounds(&mut figures).await;
    bench.stream_scale(&mut figures).await;

    let streamer = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .expect("client");
    let intervals = (args.sse_chunks + 2) as u32;
    for round in 0..args.rounds {
        for t in rotated(&targets, round) {
            let mut runs = Vec::new();
            for _ in 0..args.streams {
                runs.push(streaming::one(&streamer, &t.url, CALLER).await);
            }
            figures.streaming(t.name, &runs, intervals);
        }
    }
    println!("streaming rounds done");

    // Steady load for a long while, memory read as it goes.
    let steady = {
        let (url, script, connections, secs) = (
            gateway_url.clone(),
            script.clone(),
            args.connections,
            args.steady_secs,
        );
        std::thread::spawn(move || load::wrk(&url, connections, Duration::from_secs(secs), &script))
    };
    let started = Instant::now();
    let every = Duration::from_secs((args.steady_secs / 60).max(1));
    while !steady.is_finished() {
        figures
            .rss_steady
            .push((started.elapsed().as_secs(), rss_mib(gateway_pid)));
        std::thread::sleep(every);
    }
    figures.steady = Some(steady.join().expect("steady load"));
    let load_ended = Instant::now();
    println!("steady load done");

    // While the file-mode gateway sits idle: propagation, cold start and scale.
    figures.propagation_etcd = bench.etcd_propagation().await;
    let (cloud, cold) = bench.managed().await;
    figures.propagation_cloud = cloud;
    figures.cold_start = cold;
    figures.scale = bench.scale();

    let idle_until = load_ended + Duration::from_secs(args.after_secs);
    std::thread::sleep(idle_until.saturating_duration_since(Instant::now()));
    figures.rss_after_mib = rss_mib(gateway_pid);
    gateway.0.stop();
    drop(nginx);

    let (markdown, json) = figures.report(args, &report::machine());
    std::fs::create_dir_all(&args.out).expect("output directory");
    std::fs::write(args.out.join("results.md"), &markdown).expect("write results.md");
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("write results.json");
    println!(
        "\n{markdown}\nwritten to {}/results.{{md,json}}",
        args.out.display()
    );
}

fn rotated(targets: &[Target], round: usize) -> Vec<Target> {
    let mut order = targets.to_vec();
    order.rotate_left(round % targets.len());
    order
}

impl Bench {
    fn prepare(args: RunArgs) -> Bench {
        for (tool, package) in [
            ("wrk", "wrk"),
            ("nginx", "nginx-light"),
            ("taskset", "util-linux"),
            ("etcd", "etcd-server"),
            ("redis-server", "redis-server"),
            ("redis-cli", "redis-tools"),
        ] {
            let found = std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                found,
                "{tool} is missing: install Debian's {package} package (scripts/bench does)"
            );
        }
        let agent = tests::binary("aisix-agent");
        assert!(
            agent.parent().is_some_and(|d| d.ends_with("release")),
            "{} is not a release build: run scripts/bench",
            agent.display()
        );
        // The harness and everything it starts run on the load core, except what it
        // pins to the gateway core on purpose.
        procs::pin(std::process::id(), args.load_core);
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let exe = std::env::current_exe().expect("own path");
        let mut upstream = Pinned::start(
            args.load_core,
            &exe,
            &[
                "upstream",
                "--addr",
                &format!("127.0.0.1:{port}"),
                "--sse-chunks",
                &args.sse_chunks.to_string(),
                "--sse-interval-us",
                &args.sse_interval_us.to_string(),
            ],
            &dir.path().join("upstream.log"),
        );
        upstream.wait_for_line("upstream listening on", Duration::from_secs(10));
        Bench {
            args,
            dir,
            agent,
            http: tests::http_client(),
            upstream: format!("127.0.0.1:{port}"),
            _mock: upstream,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A config file for the agent: `source` (YAML) plus the common settings.
    /// The agent's config file; `source` may end with an `observability:` block's
    /// extra lines after a `#observability` marker line (see [`Self::traced_rounds`]).
    fn config(&self, name: &str, source: &str, port: u16) -> PathBuf {
        self.config_with(name, source, port, "")
    }

    /// [`Self::config`] with `proxy` (YAML lines) added to the proxy section.
    fn config_with(&self, name: &str, source: &str, port: u16, proxy: &str) -> PathBuf {
        let (source, observability) = source
            .split_once("#observability\n")
            .unwrap_or((source, ""));
        let text = format!(
            "{source}proxy:\n  addr: 127.0.0.1:{port}\n{proxy}observability:\n  access_log: {}\n{observability}  metrics:\n    prometheus:\n      addr: 127.0.0.1:0\nshutdown:\n  min_drain_secs: 0\n  drain_timeout_secs: 5\n",
            self.args.access_log
        );
        let path = self.path(&format!("{name}.yaml"));
        std::fs::write(&path, text).expect("write config");
        path
    }

    fn provider_key(&self) -> Value {
        json!({"display_name": "mock", "provider": "openai", "api_base": format!("http://{}/v1", self.upstream), "api_key": "sk-bench-provider"})
    }

    fn model(&self, alias: &str) -> Value {
        json!({"display_name": alias, "model_name": "up-bench", "provider_key_id": "mock"})
    }

    fn caller(&self) -> Value {
        json!({"display_name": "bench", "key_hash": tests::key_hash(CALLER), "allowed_models": ["*"]})
    }

    fn file_mode_config(&self) -> (String, u16) {
        let with_id = |id: &str, mut v: Value| {
            v["id"] = json!(id);
            v
        };
        let limits = json!({"rpm": 1_000_000_000u64, "rpd": 1_000_000_000_000u64, "tpm": 1_000_000_000_000u64, "concurrency": 100_000});
        let limited = json!({"id": "limited", "display_name": "bench-limited", "key_hash": tests::key_hash(LIMITED), "allowed_models": ["*"], "rate_limit": limits});
        // Bedrock and Gemini keys whose translated calls the mock upstream also answers.
        let aws = json!({"access_key_id": "AKIABENCH", "secret_access_key": "bench-secret", "region": "us-east-1"});
        let bedrock = json!({"id": "bedrock", "display_name": "bedrock", "provider": "bedrock",
            "api_base": format!("http://{}", self.upstream), "api_key": aws.to_string()});
        let gemini = json!({"id": "gemini", "display_name": "gemini", "provider": "gemini",
            "api_base": format!("http://{}", self.upstream), "api_key": "bench-gemini-key"});
        let translated = |alias: &str, model: &str, key: &str| json!({"id": alias, "display_name": alias, "model_name": model, "provider_key_id": key});
        let resources = json!({
            "provider_keys": [with_id("mock", self.provider_key()), bedrock, gemini],
            "models": [
                with_id("bench", self.model("bench")),
                translated("bench-bedrock", "anthropic.claude-bench-v1:0", "bedrock"),
                translated("bench-gemini", "gemini-bench", "gemini"),
            ],
            "api_keys": [with_id("caller", self.caller()), limited],
        });
        // JSON is YAML.
        let file = self.path("resources.yaml");
        std::fs::write(&file, resources.to_string()).expect("write resources");
        (format!("resources_file: {}\n", file.display()), free_port())
    }

    /// Rounds of c=1 latency and throughput for a rate-limited caller: on the
    /// file-mode gateway (local counters) and on a second one that counts in Redis
    /// (Debian's redis-server on the load core).
    async fn limiter_rounds(&self, figures: &mut Figures, local_url: &str, local_pid: u32) {
        let args = &self.args;
        let redis_port = free_port();
        let redis_server = Pinned::start(
            args.load_core,
            std::path::Path::new("redis-server"),
            &[
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            &self.path("redis.log"),
        );
        let redis_mode = (
            format!(
                "resources_file: {}\nratelimit:\n  backend: redis\n  redis: {{url: \"redis://127.0.0.1:{redis_port}\"}}\n",
                self.path("resources.yaml").display()
            ),
            free_port(),
        );
        let mut shared = self.start_agent("gateway-redis", &redis_mode);
        let shared_url = format!("http://{}/v1/chat/completions", shared.1);
        let script = load::script(self.dir.path(), "bench", LIMITED);
        // Until the connection is up the local counters decide: wait for Redis to
        // have counted a request.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self.chat_as(&self.http, &shared_url, LIMITED).await;
            let counted = std::process::Command::new("redis-cli")
                .args([
                    "-p",
                    &redis_port.to_string(),
                    "EXISTS",
                    "aisix:{rl}:k:limited",
                ])
                .output()
                .is_ok_and(|o| o.stdout.starts_with(b"1"));
            if status == Some(200) && counted {
                break;
            }
            assert!(Instant::now() < deadline, "the Redis limiter never counted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let targets = [
            Target::new("limit-local", local_url.to_owned(), Some(local_pid)),
            Target::new("limit-redis", shared_url, Some(shared.0.pid())),
        ];
        self.paired_rounds(figures, &targets, &script);
        println!("rate-limiter rounds done");
        shared.0.stop();
        drop(redis_server);
    }

    /// Rounds of c=1 latency and throughput on the file-mode gateway and on a second one
    /// that exports every request's spans (sample ratio 1.0) to the mock upstream's
    /// OTLP receiver.
    async fn traced_rounds(&self, figures: &mut Figures, plain_url: &str, plain_pid: u32) {
        let traced_mode = (
            format!(
                "resources_file: {}\n#observability\n  tracing:\n    otlp: {{enabled: true, endpoint: \"http://{}\", sample_ratio: 1.0}}\n",
                self.path("resources.yaml").display(),
                self.upstream
            ),
            free_port(),
        );
        let mut traced = self.start_agent("gateway-traced", &traced_mode);
        let traced_url = format!("http://{}/v1/chat/completions", traced.1);
        assert_eq!(self.chat(&self.http, &traced_url).await, Some(200));
        let script = load::script(self.dir.path(), "bench", CALLER);
        let targets = [
            Target::new("untraced", plain_url.to_owned(), Some(plain_pid)),
            Target::new("traced", traced_url, Some(traced.0.pid())),
        ];
        self.paired_rounds(figures, &targets, &script);
        println!("tracing rounds done");
        traced.0.stop();
    }

    /// The second topology: an nginx static upstream on the load core beside the load
    /// generator, and on the gateway core, each alone while measured, a gateway and an
    /// nginx proxy in front of it (a reviewer's setup: no Rust mock in the path).
    async fn static_rounds(&self, figures: &mut Figures) {
        let dir = self.dir.path();
        let static_port = free_port();
        let mut upstream = nginx::start_static(self.args.load_core, dir, static_port);
        let upstream_addr = format!("127.0.0.1:{static_port}");
        let proxy_port = free_port();
        let mut proxy = nginx::start(
            self.args.gateway_core,
            dir,
            "nginx-proxy-static",
            proxy_port,
            &upstream_addr,
        );
        let mode = self.mode_for(&upstream_addr, "static");
        let mut gateway = self.start_agent("gateway-static", &mode);
        // The default on one core is a thread per core; the shared runtime beside it.
        let shared_mode = (mode.0.clone(), free_port());
        let one_worker = "  thread_per_core: false\n  workers: 1\n";
        let core = self.args.gateway_core.to_string();
        let mut shared =
            self.start_agent_on(&core, "gateway-shared-static", &shared_mode, one_worker);
        let chat = |addr: &str| format!("http://{addr}/v1/chat/completions");
        let targets = [
            Target::new("direct-static", chat(&upstream_addr), None),
            Target::new(
                "nginx-static",
                chat(&format!("127.0.0.1:{proxy_port}")),
                Some(proxy.pid()),
            ),
            Target::new("gateway-static", chat(&gateway.1), Some(gateway.0.pid())),
            Target::new(
                "gateway-shared-static",
                chat(&shared.1),
                Some(shared.0.pid()),
            ),
        ];
        for t in &targets {
            self.chat_ok(&t.url).await;
        }
        let script = load::script(dir, "bench", CALLER);
        self.paired_rounds(figures, &targets, &script);
        self.fixed_rounds(figures, &targets).await;
        println!("static-upstream topology rounds done");
        gateway.0.stop();
        shared.0.stop();
        proxy.stop();
        self.core_rounds(figures, &mode.0, &script).await;
        self.tls_rounds(figures, &mode.0).await;
        upstream.stop();
    }

    /// File mode with one model served by the upstream at `addr`; its resources file
    /// is named after `name`.
    fn mode_for(&self, addr: &str, name: &str) -> (String, u16) {
        let key = json!({"id": "mock", "display_name": "mock", "provider": "openai",
            "api_base": format!("http://{addr}/v1"), "api_key": "sk-bench-provider"});
        let mut model = self.model("bench");
        model["id"] = json!("bench");
        let mut caller = self.caller();
        caller["id"] = json!("caller");
        let resources = json!({"provider_keys": [key], "models": [model], "api_keys": [caller]});
        let file = self.path(&format!("resources-{name}.yaml"));
        std::fs::write(&file, resources.to_string()).expect("write resources");
        (format!("resources_file: {}\n", file.display()), free_port())
    }

    /// Resident memory with 1,000 and then 5,000 calls in flight at once (an upstream
    /// that answers after 5 s, a connection per call), and a minute after the burst.
    async fn inflight_rounds(&self, figures: &mut Figures) {
        const HELD_US: u64 = 5_000_000;
        let port = free_port();
        let exe = std::env::current_exe().expect("own path");
        let addr = format!("127.0.0.1:{port}");
        let mut slow = Pinned::start(
            self.args.load_core,
            &exe,
            &[
                "upstream",
                "--addr",
                &addr,
                "--delay-us",
                &HELD_US.to_string(),
            ],
            &self.path("upstream-slow.log"),
        );
        slow.wait_for_line("upstream listening on", Duration::from_secs(10));
        let (mut gateway, gateway_addr) =
            self.start_agent("gateway-slow", &self.mode_for(&addr, "slow"));
        let url = format!("http://{gateway_addr}/v1/chat/completions");
        self.chat_ok(&url).await;
        let pid = gateway.pid();
        for calls in self.args.inflight.clone() {
            let before = rss_mib(pid);
            let set = inflight::start(&url, CALLER, calls);
            // Every call is in flight from about a second in until the upstream
            // answers; the peak is read meanwhile.
            let mut peak = before;
            let sampling = Instant::now();
            while sampling.elapsed() < Duration::from_micros(HELD_US - 500_000) {
                peak = peak.max(rss_mib(pid));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let failed = inflight::finish(set, Duration::from_secs(30)).await;
            println!(
                "{calls} calls in flight: {before:.1} -> {peak:.1} MiB, {:.1} KiB a call, {failed} failed",
                (peak - before) * 1024.0 / calls as f64
            );
            figures.inflight.push(report::InFlight {
                calls,
                before_mib: before,
                peak_mib: peak,
                failed,
            });
        }
        let burst_ended = Instant::now();
        let idle = Duration::from_secs(self.args.after_secs);
        tokio::time::sleep(idle.saturating_sub(burst_ended.elapsed())).await;
        figures.rss_after_burst_mib = Some(rss_mib(pid));
        gateway.stop();
        slow.stop();
    }

    /// `--scale-streams` streams at once, straight from a mock upstream and through
    /// the gateway: the gaps between events, stalled streams, and the gateway's memory.
    async fn stream_scale(&self, figures: &mut Figures) {
        let args = &self.args;
        let port = free_port();
        let exe = std::env::current_exe().expect("own path");
        let addr = format!("127.0.0.1:{port}");
        let interval_us = (args.scale_interval_ms * 1000).to_string();
        let chunks = args.scale_chunks.to_string();
        let mut mock = Pinned::start(
            args.load_core,
            &exe,
            &[
                "upstream",
                "--addr",
                &addr,
                "--sse-chunks",
                &chunks,
                "--sse-interval-us",
                &interval_us,
            ],
            &self.path("upstream-streams.log"),
        );
        mock.wait_for_line("upstream listening on", Duration::from_secs(10));
        let (mut gateway, gateway_addr) =
            self.start_agent("gateway-streams", &self.mode_for(&addr, "streams"));
        let pid = gateway.pid();
        let chat = |a: &str| format!("http://{a}/v1/chat/completions");
        let within = Duration::from_millis(args.scale_interval_ms * args.scale_chunks as u64)
            + Duration::from_secs(60);
        for (name, url) in [("direct", chat(&addr)), ("gateway", chat(&gateway_addr))] {
            let before = rss_mib(pid);
            let running = streams::burst(&url, CALLER, args.scale_streams, within);
            tokio::pin!(running);
            let mut peak = before;
            let burst = loop {
                tokio::select! {
                    burst = &mut running => break burst,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        peak = peak.max(rss_mib(pid));
                    }
                }
            };
            println!(
                "{} streams {name}: {} finished, {} stalled, gap p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
                burst.streams,
                burst.finished,
                burst.stalled,
                burst.gap_p50_us,
                burst.gap_p99_us,
                burst.gap_max_us
            );
            figures.stream_bursts.push((name, burst, before, peak));
        }
        gateway.stop();
        mock.stop();
    }

    /// Throughput of the gateway on one core and on both, with a thread per core and
    /// with the shared runtime, against the static upstream (which, like wrk, then
    /// shares the second core with the gateway).
    async fn core_rounds(&self, figures: &mut Figures, source: &str, script: &Path) {
        let one = self.args.gateway_core.to_string();
        let both = format!("{},{}", self.args.gateway_core, self.args.load_core);
        let setups = [
            ("tpc-1core", &one, "  thread_per_core: true\n  workers: 1\n"),
            (
                "tpc-2cores",
                &both,
                "  thread_per_core: true\n  workers: 2\n",
            ),
            (
                "shared-1core",
                &one,
                "  thread_per_core: false\n  workers: 1\n",
            ),
            (
                "shared-2cores",
                &both,
                "  thread_per_core: false\n  workers: 2\n",
            ),
        ];
        let mut agents = Vec::new();
        let mut targets = Vec::new();
        for (name, cpus, proxy) in setups {
            let (agent, addr) =
                self.start_agent_on(cpus, name, &(source.to_owned(), free_port()), proxy);
            let url = format!("http://{addr}/v1/chat/completions");
            self.chat_ok(&url).await;
            targets.push(Target::new(name, url, Some(agent.pid())));
            agents.push(agent);
        }
        self.throughput_rounds(figures, &targets, script);
        println!("one-core and two-core rounds done");
        for mut agent in agents {
            agent.stop();
        }
    }

    /// The gateway alone on its core over plain HTTP and over TLS (rustls, the
    /// listener's `tls`), with keep-alive, and TLS with a new connection per request:
    /// the handshakes a second one core completes.
    async fn tls_rounds(&self, figures: &mut Figures, source: &str) {
        let dir = self.dir.path();
        let files = tests::TlsFiles::generate(dir, "bench-ca");
        let tls = format!(
            "  tls: {{cert_file: {}, key_file: {}}}\n",
            files.server_cert.display(),
            files.server_key.display()
        );
        let core = self.args.gateway_core.to_string();
        let (mut plain, plain_addr) = self.start_agent_on(
            &core,
            "gateway-plain",
            &(source.to_owned(), free_port()),
            "",
        );
        let (mut secure, secure_addr) = self.start_agent_on(
            &core,
            "gateway-tls",
            &(source.to_owned(), free_port()),
            &tls,
        );
        proxy_core::install_crypto_provider();
        let trusting = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(&std::fs::read(&files.ca).expect("CA file"))
                    .expect("CA certificate"),
            )
            .build()
            .expect("client");
        let secure_url = format!("https://{secure_addr}/v1/chat/completions");
        assert_eq!(
            self.chat(&trusting, &secure_url).await,
            Some(200),
            "the TLS gateway answers"
        );
        let kept = load::script(dir, "bench", CALLER);
        let closing = load::script_closing(dir, "bench", CALLER, true);
        let targets = [
            Target::new(
                "plain",
                format!("http://{plain_addr}/v1/chat/completions"),
                Some(plain.pid()),
            ),
            Target::new("tls", secure_url.clone(), Some(secure.pid())),
            Target::new("tls-handshakes", secure_url, Some(secure.pid())).with_script(closing),
        ];
        self.throughput_rounds(figures, &targets, &kept);
        println!("TLS rounds done");
        plain.stop();
        secure.stop();
    }

    /// Rounds of fixed-rate load (`--fixed-rate` requests a second) per target, its
    /// latency measured from each request's due time.
    async fn fixed_rounds(&self, figures: &mut Figures, targets: &[Target]) {
        let secs = Duration::from_secs(self.args.latency_secs);
        for round in 0..self.args.rounds {
            for t in rotated(targets, round) {
                let run = fixed::run(&t.url, CALLER, "bench", self.args.fixed_rate, secs);
                figures.latency(report::fixed(t.name), run);
            }
        }
        println!("fixed-rate rounds done");
    }

    /// Rounds of c=1 latency and throughput on the file-mode gateway for one model of
    /// each kind: native (OpenAI to OpenAI-compatible), translated to Bedrock's Converse
    /// (signed with Signature V4) and to Gemini's generateContent, all answered by the
    /// mock upstream.
    fn translated_rounds(&self, figures: &mut Figures, url: &str, pid: u32) {
        let dir = self.dir.path();
        let targets = [
            Target::new("native", url.to_owned(), Some(pid))
                .with_script(load::script(dir, "bench", CALLER)),
            Target::new("bedrock", url.to_owned(), Some(pid)).with_script(load::script(
                dir,
                "bench-bedrock",
                CALLER,
            )),
            Target::new("gemini", url.to_owned(), Some(pid)).with_script(load::script(
                dir,
                "bench-gemini",
                CALLER,
            )),
        ];
        self.paired_rounds(figures, &targets, &load::script(dir, "bench", CALLER));
        println!("translation rounds done");
    }

    /// Interleaved rounds of c=1 latency and of throughput with CPU, per target.
    fn paired_rounds(&self, figures: &mut Figures, targets: &[Target], script: &Path) {
        let args = &self.args;
        for round in 0..args.rounds {
            for t in rotated(targets, round) {
                let script = t.script.as_deref().unwrap_or(script);
                let run = load::wrk(&t.url, 1, Duration::from_secs(args.latency_secs), script);
                figures.latency(t.name, run);
                self.throughput_run(figures, &t, script);
            }
        }
    }

    /// Interleaved rounds of throughput with CPU, per target (with its own script,
    /// when it has one).
    fn throughput_rounds(&self, figures: &mut Figures, targets: &[Target], script: &Path) {
        for round in 0..self.args.rounds {
            for t in rotated(targets, round) {
                self.throughput_run(figures, &t, t.script.as_deref().unwrap_or(script));
            }
        }
    }

    /// One throughput run at `--connections`, with the target's CPU time.
    fn throughput_run(&self, figures: &mut Figures, t: &Target, script: &Path) {
        let before = t.pid.map(cpu_time);
        let run = load::wrk(
            &t.url,
            self.args.connections,
            Duration::from_secs(self.args.throughput_secs),
            script,
        );
        let cpu = t.pid.zip(before).map(|(pid, b)| cpu_time(pid) - b);
        figures.throughput(t.name, run, cpu);
    }

    /// Starts the agent on the gateway core and waits for its proxy listener.
    fn start_agent(&self, name: &str, mode: &(String, u16)) -> (Pinned, String) {
        self.start_agent_on(&self.args.gateway_core.to_string(), name, mode, "")
    }

    /// Starts the agent on the cores of `cpus` with `proxy` added to its proxy
    /// section, and waits for its proxy listener.
    fn start_agent_on(
        &self,
        cpus: &str,
        name: &str,
        (source, port): &(String, u16),
        proxy: &str,
    ) -> (Pinned, String) {
        let config = self.config_with(name, source, *port, proxy);
        let mut agent = Pinned::start_on(
            cpus,
            &self.agent,
            &["--config", config.to_str().expect("utf-8 path")],
            &self.path(&format!("{name}.log")),
        );
        agent.wait_for_line("proxy listener ready", Duration::from_secs(30));
        (agent, format!("127.0.0.1:{port}"))
    }

    async fn chat(&self, http: &reqwest::Client, url: &str) -> Option<u16> {
        self.chat_as(http, url, CALLER).await
    }

    /// The status of a chat completion as `key`; `None` when it failed or a 200 is
    /// not the mock's answer.
    async fn chat_as(&self, http: &reqwest::Client, url: &str, key: &str) -> Option<u16> {
        let response = http
            .post(url)
            .bearer_auth(key)
            .json(
                &json!({"model": "bench", "messages": [{"role": "user", "content": "Say hello."}]}),
            )
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        let body = response.bytes().await.ok()?;
        (status != 200 || body.windows(14).any(|w| w == b"chatcmpl-bench")).then_some(status)
    }

    async fn chat_ok(&self, url: &str) {
        assert_eq!(
            self.chat(&self.http, url).await,
            Some(200),
            "a chat completion through {url}"
        );
    }

    /// Time from a write to the change being listed on `/v1/models`, per write.
    async fn propagation<F, Fut>(&self, gateway: &str, label: &str, mut write: F) -> Vec<Duration>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let url = format!("http://{gateway}/v1/models");
        let mut times = Vec::new();
        for i in 0..self.args.writes {
            let alias = format!("prop-{label}-{i}");
            let needle = format!("\"{alias}\"");
            let started = Instant::now();
            write(alias).await;
            loop {
                let listed = self.http.get(&url).bearer_auth(CALLER).send().await;
                if let Ok(r) = listed {
                    if r.text().await.is_ok_and(|t| t.contains(&needle)) {
                        break;
                    }
                }
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "{needle} never listed"
                );
                // A short blocking pause: tokio's timer would round it up to 1 ms.
                std::thread::sleep(Duration::from_micros(200));
            }
            times.push(started.elapsed());
        }
        times
    }

    async fn etcd_propagation(&self) -> Vec<Duration> {
        let etcd = tests::etcd::Etcd::start().await;
        etcd.put(
            "/aisix/provider_keys/mock",
            &self.provider_key().to_string(),
        )
        .await;
        etcd.put("/aisix/api_keys/caller", &self.caller().to_string())
            .await;
        let source = format!("etcd:\n  endpoints: [{}]\n  prefix: /aisix\n", etcd.url());
        let (mut agent, addr) = self.start_agent("etcd-agent", &(source, free_port()));
        let times = self
            .propagation(&addr, "etcd", |alias| {
                let etcd = &etcd;
                let doc = self.model(&alias).to_string();
                async move {
                    etcd.put(&format!("/aisix/models/{alias}"), &doc).await;
                }
            })
            .await;
        agent.stop();
        println!("etcd propagation done");
        times
    }

    /// Propagation from cloud-mock's console, then cold starts from the sled cache the
    /// agent wrote, with the control plane gone.
    async fn managed(&self) -> (Vec<Duration>, Vec<Duration>) {
        let cloud = tests::cloud::CloudMockProcess::start(&self.path("cloud-mock"), None).await;
        let resources = "/console/v1/environments/demo/resources";
        for (path, body) in [
            ("provider_keys/mock", self.provider_key()),
            ("models/bench", self.model("bench")),
            ("api_keys/caller", self.caller()),
        ] {
            cloud
                .console
                .ok("PUT", &format!("{resources}/{path}"), Some(body))
                .await;
        }
        let bundle = &cloud.bundle_dir;
        let source = format!(
            "managed:\n  enabled: true\n  cp_base_url: {}\n  cp_cert_file: {}\n  cp_key_file: {}\n  cp_ca_file: {}\n  state_dir: {}\n  connect_timeout_ms: 1000\n",
            cloud.dp_url,
            bundle.join("cert.pem").display(),
            bundle.join("key.pem").display(),
            bundle.join("ca.pem").display(),
            self.path("agent-state").display()
        );
        let port = free_port();
        let (mut agent, addr) = self.start_agent("managed-agent", &(source.clone(), port));
        let chat_url = format!("http://{addr}/v1/chat/completions");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.chat(&self.http, &chat_url).await != Some(200) {
            assert!(Instant::now() < deadline, "the managed agent never served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let propagation = self
            .propagation(&addr, "cloud", |alias| {
                let (cloud, doc) = (&cloud, self.model(&alias));
                async move {
                    cloud
                        .console
                        .ok("PUT", &format!("{resources}/models/{alias}"), Some(doc))
                        .await;
                }
            })
            .await;
        agent.stop();
        drop(cloud);
        println!("cloud-mock propagation done");

        let config = self.config("managed-agent", &source, port);
        let fresh = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        let mut cold = Vec::new();
        for run in 0..self.args.cold_starts {
            let started = Instant::now();
            let mut agent = Pinned::start(
                self.args.gateway_core,
                &self.agent,
                &["--config", config.to_str().expect("utf-8 path")],
                &self.path(&format!("cold-{run}.log")),
            );
            while self.chat(&fresh, &chat_url).await != Some(200) {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "cold start {run} never served"
                );
                std::thread::sleep(Duration::from_micros(200));
            }
            cold.push(started.elapsed());
            agent.stop();
        }
        println!("cold starts done");
        (propagation, cold)
    }

    /// Configuration scale in a process of its own on the gateway core.
    fn scale(&self) -> Value {
        let output = std::process::Command::new("taskset")
            .args(["-c", &self.args.gateway_core.to_string()])
            .arg(std::env::current_exe().expect("own path"))
            .arg("scale")
            .output()
            .expect("scale run");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "scale run failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        println!("scale done");
        serde_json::from_str(stdout.trim()).expect("scale prints JSON")
    }
}
