//! `aisix-agent`: parse arguments and config, validate, bind, then run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agent::Controls;
use agent::config::Config;
use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

/// Requests allocate and free many small buffers across threads; mimalloc does it
/// with less CPU than glibc's malloc and returns freed pages sooner.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "aisix-agent",
    version,
    about = "The AISIX AI gateway edge agent",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Path of the YAML config file.
    #[arg(long, short, global = true, default_value = "config.yaml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check the config file and the resources it names, print every problem, and exit.
    Validate,
    /// Enroll this gateway with a one-time token from the console: generate a key here
    /// (it never leaves the host), have the control plane sign it, and keep the bundle
    /// in STATE_DIR/mtls. Then run with managed.state_dir set to STATE_DIR and no
    /// cp_cert/cp_key/cp_ca settings.
    Enroll {
        /// The control plane's data-plane URL, e.g. https://cp.example:7443.
        #[arg(long)]
        cp: String,
        /// The enrollment token (et1:...). Used once.
        #[arg(long)]
        token: String,
        /// The agent's state directory (managed.state_dir).
        #[arg(long)]
        state_dir: PathBuf,
    },
}

const AFTER_HELP: &str = "\
Without a command, serves: the proxy (proxy.addr), the status listener with metrics,
/status/config and /status/ready (observability.metrics.prometheus.addr), and in
self-hosted mode the admin listener (admin.addr).

Configuration: the YAML file named by --config. AISIX_<SECTION>__<FIELD> environment
variables override its keys (AISIX_PROXY__ADDR=127.0.0.1:8080,
AISIX_OBSERVABILITY__METRICS__PROMETHEUS__ADDR=127.0.0.1:9091). RUST_LOG overrides
observability.log_level.

Signals: SIGHUP re-reads the resources file (file mode). SIGTERM or SIGINT drains
(liveness fails, in-flight requests finish) and exits 0; a second one exits at once.

Exit status: 0 after a clean shutdown or a valid config; 1 on a start-up or runtime
failure, or a resource problem found by validate; 2 when the config file is invalid.

Documentation: docs/configuration.md, docs/operations.md, docs/deployment.md.";

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Enroll {
        cp,
        token,
        state_dir,
    }) = &cli.command
    {
        return match enroll(cp, token, state_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("aisix-agent: enroll: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(&cli.config, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            for problem in e.to_string().lines() {
                eprintln!("aisix-agent: {problem}");
            }
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Some(Command::Validate) => validate(&cli.config, &config),
        Some(Command::Enroll { .. }) | None => serve(config),
    };
    agent::logging::flush();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aisix-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> anyhow::Result<ExitCode> {
    agent::logging::init(&config.observability);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if config.thread_per_core() {
        // The proxy's workers run runtimes of their own; this one keeps the admin and
        // status listeners and the background work.
        runtime.worker_threads(1);
    } else {
        runtime.worker_threads(config.workers());
    }
    let runtime = runtime.build().context("cannot start the async runtime")?;
    runtime.spawn(agent::memory::keep_collecting());
    runtime.block_on(async {
        let agent = agent::start(config).await?;
        // Handlers are installed before anything serves, so an early SIGTERM drains too.
        let signals = Signals::install()?;
        let controls = Controls::default();
        tokio::select! {
            result = agent.serve(controls.clone()) => result,
            result = signals.forward(controls) => result,
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

fn enroll(cp: &str, token: &str, state_dir: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let bundle = runtime.block_on(agent::managed::enroll::enroll(cp, token, state_dir))?;
    println!(
        "enrolled as gateway {} of environment {}; certificate valid until {}",
        bundle.identity.dp_id, bundle.identity.env_id, bundle.leaf.not_after
    );
    println!(
        "bundle kept in {}; run with managed.state_dir: {}",
        agent::managed::bundle::BundleStore::new(state_dir)
            .active_dir()
            .display(),
        state_dir.display()
    );
    Ok(())
}

/// SIGHUP reloads; the first SIGTERM/SIGINT drains; a second one exits at once.
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            hup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        })
    }

    async fn forward(mut self, controls: Controls) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: reloading the resources file");
                    controls.reload.notify_one();
                }
                _ = self.term.recv() => stop(&controls),
                _ = self.int.recv() => stop(&controls),
            }
        }
    }
}

fn stop(controls: &Controls) {
    if controls.shutdown.is_cancelled() {
        agent::logging::flush();
        eprintln!("aisix-agent: second signal: exiting without waiting for the drain");
        std::process::exit(130);
    }
    controls.shutdown.cancel();
}

fn validate(config_path: &Path, config: &Config) -> anyhow::Result<ExitCode> {
    let validation = agent::validate::validate(config)?;
    for note in &validation.notes {
        println!("note: {note}");
    }
    if validation.ok() {
        println!("{}: ok ({})", config_path.display(), validation.summary);
        return Ok(ExitCode::SUCCESS);
    }
    for p in &validation.problems {
        println!("problem: {p}");
    }
    println!(
        "{}: {} problem(s)",
        config_path.display(),
        validation.problems.len()
    );
    Ok(ExitCode::FAILURE)
}
