//! Models (skeleton; its owners replace this file).
use clap::Args;

#[derive(Args, Debug)]
pub struct ModelInfoArgs {}

pub fn run_model_info(_args: &ModelInfoArgs) -> anyhow::Result<()> {
    anyhow::bail!("model-info is not built yet")
}
