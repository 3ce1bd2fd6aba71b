//! speechcache: decode a speech corpus once, cache self-supervised model features once,
//! finetune Conformer-CTC on the cache many times.
//!
//! Stages talk only through stores on disk (see `store`): `prepare` (corpus → audio store),
//! `extract` (audio store → feature store), `finetune`/`decode` (feature store → experiment).
//!
//! # Layout
//! - [`device`]: the [`device::Backend`] (device, compute dtype, executor), resolved once at
//!   the CLI; the only reader of the environment variables that pick an executor.
//! - [`manifest`], [`audio`], [`prepare`]: corpus → audio store.
//! - [`store`]: the on-disk format (writer, lock, reader with checksums, merge, prune, parts).
//! - [`models`]: one folder per model, holding its definition and its executors:
//!   `models::checkpoint` (safetensors, torch zip and legacy through a pickle reader that
//!   executes nothing, fairseq `.pt`, all mapped to one naming), `models::ssl` (the wav2vec 2.0 /
//!   HuBERT encoder family: the candle definition, which is also the tensor-op executor, and
//!   `CpuEncoder`, the f32 CPU executor), `models::asr` (the Conformer-CTC `AsrModel` in candle
//!   and its CPU trainer `models::asr::cpu::CpuEngine`), `models::fbank` (Kaldi fbank).
//! - [`ops`]: every kernel the CPU executors share, forward and backward side by side (gemm
//!   views, layer/batch norm and the feature normalisations, attention, convolutions (im2col,
//!   Winograd, depthwise), activations, CTC), each tested against PyTorch in `tests/ops.rs`,
//!   and the one scoped profiler (`ops::profile`).
//! - [`extract`], [`finetune`]: stages 2 and 3; [`bench`]: the `bench` subcommand.
//!
//! # What runs when
//!
//! | work | CPU, f32 (default) | CUDA, or f16/bf16, or `SPEECHCACHE_ENGINE=candle` |
//! |---|---|---|
//! | extract (SSL encoder) | `models::ssl::CpuEncoder`, one utterance per core | `models::ssl::Wav2Vec2Model` tensor ops, padded batches |
//! | finetune step | `models::asr::cpu::CpuEngine` (hand-written backward) | `models::asr::AsrModel` + candle autograd |
//! | validation, decode | `CpuEngine::forward_eval` | `AsrModel::forward` |
//! | optimiser | fused f32 Adam/AdamW | Adam/AdamW as tensor ops |
//!
//! The choice is made once, in [`device::Backend::resolve`], and passed down; a switch in the
//! environment changes extract and finetune alike.

pub mod audio;
pub mod bench;
pub mod collapse;
pub mod device;
pub mod extract;
pub mod finetune;
pub mod manifest;
pub mod models;
pub mod ops;
pub mod prepare;
pub mod progress;
pub mod regular_file;
pub mod store;
pub mod units;
