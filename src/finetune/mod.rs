//! Stage 3: Conformer-CTC finetuning on cached features, decoding and scoring.
//!
//! `finetune` reads a training and a validation feature store, trains into an experiment
//! directory (config, tokens, stats, checkpoints, logs, plots) and can be resumed exactly;
//! `decode` runs an experiment over a feature store and scores CER/WER.
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod decode;
pub mod layers;
pub mod metrics;
pub mod onthefly;
pub mod optim;
pub mod plots;
pub mod search;
pub mod specaug;
pub mod tokenizer;
pub mod train;

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  speechcache finetune --train feats/train --valid feats/dev \\\n      --config manifests/conf/demo_fbank.toml --out exp/demo\n\n\
EXP receives: config.toml (resolved), experiment.json, tokens.txt, global_stats.json (global\n\
normalisation), checkpoints/{last,epoch_NNNN}.safetensors (+ .json), avg.safetensors,\n\
train_log.jsonl (one line per step), epoch_log.jsonl (valid loss/CER per epoch),\n\
plots/loss.png and plots/layer_weights.png.\n\n\
One run per EXP: a run holds EXP/train.lock (an flock) until it ends, and a second finetune on\n\
the same EXP is refused at once, naming the holder. decode may read EXP meanwhile: every\n\
checkpoint is replaced by one atomic rename. (flock is node-local on NFS mounted nolock and\n\
on Lustre localflock: run each EXP from one node there.)"
)]
pub struct FinetuneArgs {
    /// Training feature store (from `speechcache extract`); its transcripts define the tokens.
    #[arg(long)]
    pub train: PathBuf,
    /// Validation feature store (loss and greedy CER after every epoch).
    #[arg(long)]
    pub valid: PathBuf,
    /// TOML config: [data], [model], [specaug], [optim], [train] (see manifests/conf/).
    #[arg(long)]
    pub config: PathBuf,
    /// Experiment directory to create (or continue with --resume).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the experiment in --out from checkpoints/last (same config and seed).
    #[arg(long)]
    pub resume: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seed for initialisation, batch order, SpecAugment and dropout (overrides train.seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this many optimiser steps in total (a resumable checkpoint is written).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Wall-clock budget of this invocation in minutes (overrides train.max_minutes): the
    /// epoch under way is closed early with validation, checkpoints and averaging; --resume
    /// continues with the next epoch.
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// No progress lines.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Writes hyp.trn/ref.trn (sclite `text (uttid)`), hyp.txt/ref.txt (`uttid text`),\n\
result.txt (CER/WER totals with substitutions/deletions/insertions, then per utterance) and\n\
result.json into --out (default EXP/decode_<store>_<checkpoint>_beam<N>)."
)]
pub struct DecodeArgs {
    /// Experiment directory written by `speechcache finetune`.
    #[arg(long)]
    pub exp: PathBuf,
    /// Feature store to decode (same features and dim as the training store).
    #[arg(long)]
    pub data: PathBuf,
    /// 1 = CTC greedy (best path); N > 1 = CTC prefix beam search with beam N.
    #[arg(long, default_value_t = 1)]
    pub beam: usize,
    /// avg (mean of the n best epochs), last, or an epoch number.
    #[arg(long, default_value = "avg")]
    pub checkpoint: decode::CheckpointChoice,
    /// Output directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, short)]
    pub quiet: bool,
}

/// `--device` (`cpu`, `cuda`, `cuda:N`) → the backend finetune and decode run on: f32, the CPU
/// engine on the CPU (see [`crate::device::Backend`]).
pub fn parse_backend(s: &str) -> anyhow::Result<crate::device::Backend> {
    crate::device::Backend::resolve(s, candle_core::DType::F32)
}

pub fn run_finetune(args: &FinetuneArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let backend = parse_backend(&args.device)?;
    let train_src = data::StoreSource::open(&args.train)?;
    let valid_src = data::StoreSource::open(&args.valid)?;
    let opts = train::TrainOptions {
        config: args.config.clone(),
        out: args.out.clone(),
        resume: args.resume,
        backend,
        seed: args.seed,
        max_steps: args.max_steps,
        max_epochs: None,
        max_minutes: args.max_minutes,
        verbose: !args.quiet,
    };
    let summary = train::train(&opts, &train_src, &valid_src, started)?;
    if !args.quiet {
        eprintln!(
            "finetune: {} steps in this run ({}); first step done {:.3} s after start; experiment in {}",
            summary.steps,
            summary.engine,
            summary.first_step_s,
            args.out.display()
        );
        if summary.steps > 0 {
            eprintln!(
                "finetune: {} train frames in {:.1} s of training loop (validation included): {:.0} train frames/s",
                summary.train_frames,
                summary.train_loop_s,
                summary.train_frames as f64 / summary.train_loop_s.max(1e-9)
            );
        }
    }
    Ok(())
}

pub fn run_decode(args: &DecodeArgs) -> anyhow::Result<()> {
    let backend = parse_backend(&args.device)?;
    let data_src = data::StoreSource::open(&args.data)?;
    let opts = decode::DecodeOptions {
        exp: args.exp.clone(),
        checkpoint: args.checkpoint.clone(),
        beam: args.beam,
        out: args.out.clone(),
        backend,
        verbose: !args.quiet,
    };
    let result = decode::decode(&opts, &data_src)?;
    print!("{}", decode::summary_text(&result));
    println!("written to {}", result.out_dir);
    Ok(())
}
