//! `speechcache bench prepare` (skeleton; its owner replaces this file).
use clap::Args;

#[derive(Args, Debug)]
pub struct PrepareBenchArgs {}

pub fn run(_args: &PrepareBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench prepare is not built yet")
}
