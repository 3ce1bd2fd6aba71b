//! The training loop: experiment setup, epochs of length-bucketed batches, gradient
//! accumulation, clipping, warmup schedule, validation, checkpoints, logs and plots.
//!
//! Reproducibility: every random draw (initialisation, batch order, SpecAugment) comes from a
//! ChaCha8 stream seeded by (seed, what, epoch, batch), never from global state, so a run
//! stopped anywhere and resumed from `checkpoints/last` writes the same checkpoints as an
//! uninterrupted run. (Model dropout uses candle's unseedable RNG: set dropout to 0 where
//! bit-exact reruns matter.)
use crate::device::{Backend, Executor};
use crate::finetune::checkpoint::{
    self, avg_path, epoch_path, last_path, AverageMeta, CheckpointError, CheckpointMeta,
    EpochResult, SeededVars, RNG_SCHEME,
};
use crate::finetune::config::{warmup_lr, ConfigError, FinetuneConfig};
use crate::finetune::data::{
    make_batches, mix_seed, DataError, FeatureSource, GlobalStats, Targets,
};
use crate::finetune::layers::{LayerWeights, LAYER_WEIGHTS};
use crate::finetune::metrics::{self, ErrorCounts};
use crate::finetune::optim::{clip_by_global_norm, Adam, GradAccumulator, NamedVars};
use crate::finetune::plots;
use crate::finetune::search;
use crate::finetune::specaug;
use crate::finetune::tokenizer::Tokenizer;
use crate::models::asr::cpu::{CpuEngine, Params};
use crate::models::asr::{AsrModel, FeatureNormalize};
use crate::ops::ctc::ctc_loss;
use crate::ops::profile::{Kind, Pass, Profile, Profiler};
use crate::ops::RUNNING_STAT_NAMES;
use crate::store::{Holder, HolderLock, LockRefusal};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Plot(#[from] plots::PlotError),
    #[error("{path}: {reason}")]
    Experiment { path: PathBuf, reason: String },
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    #[error("model: {0}")]
    Conformer(#[from] crate::models::asr::conformer::ConformerError),
    #[error(transparent)]
    Tokenizer(#[from] crate::finetune::tokenizer::TokenizerError),
}

fn exp_err(path: &Path, reason: impl std::fmt::Display) -> TrainError {
    TrainError::Experiment {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// What an experiment was trained on (`EXP/experiment.json`); decode checks stores against it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentMeta {
    pub format_version: u32,
    pub tool: String,
    pub feat_dim: usize,
    /// Hidden-state numbers fed to the model, in order.
    pub layers: Vec<usize>,
    pub frame_rate: f64,
    pub vocab_size: usize,
    pub normalize: FeatureNormalize,
    pub seed: u64,
    pub train_store: String,
}

/// An experiment directory: config, tokenizer, normalisation stats and what it was trained on.
pub struct Experiment {
    pub dir: PathBuf,
    pub config: FinetuneConfig,
    pub meta: ExperimentMeta,
    pub tokenizer: Tokenizer,
    pub stats: Option<GlobalStats>,
}

pub const CONFIG_FILE: &str = "config.toml";
pub const META_FILE: &str = "experiment.json";
pub const TOKENS_FILE: &str = "tokens.txt";
pub const STATS_FILE: &str = "global_stats.json";
pub const TRAIN_LOG: &str = "train_log.jsonl";
pub const EPOCH_LOG: &str = "epoch_log.jsonl";

impl Experiment {
    /// Open a trained (or training) experiment directory.
    pub fn load(dir: &Path) -> Result<Self, TrainError> {
        let meta_path = dir.join(META_FILE);
        if !meta_path.is_file() {
            return Err(exp_err(dir, "not an experiment directory (no experiment.json); run `speechcache finetune --out` first"));
        }
        let meta: ExperimentMeta = read_json(&meta_path)?;
        let config = FinetuneConfig::load(&dir.join(CONFIG_FILE))?;
        let tok_path = dir.join(TOKENS_FILE);
        let tokenizer = Tokenizer::load(&tok_path)?;
        let stats = if meta.normalize == FeatureNormalize::Global {
            Some(read_json(&dir.join(STATS_FILE))?)
        } else {
            None
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            meta,
            tokenizer,
            stats,
        })
    }

    /// Build the model with seeded initial values (and the global stats when normalising
    /// globally). Returns it with all its vars (what a checkpoint holds, batch-norm running
    /// statistics included), sorted by name.
    pub fn build_model(&self, device: &Device) -> Result<(AsrModel, NamedVars), TrainError> {
        let vars = SeededVars::new(mix_seed(self.meta.seed, &[0x1A17]));
        let vb = VarBuilder::from_backend(Box::new(vars.clone()), DType::F32, device.clone());
        let mut model = AsrModel::new(
            vb,
            &self.config.model,
            self.meta.layers.len(),
            self.meta.feat_dim,
            self.meta.vocab_size,
        )?;
        if let Some(stats) = &self.stats {
            let (mean, std) = stats.to_tensors(device)?;
            model.set_global_stats(&mean, &std)?;
        }
        Ok((model, vars.named_vars()))
    }

    /// Shortest input the model's subsampling accepts.
    pub fn min_frames(&self) -> usize {
        self.config.model.encoder.input_layer.min_input_length()
    }

    /// Refuse a store whose features do not fit this experiment.
    pub fn check_source(&self, src: &dyn FeatureSource) -> Result<(), TrainError> {
        if src.dim() != self.meta.feat_dim {
            return Err(exp_err(
                src.path(),
                format!(
                    "features have dim {}, but experiment {} was trained on dim {} (use a store made with the same model/fbank options)",
                    src.dim(),
                    self.dir.display(),
                    self.meta.feat_dim
                ),
            ));
        }
        check_layers(src, &self.meta.layers)
    }
}

fn check_layers(src: &dyn FeatureSource, layers: &[usize]) -> Result<(), TrainError> {
    let missing: Vec<usize> = layers
        .iter()
        .copied()
        .filter(|l| !src.layers().contains(l))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(exp_err(
            src.path(),
            format!(
                "layers {missing:?} are needed but the store holds only {:?}",
                src.layers()
            ),
        ))
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| exp_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| exp_err(path, e))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| exp_err(path, e))?;
    checkpoint::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// The lock file of an experiment directory; present only while a run holds it.
pub const LOCK_FILE: &str = "train.lock";

/// One training run per experiment: an exclusive `flock` on `EXP/train.lock`, held for the
/// whole `finetune` run (`store::HolderLock`, as the store writer lock). The kernel drops it
/// when the process dies, so a `kill -9` never leaves a stale lock; the file names the holder.
#[derive(Debug)]
pub struct ExperimentLock {
    _lock: HolderLock,
}

impl ExperimentLock {
    /// Creates `dir` if needed and takes its lock, or refuses at once naming the holder.
    pub fn acquire(dir: &Path) -> Result<Self, TrainError> {
        if dir.exists() && !dir.is_dir() {
            return Err(exp_err(dir, "exists and is not a directory"));
        }
        std::fs::create_dir_all(dir).map_err(|e| exp_err(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        match HolderLock::try_acquire(&path, &command) {
            Ok(lock) => Ok(ExperimentLock { _lock: lock }),
            Err(LockRefusal::Held(holder)) => Err(exp_err(
                dir,
                format!(
                    "is being trained by {}; one run per experiment: wait for it to \
                     finish (or stop it), then --resume",
                    describe_holder(holder.as_ref())
                ),
            )),
            Err(LockRefusal::Io(e)) if e.kind() == std::io::ErrorKind::InvalidInput => Err(exp_err(
                &path,
                "is a symbolic link or not a regular file; the experiment lock is never followed \
                 through a link (remove it if nothing is training here)",
            )),
            Err(LockRefusal::Io(e)) => Err(exp_err(&path, e)),
        }
    }

    /// Who is training in `dir` now, if anyone (`decode` notes it). A lock file that cannot
    /// be opened (a planted symlink, no permission) holds no run that `decode` must know of.
    pub fn holder(dir: &Path) -> Option<String> {
        HolderLock::holder(&dir.join(LOCK_FILE)).map(|h| describe_holder(h.as_ref()))
    }
}

/// `` `COMMAND` (pid N on host H) `` for the refusal and decode's note.
fn describe_holder(holder: Option<&Holder>) -> String {
    match holder {
        Some(h) => format!("`{}` (pid {} on host {})", h.command.trim(), h.pid, h.host),
        None => Holder::describe(None),
    }
}

/// The CPU engine for `model` when the backend runs it (f32 on the CPU) and the model is one it
/// runs; `None` means candle tensor ops (with autograd for training), and `say` is told why.
/// Training, validation and decode all take their executor from here.
pub(crate) fn asr_engine(
    model: &AsrModel,
    backend: &Backend,
    all_vars: &NamedVars,
    trainable: &NamedVars,
    say: impl Fn(String),
) -> Result<Option<CpuEngine>, TrainError> {
    if !backend.uses_cpu_engine() {
        return Ok(None);
    }
    match CpuEngine::unsupported_reason(model) {
        None => Ok(Some(CpuEngine::new(model, all_vars, trainable)?)),
        Some(reason) => {
            say(format!("running on candle tensor ops: {reason}"));
            Ok(None)
        }
    }
}

/// Eval-mode logits `[B, T', vocab]` and output lengths of one batch, on the CPU engine when
/// there is one (with `params` read once per pass), else on the candle model: validation and
/// decode run the same code.
pub(crate) fn eval_logits(
    model: &AsrModel,
    engine: Option<(&CpuEngine, &Params)>,
    feats: &candle_core::Tensor,
    lengths: &[usize],
) -> Result<(candle_core::Tensor, Vec<usize>), TrainError> {
    Ok(match engine {
        Some((engine, params)) => engine.forward_eval(params, feats, lengths)?,
        None => model.forward(feats, lengths, false)?,
    })
}

/// Everything `finetune` needs besides the data sources.
pub struct TrainOptions {
    pub config: PathBuf,
    pub out: PathBuf,
    pub resume: bool,
    /// Device and executor (the CPU engine or candle autograd), resolved at the CLI.
    pub backend: Backend,
    /// Overrides `train.seed`.
    pub seed: Option<u64>,
    /// Stop (with a resumable checkpoint) once this many optimiser steps are done in total.
    pub max_steps: Option<u64>,
    /// Overrides `train.max_epochs` (the benchmark trains one epoch).
    pub max_epochs: Option<usize>,
    /// Overrides `train.max_minutes`.
    pub max_minutes: Option<f64>,
    /// Print progress lines on stderr.
    pub verbose: bool,
}

/// Timings of a run, for the log and `bench finetune`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrainSummary {
    /// Command start to the start of the first batch (opening stores, tokenizer, model).
    pub setup_s: f64,
    /// Command start to the end of the first optimiser step.
    pub first_step_s: f64,
    /// Wall time of each epoch trained in this invocation (training part, then validation).
    pub epoch_train_s: Vec<f64>,
    pub epoch_valid_s: Vec<f64>,
    pub steps: u64,
    pub final_epoch: usize,
    pub stopped_early: bool,
    /// Stopped by `max_minutes`.
    pub out_of_time: bool,
    /// Input frames of this invocation's optimiser steps, and seconds of its training loop
    /// (first batch to the end, per-epoch validation and checkpoints included): their ratio
    /// is the training throughput as the PyTorch baselines report it.
    pub train_frames: usize,
    pub train_loop_s: f64,
    /// Time per op kind of this invocation's steps (the CPU engine's; candle's autograd
    /// reports data (`Kind::Data`) and optimiser (`Kind::Other`) time only).
    pub profile: Profile,
    /// Which compute path trained: "cpu-engine" or "candle".
    pub engine: String,
}

/// One line of `train_log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepLog {
    pub step: u64,
    pub epoch: usize,
    pub loss: f64,
    pub ctc_loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub utts: usize,
    pub frames: usize,
    pub frames_per_s: f64,
    pub elapsed_s: f64,
    /// Seconds of this step spent reading batches (+ SpecAugment), in forward + CTC, in
    /// backward, and in clipping + the optimiser update.
    #[serde(default)]
    pub data_s: f64,
    #[serde(default)]
    pub forward_s: f64,
    #[serde(default)]
    pub backward_s: f64,
    #[serde(default)]
    pub update_s: f64,
}

/// Resolve the config (CLI overrides, store layers) and create or reopen the experiment.
fn prepare_experiment(
    opts: &TrainOptions,
    train: &dyn FeatureSource,
) -> Result<(Experiment, Option<CheckpointMeta>, ExperimentLock), TrainError> {
    let mut config = FinetuneConfig::load(&opts.config)?;
    if let Some(seed) = opts.seed {
        config.train.seed = seed;
    }
    if let Some(e) = opts.max_epochs {
        config.train.max_epochs = e;
    }
    if let Some(m) = opts.max_minutes {
        config.train.max_minutes = Some(m);
        config.validate(&opts.config)?;
    }
    let layers = match &config.data.layers {
        Some(l) if !l.is_empty() => l.clone(),
        _ => train.layers().to_vec(),
    };
    check_layers(train, &layers)?;
    config.data.layers = Some(layers.clone());
    let dir = &opts.out;
    // taken before the experiment is read, and held until the run ends
    let lock = ExperimentLock::acquire(dir)?;
    let last = last_path(dir);
    if dir.join(META_FILE).is_file() {
        if !opts.resume {
            return Err(exp_err(dir, "already holds an experiment; pass --resume to continue it, or choose another --out"));
        }
        let mut exp = Experiment::load(dir)?;
        if opts.seed.is_none() {
            config.train.seed = exp.config.train.seed;
        }
        // more epochs and another log interval are fine; anything else changes the run
        let mut same = config.clone();
        same.train.max_epochs = exp.config.train.max_epochs;
        same.train.log_every = exp.config.train.log_every;
        same.train.max_minutes = exp.config.train.max_minutes;
        if exp.config != same {
            return Err(exp_err(
                &opts.config,
                format!(
                    "differs from the experiment's {} (beyond train.max_epochs/log_every/max_minutes); \
                     resuming needs the same config and seed",
                    dir.join(CONFIG_FILE).display()
                ),
            ));
        }
        if exp.config != config {
            exp.config = config;
            let text = exp.config.to_toml()?;
            checkpoint::write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?;
        }
        exp.check_source(train)?;
        let ckpt = if last.is_file() {
            if checkpoint::repair_sidecar(&last)? && opts.verbose {
                eprintln!(
                    "finetune: {} did not describe {} (a run killed while saving); \
                     rewritten from the checkpoint",
                    checkpoint::sidecar(&last).display(),
                    last.display()
                );
            }
            Some(checkpoint::load_meta::<CheckpointMeta>(&last)?)
        } else {
            None
        };
        return Ok((exp, ckpt, lock));
    }
    if opts.resume && opts.verbose {
        eprintln!(
            "finetune: {} has no experiment yet; starting from scratch",
            dir.display()
        );
    }
    let texts = (0..train.len()).filter_map(|i| train.text(i));
    let tokenizer = Tokenizer::build(texts);
    let normalize = config.model.featurizer.normalize;
    let stats = if normalize == FeatureNormalize::Global {
        let s = GlobalStats::from_source(train, &layers)?;
        write_json(&dir.join(STATS_FILE), &s)?;
        Some(s)
    } else {
        None
    };
    let tok_path = dir.join(TOKENS_FILE);
    tokenizer.save(&tok_path)?;
    let text = config.to_toml()?;
    checkpoint::write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?;
    let meta = ExperimentMeta {
        format_version: 1,
        tool: format!("speechcache {}", env!("CARGO_PKG_VERSION")),
        feat_dim: train.dim(),
        layers,
        frame_rate: train.frame_rate(),
        vocab_size: tokenizer.len(),
        normalize,
        seed: config.train.seed,
        train_store: train.path().display().to_string(),
    };
    // experiment.json last: its presence marks a complete setup
    write_json(&dir.join(META_FILE), &meta)?;
    Ok((
        Experiment {
            dir: dir.to_path_buf(),
            config,
            meta,
            tokenizer,
            stats,
        },
        None,
        lock,
    ))
}

/// Train (or resume) an experiment on `train`, validating on `valid` after every epoch.
///
/// The whole run executes on the threads of one rayon pool (`RAYON_NUM_THREADS`, default all
/// cores): the step's serial parts run on a pool thread instead of the calling thread, so the
/// process never has more busy threads than cores (a caller thread plus spinning workers
/// made three threads fight over two cores).
pub fn train(
    opts: &TrainOptions,
    train: &dyn FeatureSource,
    valid: &dyn FeatureSource,
    started: Instant,
) -> Result<TrainSummary, TrainError> {
    crate::ops::gemm::reserve_freed_memory();
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("speechcache-train-{i}"))
        .build()
        .map_err(|e| TrainError::Model(candle_core::Error::Msg(format!("thread pool: {e}"))))?;
    pool.install(|| train_on_pool(opts, train, valid, started))
}

