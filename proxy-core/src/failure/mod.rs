//! The one proxy error type, classified once into everything that depends on it.
//!
//! [`ProxyError::class`] is one exhaustive match without a wildcard arm: a new variant
//! does not compile until someone decides its status, envelope type, origin, what
//! routing may do after it, whether it counts against model health, its metric kind,
//! its retry hint and its log level. Routing, health, metrics, logs and the envelopes
//! read that [`Class`]; none of them decides again.
//!
//! Layout:
//! - `class.rs`: [`ProxyError`] and its [`Class`].
//! - `envelope.rs`: the OpenAI and Anthropic envelopes (whole responses and the error
//!   event that ends a stream), pinned byte for byte by golden tests.

mod class;
mod envelope;

pub use class::{
    Class, LogLevel, MAX_RETRY_AFTER_SECS, Origin, ProxyError, Recovery, UpstreamErrorFields,
};
pub use envelope::{
    Envelope, ErrorType, SHOULD_RETRY, anthropic_error_type, json_response, stream_error_event,
};
