//! `cloud-mock`: run the bundled mock services.

use std::net::SocketAddr;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cloud_mock::provider::{MockProvider, Script};
use cloud_mock::stack::{CONSOLE_TOKEN_FILE, Stack, StackOptions};

#[derive(Parser)]
#[command(
    name = "cloud-mock",
    version,
    about = "Bundled mock services for the AISIX agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane (mTLS data plane + console API) and a mock provider,
    /// keeping state in a directory; ensures a demo environment and a demo gateway
    /// bundle exist.
    Serve {
        /// State directory (CA, server certificate, environments, gateways, tokens,
        /// resources, budgets, usage). Created 0700 if missing.
        #[arg(long)]
        state: PathBuf,
        /// Data-plane (mutual TLS) address.
        #[arg(long, default_value = "127.0.0.1:7443")]
        dp_addr: SocketAddr,
        /// Console API address (plain HTTP, bearer token).
        #[arg(long, default_value = "127.0.0.1:7080")]
        console_addr: SocketAddr,
        /// Mock provider address.
        #[arg(long, default_value = "127.0.0.1:4010")]
        provider_addr: SocketAddr,
        /// Do not start the mock provider.
        #[arg(long)]
        no_provider: bool,
        /// Demo environment created at start.
        #[arg(long, default_value = "demo")]
        demo_env: String,
        /// Gateway id of the demo bundle.
        #[arg(long, default_value = "demo-gw")]
        demo_dp: String,
    },
    /// Run a mock provider speaking both the OpenAI and the Anthropic API (script it
    /// with PUT /_mock/script).
    Provider {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:4010")]
        addr: SocketAddr,
        /// Default script as JSON, e.g. '{"chunks":5,"chunk_interval_ms":100}'.
        #[arg(long)]
        script: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Serve {
            state,
            dp_addr,
            console_addr,
            provider_addr,
            no_provider,
            demo_env,
            demo_dp,
        } => {
            let options = StackOptions {
                state_dir: state.clone(),
                dp_addr,
                console_addr,
                provider_addr: (!no_provider).then_some(provider_addr),
                demo_env: demo_env.clone(),
                demo_dp: demo_dp.clone(),
            };
            let stack = Stack::start(&options).await.with_context(|| {
                format!("cannot start cloud-mock with state {}", state.display())
            })?;
            // The lines scripts and tests read.
            println!("control plane (mTLS) listening on {}", stack.cp.dp_url);
            println!("console listening on {}", stack.cp.console_url);
            println!(
                "console token: {} (also in {})",
                stack.cp.console_token,
                state.join(CONSOLE_TOKEN_FILE).display()
            );
            println!(
                "demo bundle for {demo_env}/{demo_dp} {} {} (cert.pem, key.pem, ca.pem)",
                if stack.demo_bundle_issued {
                    "written to"
                } else {
                    "kept in"
                },
                stack.demo_bundle.display()
            );
            if let Some(provider) = &stack.provider {
                println!("mock provider listening on {}", provider.url());
            }
            shutdown_signal().await?;
            stack.shutdown().await;
        }
        Command::Provider { addr, script } => {
            let provider = MockProvider::start(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            if let Some(script) = script {
                let script: Script =
                    serde_json::from_str(&script).context("--script is not a valid script")?;
                provider.set_script(script);
            }
            // The line tests and scripts wait for.
            println!("mock provider listening on {}", provider.url());
            shutdown_signal().await?;
            provider.shutdown().await;
        }
    }
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