fn train_on_pool(
    opts: &TrainOptions,
    train: &dyn FeatureSource,
    valid: &dyn FeatureSource,
    started: Instant,
) -> Result<TrainSummary, TrainError> {
    check_inputs(train, valid)?;
    let (exp, resume_from, _lock) = prepare_experiment(opts, train)?;
    exp.check_source(valid)?;
    let cfg = &exp.config;
    let dev = opts.backend.device();
    let say = |msg: String| {
        if opts.verbose {
            eprintln!("finetune: {msg}");
        }
    };

    let train_t = Targets::encode(
        train,
        &exp.tokenizer,
        exp.min_frames(),
        cfg.train.max_frames,
    )?;
    let valid_t = Targets::encode(valid, &exp.tokenizer, exp.min_frames(), 0)?;
    say(format!(
        "train {}: {}",
        train.path().display(),
        train_t.summary()
    ));
    say(format!(
        "valid {}: {}",
        valid.path().display(),
        valid_t.summary()
    ));

    let (model, all_vars) = exp.build_model(dev)?;
    let vars = trainable(&all_vars);
    let engine = asr_engine(&model, &opts.backend, &all_vars, &vars, say)?;
    let mut opt = Adam::new(
        vars.clone(),
        &cfg.optim,
        if engine.is_some() {
            Executor::CpuEngine
        } else {
            Executor::TensorOps
        },
    )?;
    let n_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    say(format!(
        "model: {} parameters in {} tensors; vocabulary {}; layers {:?}",
        n_params,
        vars.len(),
        exp.meta.vocab_size,
        exp.meta.layers
    ));

    let mut history: Vec<EpochResult> = Vec::new();
    let (mut epoch, mut skip) = (1usize, 0usize);
    let mut resumed_loss = (0f64, 0usize);
    if let Some(meta) = &resume_from {
        let last = last_path(&exp.dir);
        let tensors = checkpoint::load_tensors(&last, dev)?;
        checkpoint::assign(&all_vars, &tensors, &last)?;
        opt.load_state(&tensors)?;
        history = meta.history.clone();
        (epoch, skip) = if meta.epoch_complete {
            (meta.epoch + 1, 0)
        } else {
            resumed_loss = (meta.epoch_loss_sum, meta.epoch_utts);
            (meta.epoch, meta.batches_done)
        };
        truncate_log(&exp.dir.join(TRAIN_LOG), |l: &StepLog| l.step <= meta.step)?;
        write_epoch_log(&exp.dir, &history)?;
        if meta.epoch_complete && !average_is_current(&exp, &history) {
            say("finishing the last epoch's n-best pruning and average (a run stopped before it was done)".into());
            keep_nbest_and_average(&exp, &history, dev)?;
        }
        say(format!(
            "resuming at epoch {epoch}, batch {skip}, step {}",
            meta.step
        ));
    }

    if resume_from.is_none() {
        // a fresh start (also after a crash before the first checkpoint): no stale lines
        truncate_log(&exp.dir.join(TRAIN_LOG), |_: &StepLog| false)?;
        write_epoch_log(&exp.dir, &history)?;
    }
    let mut log = open_append(&exp.dir.join(TRAIN_LOG))?;
    let mut summary = TrainSummary::default();
    let seed = exp.meta.seed;
    let train_frames: Vec<usize> = (0..train.len()).map(|i| train.frames(i)).collect();
    let accum = cfg.optim.accum_grad;
    summary.engine = if engine.is_some() {
        "cpu-engine"
    } else {
        "candle"
    }
    .to_string();
    let mut step = Stepper {
        exp: &exp,
        model: &model,
        engine: engine.as_ref(),
        vars: &vars,
        opt,
        source: train,
        targets: &train_t,
        device: dev,
        checked_grads: false,
        profile: Profiler::enabled(),
    };
    summary.setup_s = started.elapsed().as_secs_f64();
    say(format!("setup took {:.3} s", summary.setup_s));

    if opts.max_steps.is_some_and(|m| step.opt.step_count() >= m) {
        say(format!(
            "already at step {} (--max-steps): nothing to do",
            step.opt.step_count()
        ));
        return Ok(summary);
    }
    if epoch > cfg.train.max_epochs {
        say(format!(
            "all {} epochs are done: nothing to do",
            cfg.train.max_epochs
        ));
    }
    let budget = cfg
        .train
        .max_minutes
        .map(|m| Duration::from_secs_f64(m * 60.0));
    while epoch <= cfg.train.max_epochs {
        let shuffle = cfg.train.shuffle.then_some((seed, epoch));
        let batches = make_batches(
            &train_frames,
            &train_t.items,
            cfg.train.batch_frames,
            shuffle,
        );
        let epoch_start = Instant::now();
        let (mut loss_sum, mut loss_utts) = std::mem::take(&mut resumed_loss);
        let mut bi = skip;
        skip = 0;
        let mut stopped = false;
        let mut out_of_time = false;
        while bi < batches.len() {
            let group_end = (bi + accum).min(batches.len());
            let entry = step.run(epoch, &batches, bi..group_end, started)?;
            bi = group_end;
            if summary.steps == 0 {
                summary.first_step_s = started.elapsed().as_secs_f64();
                say(format!(
                    "first optimizer step done {:.3} s after start (data {:.3} s, forward {:.3} s, backward {:.3} s, update {:.3} s)",
                    summary.first_step_s, entry.data_s, entry.forward_s, entry.backward_s, entry.update_s
                ));
            }
            if !entry.grad_norm.is_finite() {
                say(format!(
                    "step {}: gradient norm is not finite; update skipped",
                    entry.step
                ));
            }
            loss_sum += entry.loss * entry.utts as f64;
            loss_utts += entry.utts;
            summary.train_frames += entry.frames;
            let (step_no, mean_loss, lr, norm) =
                (entry.step, entry.loss, entry.lr, entry.grad_norm);
            write_line(&mut log, &exp.dir.join(TRAIN_LOG), &entry)?;
            summary.steps += 1;
            if step_no % cfg.train.log_every as u64 == 0 {
                say(format!(
                    "epoch {epoch} batch {bi}/{} step {step_no}: loss {mean_loss:.3} lr {lr:.3e} |grad| {norm:.3} {:.0} frames/s ({:.1} s{})",
                    batches.len(),
                    entry.frames_per_s,
                    entry.elapsed_s,
                    resident_mb().map(|m| format!(", {m:.0} MB resident")).unwrap_or_default()
                ));
            }
            if opts.max_steps.is_some_and(|m| step_no >= m) && bi < batches.len() {
                stopped = true;
                break;
            }
            if budget.is_some_and(|b| started.elapsed() >= b) {
                out_of_time = true;
                break;
            }
        }
        summary
            .epoch_train_s
            .push(epoch_start.elapsed().as_secs_f64());
        if stopped {
            let meta = CheckpointMeta {
                epoch,
                batches_done: bi,
                epoch_complete: false,
                step: step.opt.step_count(),
                seed,
                rng: RNG_SCHEME.into(),
                history: history.clone(),
                epoch_loss_sum: loss_sum,
                epoch_utts: loss_utts,
            };
            save_last(&exp.dir, &all_vars, &step.opt, &meta)?;
            write_layer_weights(&exp, &model)?;
            say(format!(
                "stopped at step {} (--max-steps), epoch {epoch} batch {bi}/{}; continue with --resume",
                step.opt.step_count(),
                batches.len()
            ));
            summary.stopped_early = true;
            summary.final_epoch = epoch;
            summary.profile = step.profile.profile();
            summary.train_loop_s = started.elapsed().as_secs_f64() - summary.setup_s;
            return Ok(summary);
        }
        let valid_start = Instant::now();
        if out_of_time {
            say(format!(
                "time budget of {} min reached after step {} ({:.1} min since launch): closing epoch {epoch} after {bi} of {} batches",
                cfg.train.max_minutes.unwrap_or(0.0),
                step.opt.step_count(),
                started.elapsed().as_secs_f64() / 60.0,
                batches.len()
            ));
        }
        let (valid_loss, valid_cer) =
            validate(&exp, &model, engine.as_ref(), valid, &valid_t, dev)?;
        summary
            .epoch_valid_s
            .push(valid_start.elapsed().as_secs_f64());
        let result = EpochResult {
            epoch,
            step: step.opt.step_count(),
            train_loss: loss_sum / loss_utts.max(1) as f64,
            valid_loss,
            valid_cer,
            valid_utts: valid_t.items.len(),
        };
        say(format!(
            "epoch {epoch} done: train loss {:.3}, valid loss {valid_loss:.3}, valid CER {:.2}% ({:.1} s train, {:.1} s valid)",
            result.train_loss,
            100.0 * valid_cer,
            summary.epoch_train_s.last().copied().unwrap_or(0.0),
            summary.epoch_valid_s.last().copied().unwrap_or(0.0)
        ));
        history.push(result.clone());
        end_of_epoch(
            &exp,
            &all_vars,
            &step.opt,
            &history,
            &model,
            epoch,
            batches.len(),
            dev,
        )?;
        write_epoch_log(&exp.dir, &history)?;
        summary.final_epoch = epoch;
        if out_of_time || budget.is_some_and(|b| started.elapsed() >= b) {
            summary.stopped_early = epoch < cfg.train.max_epochs;
            summary.out_of_time = true;
            say(format!(
                "stopped for the time budget after epoch {epoch} (step {}); --resume continues with epoch {}",
                step.opt.step_count(),
                epoch + 1
            ));
            break;
        }
        if opts.max_steps.is_some_and(|m| step.opt.step_count() >= m) {
            summary.stopped_early = epoch < cfg.train.max_epochs;
            say(format!(
                "stopped at step {} (--max-steps) after epoch {epoch}",
                step.opt.step_count()
            ));
            break;
        }
        epoch += 1;
    }
    summary.profile = step.profile.profile();
    summary.train_loop_s = started.elapsed().as_secs_f64() - summary.setup_s;
    Ok(summary)
}

