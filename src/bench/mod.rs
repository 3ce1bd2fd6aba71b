//! `speechcache bench`: throughput of each stage on the user's own files and machine.
use clap::{Args, Subcommand};

mod extract;
mod finetune;
mod prepare;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    target: BenchTarget,
}

#[derive(Subcommand, Debug)]
enum BenchTarget {
    /// Prepare throughput per stage (read, decode, resample, write) and its scaling with --jobs.
    Prepare(prepare::PrepareBenchArgs),
    /// Model forward (or fbank) throughput in x-real-time.
    Extract(extract::ExtractBenchArgs),
    /// Finetune launch cost (command start to first optimizer step) and epoch time.
    Finetune(finetune::FinetuneBenchArgs),
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.target {
        BenchTarget::Prepare(a) => prepare::run(a),
        BenchTarget::Extract(a) => extract::run(a),
        BenchTarget::Finetune(a) => finetune::run(a),
    }
}
