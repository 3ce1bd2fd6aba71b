//! The on-disk store (skeleton; the store owner fills this in).
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Store directory.
    pub store: PathBuf,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Store directory.
    pub store: PathBuf,
}

pub fn run_info(_args: &InfoArgs) -> anyhow::Result<()> {
    anyhow::bail!("info is not built yet")
}

pub fn run_verify(_args: &VerifyArgs) -> anyhow::Result<()> {
    anyhow::bail!("verify is not built yet")
}
