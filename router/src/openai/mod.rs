//! The OpenAI wire format. Only this module knows it (ARCHITECTURE.md invariant).

pub mod constraint;
pub mod error;
pub mod fields;
pub mod tools;
pub mod types;
