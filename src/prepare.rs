//! Stage 1 (skeleton; the prepare owner fills this in).
use clap::Args;

#[derive(Args, Debug)]
pub struct PrepareArgs {}

pub fn run(_args: &PrepareArgs) -> anyhow::Result<()> {
    anyhow::bail!("prepare is not built yet")
}
