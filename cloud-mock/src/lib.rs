//! cloud-mock: what the agent runs against on one machine.
//!
//! Today it holds the mock LLM providers; the bundled control plane grows here.
//!
//! Layout:
//! - `provider`: a scriptable, recording mock of an OpenAI-shaped provider.

pub mod cp;
pub mod provider;