/// One optimiser step: `accum_grad` batches of forward/backward, then clip and update.
struct Stepper<'a> {
    exp: &'a Experiment,
    model: &'a AsrModel,
    engine: Option<&'a CpuEngine>,
    /// Time per op kind, summed over steps.
    profile: Profiler,
    vars: &'a NamedVars,
    opt: Adam,
    source: &'a dyn FeatureSource,
    targets: &'a Targets,
    device: &'a Device,
    checked_grads: bool,
}

impl Stepper<'_> {
    /// Run batches `range` of this epoch's `batches` as one optimiser step; its log line.
    fn run(
        &mut self,
        epoch: usize,
        batches: &[Vec<usize>],
        range: std::ops::Range<usize>,
        started: Instant,
    ) -> Result<StepLog, TrainError> {
        let (exp, cfg, seed) = (self.exp, &self.exp.config, self.exp.meta.seed);
        let step_start = Instant::now();
        let mut acc = GradAccumulator::new(self.vars.len());
        // seconds in: reading + SpecAugment, forward + loss, backward, clip + update
        let mut timing = [0f64; 4];
        let (mut loss_sum, mut utts, mut frames) = (0f64, 0usize, 0usize);
        let group = range.len() as f64;
        for b in range {
            let items = &batches[b];
            // every random draw of this batch comes from (seed, epoch, batch)
            let mut rng =
                ChaCha8Rng::seed_from_u64(mix_seed(seed, &[0x5BEC, epoch as u64, b as u64]));
            self.model
                .seed_dropout(mix_seed(seed, &[0xD80F, epoch as u64, b as u64]))?;
            let t0 = Instant::now();
            let (feats, lens) = self.source.batch(items, &exp.meta.layers, self.device)?;
            let feats = specaug::apply(&cfg.specaug, &feats, &lens, &mut rng)?;
            let feats = match self.engine {
                Some(_) => feats,
                None => pad_time_for_conv2d_backward(exp, &feats)?,
            };
            let targets: Vec<Vec<u32>> = items
                .iter()
                .map(|&i| self.targets.tokens[i].clone())
                .collect();
            let t1 = Instant::now();
            let n = items.len() as f64;
            let (loss_value, t2) = match self.engine {
                Some(engine) => {
                    let scale = 1.0 / (n * group);
                    let prof = &mut self.profile;
                    let out = engine.train_step_profiled(&feats, &lens, &targets, scale, prof)?;
                    let t2 = t1 + Duration::from_secs_f64(out.forward_s);
                    acc.add_tensors(&out.grads)?;
                    (out.losses.iter().sum::<f64>() / n, t2)
                }
                None => {
                    let per_utt = utterance_losses(self.model, &feats, &lens, &targets, true)?;
                    let mean = (per_utt.sum_all()? / n)?;
                    let loss_value = mean.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    let t2 = Instant::now();
                    let grads = (mean / group)?.backward()?;
                    acc.add(self.vars, &grads)?;
                    (loss_value, t2)
                }
            };
            timing[0] += (t1 - t0).as_secs_f64();
            timing[1] += (t2 - t1).as_secs_f64();
            timing[2] += t2.elapsed().as_secs_f64();
            loss_sum += loss_value * n;
            utts += items.len();
            frames += lens.iter().sum::<usize>();
        }
        if !self.checked_grads {
            let missing = acc.missing(self.vars);
            if !missing.is_empty() {
                return Err(exp_err(&exp.dir, format!(
                    "these trainable parameters got no gradient in the first step (a no-backward op cuts the graph): {}",
                    missing.join(", ")
                )));
            }
            self.checked_grads = true;
        }
        let t_update = Instant::now();
        let mut grads = acc.take(self.vars)?;
        let lr = warmup_lr(
            cfg.optim.lr,
            cfg.optim.warmup_steps,
            self.opt.step_count() + 1,
        );
        let norm = clip_by_global_norm(&mut grads, cfg.optim.grad_clip)?;
        if norm.is_finite() {
            self.opt.step(&grads, lr)?;
        } else {
            // as ESPnet: a non-finite gradient skips the update (the step count still moves
            // so the schedule and the log stay aligned)
            self.opt.skip_step();
        }
        timing[3] = t_update.elapsed().as_secs_f64();
        self.profile.set_pass(Pass::Forward);
        self.profile.record(Kind::Data, timing[0]);
        self.profile.record(Kind::Other, timing[3]);
        let loss = loss_sum / utts.max(1) as f64;
        Ok(StepLog {
            step: self.opt.step_count(),
            epoch,
            loss,
            ctc_loss: loss,
            lr,
            grad_norm: norm,
            utts,
            frames,
            frames_per_s: frames as f64 / step_start.elapsed().as_secs_f64().max(1e-9),
            elapsed_s: started.elapsed().as_secs_f64(),
            data_s: timing[0],
            forward_s: timing[1],
            backward_s: timing[2],
            update_s: timing[3],
        })
    }
}

