//! `ferrite export-hf`: GGUF → Hugging Face directory.

use std::path::PathBuf;

use ferrite_common::text::TextAssets;
use ferrite_worker::export::{ExportDtype, export_hf};
use ferrite_worker::model::open_model;

use super::resolve_model;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF model to export. Default: the cached default model.
    #[arg(long, env = "FERRITE_MODEL")]
    model: Option<PathBuf>,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Element type of the exported weights.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum Dtype {
    F32,
    Bf16,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = resolve_model(a.model)?;
    let files = open_model(&path)?;
    let text = TextAssets::load(&files)?;
    let dtype = match a.dtype {
        Dtype::F32 => ExportDtype::F32,
        Dtype::Bf16 => ExportDtype::Bf16,
    };
    export_hf(&files, &text.tokenizer, &a.out, dtype)?;
    tracing::info!(out = %a.out.display(), "exported");
    Ok(())
}
