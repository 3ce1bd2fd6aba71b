//! Command-line interface: one subcommand per stage; each stage module owns its own flags.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "speechcache",
    version,
    about = "Decode a speech corpus once, cache wav2vec 2.0 / HuBERT / WavLM / data2vec-audio features once, finetune Conformer-CTC on the cache many times.",
    long_about = "speechcache turns the expensive, repeated parts of SSL-frontend ASR finetuning into one-off stores on disk:\n\n  prepare   corpus (WAV/FLAC/MP3/Ogg/Opus/M4A, any rate) -> audio store (16 kHz float32 shards)\n  extract   audio store -> feature store (wav2vec2/HuBERT/WavLM/data2vec-audio hidden states, or Kaldi fbank)\n  finetune  feature store -> Conformer-CTC experiment\n  decode    experiment + feature store -> hypotheses, CER/WER\n\nEvery store is plain .npy shards plus index.jsonl and meta.json (see README)."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Decode, downmix and resample a corpus into an audio store.
    Prepare(speechcache::prepare::PrepareArgs),
    /// Summarise a store: counts, hours, durations, rates seen, failures.
    Info(speechcache::store::InfoArgs),
    /// Re-check every shard and row of a store against its checksums.
    Verify(speechcache::store::VerifyArgs),
    /// Print what a wav2vec2/HuBERT/WavLM/data2vec-audio checkpoint is (family, variant, sizes, parameters).
    ModelInfo(speechcache::models::ModelInfoArgs),
    /// Run a model (or Kaldi fbank) once over an audio store and cache the features.
    Extract(speechcache::extract::ExtractArgs),
    /// Join the part stores of a partitioned run (--part K/N) into one store.
    Merge(speechcache::store::MergeArgs),
    /// Drop layers from a feature store.
    Prune(speechcache::extract::PruneArgs),
    /// Train a Conformer-CTC on cached features.
    Finetune(speechcache::finetune::FinetuneArgs),
    /// Decode a feature store with a trained experiment and score CER/WER.
    Decode(speechcache::finetune::DecodeArgs),
    /// Rank the layers an experiment learned to weigh (--top K: a list for extract --layers).
    Layers(speechcache::finetune::layers::LayersArgs),
    /// Collapse a feature store to an experiment's learned weighted sum of layers (one layer).
    Collapse(speechcache::collapse::CollapseArgs),
    /// Fit k-means centroids to one layer of a feature store (for discrete units).
    Kmeans(speechcache::units::KmeansArgs),
    /// Assign every frame of a feature store's layer to its nearest centroid (a units store).
    Units(speechcache::units::UnitsArgs),
    /// Measure throughput on your own data and machine.
    Bench(speechcache::bench::BenchArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Prepare(args) => speechcache::prepare::run(&args)?,
        Command::Info(args) => speechcache::store::run_info(&args)?,
        Command::Verify(args) => speechcache::store::run_verify(&args)?,
        Command::ModelInfo(args) => speechcache::models::run_model_info(&args)?,
        Command::Extract(args) => speechcache::extract::run(&args)?,
        Command::Merge(args) => speechcache::store::run_merge(&args)?,
        Command::Prune(args) => speechcache::extract::run_prune(&args)?,
        Command::Finetune(args) => speechcache::finetune::run_finetune(&args)?,
        Command::Decode(args) => speechcache::finetune::run_decode(&args)?,
        Command::Layers(args) => speechcache::finetune::layers::run_layers(&args)?,
        Command::Collapse(args) => speechcache::collapse::run_collapse(&args)?,
        Command::Kmeans(args) => speechcache::units::run_kmeans(&args)?,
        Command::Units(args) => speechcache::units::run_units(&args)?,
        Command::Bench(args) => speechcache::bench::run(&args)?,
    }
    Ok(ExitCode::SUCCESS)
}
