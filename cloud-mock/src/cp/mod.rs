//! The bundled control plane: the server side of the managed-mode contract
//! (`../shared/design/CONTROL_PLANE.md`), with a console API and fault injection.
//!
//! Layout:
//! - `kv`: the revisioned key-value store behind the etcd v3 JSON subset.

pub mod kv;
