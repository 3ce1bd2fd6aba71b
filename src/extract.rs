//! Stage 2 (skeleton; its owner replaces this file).
use clap::Args;

#[derive(Args, Debug)]
pub struct ExtractArgs {}

#[derive(Args, Debug)]
pub struct PruneArgs {}

pub fn run(_args: &ExtractArgs) -> anyhow::Result<()> {
    anyhow::bail!("extract is not built yet")
}

pub fn run_prune(_args: &PruneArgs) -> anyhow::Result<()> {
    anyhow::bail!("prune is not built yet")
}
