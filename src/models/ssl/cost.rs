//! What running an utterance costs, for planning and for the errors that say what lifting a
//! limit would take: the encoder's floating-point operations for a length (the convs, the
//! projections, attention's T² term) and the wall time that predicts on this machine.
use super::config::Wav2Vec2Config;

/// Floating-point operations (2 per multiply-add) of one forward over `samples` samples
/// through every layer: what a whole-utterance run (no chunking) computes.
pub fn forward_flops(cfg: &Wav2Vec2Config, samples: usize) -> f64 {
    let mut n = samples;
    let mut c_in = 1usize;
    let mut macs = 0f64;
    for ((&c, &k), &s) in cfg
        .conv_dim
        .iter()
        .zip(&cfg.conv_kernel)
        .zip(&cfg.conv_stride)
    {
        n = if n < k { 0 } else { (n - k) / s + 1 };
        macs += (n * k * c_in * c) as f64;
        c_in = c;
    }
    let (t, h, f) = (
        n as f64,
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
    );
    let groups = cfg.num_conv_pos_embedding_groups.max(1) as f64;
    macs += t * c_in as f64 * h; // feature projection
    macs += t * cfg.num_conv_pos_embeddings as f64 * h * h / groups;
    // per layer: q, k, v and out projections, the feed-forward, then scores and context
    let layer = t * (4.0 * h * h + 2.0 * h * f) + 2.0 * t * t * h;
    macs += cfg.num_hidden_layers as f64 * layer;
    2.0 * macs
}

/// Sustained f32 GFLOP/s per thread of the CPU engine, the rate the error rows' time
/// estimates use: `speechcache bench extract --model base --lengths 60,300` gave 78.9 and 79.7
/// (1.17 and 12.5 TFLOP by `forward_flops` in 7.4 and 78.2 s, 2 threads, AMD EPYC with
/// AVX-512, 2026-12-04), rounded down for the whole process (loading, writing).
pub const ENGINE_GFLOPS_PER_THREAD: f64 = 75.0;

/// Predicted seconds for one utterance of `samples` samples on `threads` threads.
pub fn estimated_seconds(cfg: &Wav2Vec2Config, samples: usize, threads: usize) -> f64 {
    forward_flops(cfg, samples) / (ENGINE_GFLOPS_PER_THREAD * 1e9 * threads.max(1) as f64)
}
