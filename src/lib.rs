//! speechcache: decode a speech corpus once, cache self-supervised model features once,
//! finetune Conformer-CTC on the cache many times.
//!
//! Stages talk only through stores on disk (see `store`): `prepare` (corpus → audio store),
//! `extract` (audio store → feature store), `finetune`/`decode` (feature store → experiment).

pub mod audio;
pub mod bench;
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
