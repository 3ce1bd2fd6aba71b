//! Stage 3 (skeleton; its owner replaces this file).
use clap::Args;

#[derive(Args, Debug)]
pub struct FinetuneArgs {}

#[derive(Args, Debug)]
pub struct DecodeArgs {}

pub fn run_finetune(_args: &FinetuneArgs) -> anyhow::Result<()> {
    anyhow::bail!("finetune is not built yet")
}

pub fn run_decode(_args: &DecodeArgs) -> anyhow::Result<()> {
    anyhow::bail!("decode is not built yet")
}
