//! `speechcache bench extract` (skeleton; its owner replaces this file).
use clap::Args;

#[derive(Args, Debug)]
pub struct ExtractBenchArgs {}

pub fn run(_args: &ExtractBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench extract is not built yet")
}
