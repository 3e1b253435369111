//! What the proxy tells about its requests: the request record (access log and request
//! metrics when the answer ends), the metrics registry, and usage accounting.
//!
//! Layout:
//! - `metrics`: every metric the agent serves, declared in one place.
//! - `record`: the facts learned about one request, logged and counted at its end.
//! - `usage`: tokens charged, recorded and reported when a call completes.
//! - `otlp_metrics`: the same metrics pushed over OTLP.
//! - `trace`: OpenTelemetry spans of requests and their upstream attempts, over OTLP.

pub mod metrics;
pub mod otlp_metrics;
pub mod record;
mod span_wire;
pub mod trace;
pub mod usage;