/// Work around candle 0.11's conv2d backward, which derives the transposed convolution's
/// output padding from the height (time) only and applies it to the width (features) too:
/// when `(T - 3) % 2 != (D - 3) % 2` at a stride-2 conv, backward fails with a shape mismatch.
/// Zero frames appended past every utterance (T ≡ D mod 4 for conv2d, mod 2 for conv2d2) make
/// the two agree; they lie beyond all lengths, so the model masks them and results do not change.
fn pad_time_for_conv2d_backward(exp: &Experiment, feats: &Tensor) -> Result<Tensor, TrainError> {
    use crate::models::asr::conformer::InputLayer;
    let modulus: usize = match exp.config.model.encoder.input_layer {
        InputLayer::Conv2d => 4,
        InputLayer::Conv2d2 => 2,
        InputLayer::Linear => return Ok(feats.clone()),
    };
    let d = exp
        .config
        .model
        .preencoder_output
        .unwrap_or(exp.meta.feat_dim);
    let t = feats.dim(2)?;
    let extra = (d % modulus + modulus - t % modulus) % modulus;
    if extra == 0 {
        return Ok(feats.clone());
    }
    Ok(feats.pad_with_zeros(2, 0, extra)?)
}

/// Resident memory of this process in MB (Linux; None elsewhere), for progress lines.
fn resident_mb() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0 / 1e6)
}

