//! cloud-mock: what the agent runs against on one machine.
//!
//! Layout:
//! - `provider`: scriptable, recording mocks of OpenAI- and Anthropic-shaped providers.
//! - `cp`: the control plane (mutual-TLS data plane, console API, fault injection,
//!   state directory).
//! - `stack`: everything together, as `cloud-mock serve` runs it.

pub mod cp;
pub mod provider;
pub mod stack;
