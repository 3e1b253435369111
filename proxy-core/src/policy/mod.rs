//! The policy a request meets before it is dispatched, and the state policies keep
//! between requests.
//!
//! Layout:
//! - `guardrails`: keyword guardrails on input, output and streams.
//! - `ratelimit`: request, token and concurrency limits of keys and models.
//! - `health`: consecutive upstream failures per model.

pub mod guardrails;
pub mod health;
pub mod ratelimit;
