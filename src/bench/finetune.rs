//! `speechcache bench finetune`: launch cost (command start to the first optimiser step) and
//! epoch time of training on a feature store, into a throw-away experiment directory.
use crate::finetune::data::{FeatureSource, StoreSource};
use crate::finetune::onthefly::OnTheFlySource;
use crate::finetune::train::{self, TrainOptions, TrainSummary};
use crate::ops::profile::Kind;
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
    /// Also time training with features computed on the fly by this frozen wav2vec2/HuBERT
    /// checkpoint (as s3prl does) from --train-audio, for a cached vs on-the-fly comparison.
    #[arg(long, requires = "train_audio")]
    pub ssl_model: Option<PathBuf>,
    /// The audio store the --train feature store was extracted from.
    #[arg(long, requires = "ssl_model")]
    pub train_audio: Option<PathBuf>,
}

pub fn run(args: &FinetuneBenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let backend = crate::finetune::parse_backend(&args.device)?;
    let train_src = StoreSource::open(&args.train)?;
    let valid_src = StoreSource::open(args.valid.as_ref().unwrap_or(&args.train))?;
    let cached = time_training(args, &train_src, &valid_src, &backend, started, "cached")?;
    report(args, "cached features", &train_src, &cached);
    if let (Some(model), Some(audio)) = (&args.ssl_model, &args.train_audio) {
        let started = Instant::now();
        let otf = OnTheFlySource::open(audio, model, &backend)?;
        let summary = time_training(args, &otf, &valid_src, &backend, started, "onthefly")?;
        report(
            args,
            "on-the-fly features (frozen SSL model in every step)",
            &otf,
            &summary,
        );
        if let (Some(a), Some(b)) = (cached.epoch_train_s.first(), summary.epoch_train_s.first()) {
            println!("  on-the-fly / cached epoch time: {:.1}x", b / a.max(1e-9));
        }
    }
    Ok(())
}

fn time_training(
    args: &FinetuneBenchArgs,
    train_src: &dyn FeatureSource,
    valid_src: &dyn FeatureSource,
    backend: &crate::device::Backend,
    started: Instant,
    tag: &str,
) -> anyhow::Result<TrainSummary> {
    let scratch = std::env::temp_dir().join(format!(
        "speechcache-bench-finetune-{}-{tag}",
        std::process::id()
    ));
    let out = match &args.out {
        Some(p) => p.join(tag),
        None => scratch.clone(),
    };
    let opts = TrainOptions {
        config: args.config.clone(),
        out,
        resume: false,
        backend: backend.clone(),
        seed: None,
        max_steps: args.max_steps,
        max_epochs: Some(args.epochs),
        max_minutes: None,
        verbose: true,
    };
    let summary = train::train(&opts, train_src, valid_src, started);
    if args.out.is_none() {
        // the throw-away experiment goes whatever the outcome
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(summary?)
}

fn report(args: &FinetuneBenchArgs, what: &str, src: &dyn FeatureSource, summary: &TrainSummary) {
    let audio_s: f64 =
        (0..src.len()).map(|i| src.frames(i) as f64).sum::<f64>() / src.frame_rate().max(1e-9);
    println!(
        "bench finetune, {what}: {} ({} utterances, {:.2} h of audio)",
        src.path().display(),
        src.len(),
        audio_s / 3600.0
    );
    println!(
        "  setup (start -> first batch):           {:8.3} s",
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
    print_profile(summary);
    if summary.stopped_early {
        println!(
            "  (stopped by --max-steps after {} steps: the epoch time covers those steps only)",
            summary.steps
        );
    }
    let _ = args;
}

/// Forward and backward seconds per step by op kind, so the next bottleneck is visible.
fn print_profile(summary: &TrainSummary) {
    let (p, steps) = (&summary.profile, summary.steps);
    if steps == 0 {
        return;
    }
    let per = |v: f64| 1000.0 * v / steps as f64;
    println!(
        "  time per optimizer step by op kind ({steps} steps, {}), ms:",
        summary.engine
    );
    println!("    {:<14} {:>9} {:>9}", "op", "forward", "backward");
    for (kind, f, b) in p.rows() {
        // the trainer records its optimiser update as `Other`
        let name = if kind == Kind::Other {
            "optimizer"
        } else {
            kind.name()
        };
        println!("    {name:<14} {:>9.1} {:>9.1}", per(f), per(b));
    }
    println!(
        "    {:<14} {:>9.1}",
        "total",
        per(p.forward_total() + p.backward_total())
    );
}