/// Refuse unusable stores before anything is written.
fn check_inputs(train: &dyn FeatureSource, valid: &dyn FeatureSource) -> Result<(), TrainError> {
    for src in [train, valid] {
        if src.is_empty() {
            return Err(exp_err(src.path(), "the store has no utterances"));
        }
        if (0..src.len()).all(|i| src.text(i).is_none()) {
            return Err(exp_err(
                src.path(),
                "no utterance has a transcript (index.jsonl `text`); prepare the corpus from a manifest with transcripts",
            ));
        }
    }
    if valid.dim() != train.dim() {
        return Err(exp_err(
            valid.path(),
            format!(
                "features have dim {}, the training store {} has dim {}",
                valid.dim(),
                train.path().display(),
                train.dim()
            ),
        ));
    }
    Ok(())
}

/// Per-utterance CTC losses `[B]` of one batch.
fn utterance_losses(
    model: &AsrModel,
    feats: &Tensor,
    lens: &[usize],
    targets: &[Vec<u32>],
    train: bool,
) -> Result<Tensor, TrainError> {
    let (logits, out_lens) = model.forward(feats, lens, train)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let (per_utt, _stats) = ctc_loss(&log_probs, targets, &out_lens, Tokenizer::BLANK_ID, true)?;
    Ok(per_utt)
}

