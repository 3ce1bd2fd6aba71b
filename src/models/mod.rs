//! Models: wav2vec 2.0 / HuBERT encoders, checkpoint loading, Kaldi fbank, the Conformer.
//! (Skeleton: the checkpoint owner owns this file and `model-info`.)
use clap::Args;

pub mod checkpoint;
pub mod config;
pub mod conformer;
pub mod fbank;
pub mod wav2vec2;

#[derive(Args, Debug)]
pub struct ModelInfoArgs {}

pub fn run_model_info(_args: &ModelInfoArgs) -> anyhow::Result<()> {
    anyhow::bail!("model-info is not built yet")
}
