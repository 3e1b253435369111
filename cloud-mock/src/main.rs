//! `cloud-mock`: run the bundled mock services.

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cloud_mock::provider::{MockProvider, Script};

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
    /// Run a mock OpenAI-shaped provider (script it with PUT /_mock/script).
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
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
            provider.shutdown().await;
        }
    }
    Ok(())
}
