//! Stage 3: Conformer-CTC finetuning on cached features, decoding and scoring.
//! (Skeleton: the training owner owns this file.)
use clap::Args;

pub mod ctc;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod search;
pub mod tokenizer;

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
