//! Tracing setup: human-readable by default, JSON on request; `RUST_LOG` overrides
//! `observability.log_level`.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, ObservabilitySection};

pub fn init(o: &ObservabilitySection) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&o.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A subscriber may already be set (tests running in-process): keep that one.
    let _ = match o.log_format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