/// Mean CTC loss per utterance and greedy CER over the validation split.
fn validate(
    exp: &Experiment,
    model: &AsrModel,
    engine: Option<&CpuEngine>,
    valid: &dyn FeatureSource,
    targets: &Targets,
    dev: &Device,
) -> Result<(f64, f64), TrainError> {
    let frames: Vec<usize> = (0..valid.len()).map(|i| valid.frames(i)).collect();
    let batches = make_batches(&frames, &targets.items, exp.config.train.batch_frames, None);
    let (mut loss, mut n) = (0f64, 0usize);
    let mut errors = ErrorCounts::default();
    // the engine reads the parameters once for the whole pass
    let params = engine.map(|e| e.params()).transpose()?;
    let runner = engine.zip(params.as_ref());
    for items in &batches {
        let (feats, lens) = valid.batch(items, &exp.meta.layers, dev)?;
        let (logits, out_lens) = eval_logits(model, runner, &feats, &lens)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let tg: Vec<Vec<u32>> = items.iter().map(|&i| targets.tokens[i].clone()).collect();
        let (per_utt, _) = ctc_loss(&log_probs, &tg, &out_lens, Tokenizer::BLANK_ID, true)?;
        loss += per_utt
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        n += items.len();
        let lp = log_probs.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        for (u, &i) in items.iter().enumerate() {
            let hyp = search::greedy(
                log_prob_rows(&lp, u, out_lens[u])?.view(),
                Tokenizer::BLANK_ID,
            );
            let hyp_text = exp.tokenizer.decode(&hyp);
            let ref_text = valid.text(i).unwrap_or_default();
            errors += metrics::cer(ref_text, &hyp_text);
        }
    }
    Ok((loss / n.max(1) as f64, errors.rate()))
}

