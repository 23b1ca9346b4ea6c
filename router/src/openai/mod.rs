//! The OpenAI wire format. Only this module knows it (ARCHITECTURE.md invariant).

pub mod error;
pub mod types;
