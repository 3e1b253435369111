//! The two hooks a deployment plugs into the proxy: budget decisions and usage events.
//! Plain types and traits; the proxy calls them, managed mode implements them.
//!
//! Layout:
//! - `budget`: [`BudgetGate`], its [`Verdict`] and the [`BudgetDenial`] it may carry.
//! - `usage`: [`UsageSink`] and the [`UsageEvent`] it receives.

pub mod budget;
pub mod usage;

pub use budget::{BudgetDenial, BudgetGate, Check, Verdict};
pub use usage::{GuardrailVerdict, UsageEvent, UsageSink};