/// Utterance `u`'s first `frames` rows of CPU log-probs `[B, T, C]` as an ndarray `[frames, C]`.
pub fn log_prob_rows(
    lp: &Tensor,
    u: usize,
    frames: usize,
) -> Result<ndarray::Array2<f32>, TrainError> {
    let c = lp.dim(2)?;
    let rows = lp
        .get(u)?
        .narrow(0, 0, frames)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    ndarray::Array2::from_shape_vec((frames, c), rows)
        .map_err(|e| TrainError::Model(candle_core::Error::Msg(e.to_string())))
}

/// The vars an optimiser updates: all but batch-norm running statistics.
pub fn trainable(all: &NamedVars) -> NamedVars {
    all.iter()
        .filter(|(name, _)| {
            !RUNNING_STAT_NAMES
                .iter()
                .any(|s| name.rsplit('.').next() == Some(s))
        })
        .cloned()
        .collect()
}

fn save_last(
    exp: &Path,
    vars: &NamedVars,
    opt: &Adam,
    meta: &CheckpointMeta,
) -> Result<(), TrainError> {
    let mut tensors = checkpoint::model_tensors(vars);
    tensors.extend(opt.state_tensors()?);
    checkpoint::save(&last_path(exp), &tensors, Some(meta))?;
    Ok(())
}

/// Epoch checkpoint, `last`, n-best pruning and averaging, plots.
#[allow(clippy::too_many_arguments)]
fn end_of_epoch(
    exp: &Experiment,
    vars: &NamedVars,
    opt: &Adam,
    history: &[EpochResult],
    model: &AsrModel,
    epoch: usize,
    n_batches: usize,
    dev: &Device,
) -> Result<(), TrainError> {
    let meta = CheckpointMeta {
        epoch,
        batches_done: n_batches,
        epoch_complete: true,
        step: opt.step_count(),
        seed: exp.meta.seed,
        rng: RNG_SCHEME.into(),
        history: history.to_vec(),
        epoch_loss_sum: 0.0,
        epoch_utts: 0,
    };
    let dir = &exp.dir;
    checkpoint::save(
        &epoch_path(dir, epoch),
        &checkpoint::model_tensors(vars),
        history.last(),
    )?;
    save_last(dir, vars, opt, &meta)?;
    keep_nbest_and_average(exp, history, dev)?;
    write_layer_weights(exp, model)?;
    write_plots(exp, history, model, epoch)
}

