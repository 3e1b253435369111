//! cloud-mock: what the agent runs against on one machine.
//!
//! It holds the mock LLM providers and the bundled control plane (in progress: the
//! mutual-TLS data-plane listener with the etcd v3 JSON subset, fault knobs and the
//! console API exist; the state directory and `/dp/*` endpoints come next).
//!
//! Layout:
//! - `provider`: a scriptable, recording mock of an OpenAI-shaped provider.
//! - `cp`: the control plane.

pub mod cp;
pub mod provider;
