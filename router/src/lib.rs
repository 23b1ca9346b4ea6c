//! Ferrite router: the OpenAI-compatible front end.
//!
//! The router owns text: chat templates, tokenization, detokenization and stop strings; workers see token ids only.
//! Built so far: [`text::stop`] (the stop-string jail) and [`openai::error`] (the OpenAI error envelope). The HTTP server, routing and raft follow (ARCHITECTURE.md).
//! The crate also ships the `ferrite` binary (`src/main.rs`, subcommands in `src/commands/`).

pub mod drive;
pub mod handlers;
pub mod openai;
pub mod server;
pub mod text;
pub mod validate;
pub mod workers;
