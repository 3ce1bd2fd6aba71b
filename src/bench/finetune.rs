//! `speechcache bench finetune`: launch cost (command start to the first optimiser step) and
//! epoch time of training on a feature store, into a throw-away experiment directory.
use crate::finetune::data::{FeatureSource, StoreSource};
use crate::finetune::train::{self, TrainOptions};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct FinetuneBenchArgs {
    /// Training feature store.
    #[arg(long)]
    pub train: PathBuf,
    /// Validation feature store (default: the training store).
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// Finetune config (TOML), as for `speechcache finetune`.
    #[arg(long)]
    pub config: PathBuf,
    /// Epochs to time (overrides train.max_epochs).
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Stop after this many optimiser steps (to time a part of an epoch on large stores).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Keep the experiment here instead of a temporary directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: &FinetuneBenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let device = crate::finetune::parse_device(&args.device)?;
    let train_src = StoreSource::open(&args.train)?;
    let valid_src = StoreSource::open(args.valid.as_ref().unwrap_or(&args.train))?;
    let scratch =
        std::env::temp_dir().join(format!("speechcache-bench-finetune-{}", std::process::id()));
    let out = args.out.clone().unwrap_or_else(|| scratch.clone());
    let opts = TrainOptions {
        config: args.config.clone(),
        out,
        resume: false,
        device,
        seed: None,
        max_steps: args.max_steps,
        max_epochs: Some(args.epochs),
        verbose: true,
    };
    let summary = train::train(&opts, &train_src, &valid_src, started);
    if args.out.is_none() {
        // the throw-away experiment goes whatever the outcome
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let summary = summary?;
    let audio_s: f64 = (0..train_src.len())
        .map(|i| train_src.frames(i) as f64)
        .sum::<f64>()
        / train_src.frame_rate().max(1e-9);
    println!(
        "bench finetune: {} ({} utterances, {:.2} h of audio)",
        args.train.display(),
        train_src.len(),
        audio_s / 3600.0
    );
    println!(
        "  setup (start -> first batch):          {:8.3} s",
        summary.setup_s
    );
    println!(
        "  launch (start -> first optimizer step): {:8.3} s",
        summary.first_step_s
    );
    for (i, t) in summary.epoch_train_s.iter().enumerate() {
        let v = summary.epoch_valid_s.get(i).copied().unwrap_or(0.0);
        println!(
            "  epoch {}: train {t:8.2} s ({:.1}x real time), valid {v:.2} s",
            i + 1,
            audio_s / t.max(1e-9)
        );
    }
    if summary.stopped_early {
        println!(
            "  (stopped by --max-steps after {} steps: the epoch time is partial)",
            summary.steps
        );
    }
    Ok(())
}
