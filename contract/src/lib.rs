//! contract: the managed-mode wire contract between the agent and a control plane,
//! as serde types with no IO. The agent sends and reads these types; the bundled
//! control plane (cloud-mock) reads and sends the same ones, so a change to the
//! contract breaks compilation on both sides instead of a test at run time.
//! `docs/control-plane.md` is the prose of the same contract.
//!
//! Layout:
//! - `heartbeat`: `POST /dp/heartbeat` and its answer.
//! - `budget`: `GET /dp/budget_check`'s answer.
//! - `telemetry`: `POST /dp/telemetry`: usage events and the answer.
//! - `certificate`: `POST /dp/rotate-cert` and `POST /dp/register` (CSR in, bundle out).
//! - `etcd`: the subset of etcd's v3 JSON API the configuration watcher uses.

pub mod budget;
pub mod certificate;
pub mod etcd;
pub mod heartbeat;
pub mod telemetry;

/// The contract version an agent reports in its heartbeat.
pub const CONTRACT_VERSION: u32 = 1;
