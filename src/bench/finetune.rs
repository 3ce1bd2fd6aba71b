//! `speechcache bench finetune` (skeleton; its owner replaces this file).
use clap::Args;

#[derive(Args, Debug)]
pub struct FinetuneBenchArgs {}

pub fn run(_args: &FinetuneBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench finetune is not built yet")
}