/// `EXP/layer_weights.json`: the featurizer's softmaxed weights against the store layer ids
/// (after every epoch and when `--max-steps` stops a run; `--max-minutes` closes an epoch).
fn write_layer_weights(exp: &Experiment, model: &AsrModel) -> Result<(), TrainError> {
    let weights = model.layer_weights()?;
    let lw = LayerWeights::new(exp.meta.layers.clone(), weights).map_err(|reason| {
        TrainError::Experiment {
            path: exp.dir.join(LAYER_WEIGHTS),
            reason,
        }
    })?;
    lw.write(&exp.dir).map_err(|(path, e)| exp_err(&path, e))
}

/// Deletes the epoch checkpoints outside the n best and writes their average. Run after
/// `last` is saved, and again on resume when a kill came before it finished (`avg` then does
/// not describe the n best of the checkpointed history).
fn keep_nbest_and_average(
    exp: &Experiment,
    history: &[EpochResult],
    dev: &Device,
) -> Result<(), TrainError> {
    let dir = &exp.dir;
    let keep = checkpoint::nbest(history, exp.config.train.keep_nbest);
    for r in history {
        if !keep.contains(&r.epoch) {
            for p in [
                epoch_path(dir, r.epoch),
                checkpoint::sidecar(&epoch_path(dir, r.epoch)),
            ] {
                if p.is_file() {
                    std::fs::remove_file(&p).map_err(|e| exp_err(&p, e))?;
                }
            }
        }
    }
    if !keep.is_empty() {
        let avg = checkpoint::average(dir, &keep, dev)?;
        let losses = keep
            .iter()
            .filter_map(|e| history.iter().find(|r| r.epoch == *e).map(|r| r.valid_loss))
            .collect();
        checkpoint::save(
            &avg_path(dir),
            &avg,
            Some(&AverageMeta {
                epochs: keep,
                valid_losses: losses,
            }),
        )?;
    }
    Ok(())
}

/// Whether `avg.safetensors` is the average `keep_nbest_and_average` would write now.
fn average_is_current(exp: &Experiment, history: &[EpochResult]) -> bool {
    let keep = checkpoint::nbest(history, exp.config.train.keep_nbest);
    let stale_epoch = history
        .iter()
        .any(|r| !keep.contains(&r.epoch) && epoch_path(&exp.dir, r.epoch).is_file());
    let avg = checkpoint::load_meta::<AverageMeta>(&avg_path(&exp.dir));
    !stale_epoch && (keep.is_empty() || avg.is_ok_and(|m| m.epochs == keep))
}

fn write_plots(
    exp: &Experiment,
    history: &[EpochResult],
    model: &AsrModel,
    epoch: usize,
) -> Result<(), TrainError> {
    let dir = exp.dir.join("plots");
    std::fs::create_dir_all(&dir).map_err(|e| exp_err(&dir, e))?;
    let steps: Vec<StepLog> = read_log(&exp.dir.join(TRAIN_LOG))?;
    let train: Vec<(u64, f64)> = steps.iter().map(|s| (s.step, s.loss)).collect();
    let valid: Vec<(u64, f64)> = history.iter().map(|r| (r.step, r.valid_loss)).collect();
    plots::plot_losses(&dir.join("loss.png"), &train, &valid)?;
    let weights = model.layer_weights()?;
    if weights.len() == exp.meta.layers.len() {
        plots::plot_layer_weights(
            &dir.join("layer_weights.png"),
            &exp.meta.layers,
            &weights,
            epoch,
        )?;
    }
    Ok(())
}

fn open_append(path: &Path) -> Result<std::fs::File, TrainError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| exp_err(path, e))
}

fn write_line<T: Serialize>(f: &mut std::fs::File, path: &Path, v: &T) -> Result<(), TrainError> {
    let mut line = serde_json::to_string(v).map_err(|e| exp_err(path, e))?;
    line.push('\n');
    f.write_all(line.as_bytes()).map_err(|e| exp_err(path, e))
}

/// `epoch_log.jsonl`, rewritten from the checkpointed history (so it always matches it).
fn write_epoch_log(dir: &Path, history: &[EpochResult]) -> Result<(), TrainError> {
    let path = dir.join(EPOCH_LOG);
    let mut text = String::new();
    for r in history {
        text.push_str(&serde_json::to_string(r).map_err(|e| exp_err(&path, e))?);
        text.push('\n');
    }
    checkpoint::write_atomic(&path, text.as_bytes())?;
    Ok(())
}

/// Read a JSON-lines log (missing file: empty).
pub fn read_log<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, TrainError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(exp_err(path, e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| exp_err(path, e)))
        .collect()
}

/// Keep only the log lines that `keep` accepts (steps after the resumed checkpoint are redone).
fn truncate_log<T: Serialize + for<'de> Deserialize<'de>>(
    path: &Path,
    keep: impl Fn(&T) -> bool,
) -> Result<(), TrainError> {
    let rows: Vec<T> = read_log(path)?;
    let mut text = String::new();
    for r in rows.iter().filter(|r| keep(r)) {
        text.push_str(&serde_json::to_string(r).map_err(|e| exp_err(path, e))?);
        text.push('\n');
    }
    checkpoint::write_atomic(path, text.as_bytes())?;
    Ok(())
}
