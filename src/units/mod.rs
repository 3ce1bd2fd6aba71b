//! Discrete units from a feature store: `kmeans` fits centroids to one layer's frames,
//! streamed from the store's memory maps (memory bounded by the batch, not the corpus).
pub mod kmeans;
pub mod sklearn_kmeans;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use crate::store::{FeatureStore, FeatureView};
use kmeans::{FrameSource, KmeansConfig};

/// Fit k-means centroids to one layer of a feature store.
#[derive(Args, Debug)]
#[command(
    long_about = "Fit k-means centroids to the frames of one layer of a feature store: mini-batch \
k-means with k-means++ initialisation (scikit-learn's MiniBatchKMeans, the model fairseq's \
simple_kmeans trains for HuBERT units), streamed over the store's memory maps so memory is \
bounded by the batch, not the corpus. Deterministic for a seed.\n\nKM_DIR receives \
centroids.npy ([K, D] float32) and kmeans.json (layer, K, seed, frames used, inertia, the source \
store's fingerprint)."
)]
pub struct KmeansArgs {
    /// Feature store to read.
    #[arg(long)]
    pub data: PathBuf,
    /// Hidden-state number to cluster (one of the store's layers).
    #[arg(long)]
    pub layer: usize,
    /// Number of clusters K.
    #[arg(long)]
    pub clusters: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use at most this many frames: whole utterances in a seeded random order until the
    /// budget is reached (fairseq's `percent`); default every frame.
    #[arg(long, value_name = "N")]
    pub max_frames: Option<u64>,
    /// Frames per mini-batch.
    #[arg(long, default_value_t = 10_000)]
    pub batch_size: usize,
    /// Passes over the frames at most.
    #[arg(long, default_value_t = 100)]
    pub max_iter: usize,
    /// Stop when the smoothed batch inertia has not improved for this many steps (0: never).
    #[arg(long, default_value_t = 100)]
    pub max_no_improvement: usize,
    /// k-means++ initialisations; the best on a held-out sample is kept.
    #[arg(long, default_value_t = 3)]
    pub n_init: usize,
    /// Output directory (created; refused if it already holds a model).
    #[arg(long, value_name = "KM_DIR")]
    pub out: PathBuf,
    #[arg(long, short)]
    pub quiet: bool,
}

/// Opens a feature store to derive another from (units, collapse, k-means): refused, naming
/// it, when it cannot be opened or holds no utterances.
pub fn open_features(path: &Path) -> anyhow::Result<FeatureStore> {
    let store = FeatureStore::open(path)
        .with_context(|| format!("cannot open the feature store {}", path.display()))?;
    if store.is_empty() {
        anyhow::bail!("{}: the store holds no utterances", path.display());
    }
    Ok(store)
}

/// The frames of one layer of a feature store, over a subset of its utterances.
pub struct StoreFrames<'a> {
    store: &'a FeatureStore,
    layer: usize,
    rows: Vec<usize>,
    /// `starts[i]`: global number of row `rows[i]`'s first frame; one extra at the end.
    starts: Vec<u64>,
}

impl<'a> StoreFrames<'a> {
    /// Every frame of `layer`, or whole utterances in a seeded order up to `max_frames`
    /// (then put back in store order, so reads stay sequential).
    pub fn new(
        store: &'a FeatureStore,
        layer: usize,
        max_frames: Option<u64>,
        seed: u64,
    ) -> anyhow::Result<Self> {
        if !store.layers().contains(&layer) {
            anyhow::bail!(
                "{}: no layer {layer} (the store holds layers {:?})",
                store.dir().display(),
                store.layers()
            );
        }
        let lengths: Vec<u64> = store.rows().iter().map(|r| r.length).collect();
        let mut rows: Vec<usize> = (0..lengths.len()).filter(|&i| lengths[i] > 0).collect();
        if let Some(budget) = max_frames {
            use rand::seq::SliceRandom;
            use rand::SeedableRng;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x6b6d_6561_6e73);
            rows.shuffle(&mut rng);
            let mut total = 0u64;
            let mut keep = Vec::new();
            for r in rows {
                if total >= budget {
                    break;
                }
                total += lengths[r];
                keep.push(r);
            }
            keep.sort_unstable();
            rows = keep;
        }
        let mut starts = Vec::with_capacity(rows.len() + 1);
        let mut at = 0u64;
        for &r in &rows {
            starts.push(at);
            at += lengths[r];
        }
        starts.push(at);
        Ok(Self {
            store,
            layer,
            rows,
            starts,
        })
    }

    /// Row position and frame within it of global frame `f`.
    fn locate(&self, f: u64) -> (usize, usize) {
        let i = self.starts.partition_point(|&s| s <= f) - 1;
        (i, (f - self.starts[i]) as usize)
    }

    fn view(&self, i: usize) -> anyhow::Result<FeatureView<'a>> {
        Ok(self.store.view(self.rows[i], self.layer)?)
    }

    /// The store rows used, in order.
    pub fn rows(&self) -> &[usize] {
        &self.rows
    }
}

/// Random frames one thread gathers between two releases of the mapped pages.
const GATHER_SPAN: usize = 256;
/// A layer up to this size (as f32) stays mapped while frames are gathered: releasing its
/// pages would only make every later frame fault again (on the 235 MB bench store, releasing
/// every 256 frames made kmeans 6.6x slower: 26.4 s instead of 4.0 s), and its resident part
/// cannot outgrow it. Larger layers are released every `GATHER_SPAN` frames.
const MAPPED_LAYER_BUDGET: u64 = 512 << 20;

/// Copies frame `f` of `view` into `out` as f32.
fn copy_frame(view: &FeatureView, f: usize, out: &mut [f32]) {
    match view {
        FeatureView::F32(v) => out.iter_mut().zip(v.row(f)).for_each(|(o, x)| *o = *x),
        FeatureView::F16(v) => out
            .iter_mut()
            .zip(v.row(f))
            .for_each(|(o, x)| *o = f32::from(*x)),
        FeatureView::Bf16(v) => out
            .iter_mut()
            .zip(v.row(f))
            .for_each(|(o, x)| *o = f32::from(*x)),
        FeatureView::Int8 { values, scale } => out
            .iter_mut()
            .zip(values.row(f))
            .for_each(|(o, q)| *o = *q as f32 * scale[f]),
    }
}

impl FrameSource for StoreFrames<'_> {
    fn dim(&self) -> usize {
        self.store.dim()
    }

    fn len(&self) -> u64 {
        *self.starts.last().unwrap_or(&0)
    }

    fn gather(&self, ids: &[u64], out: &mut [f32]) -> anyhow::Result<()> {
        use rayon::prelude::*;
        let d = self.dim();
        // A random frame maps more than itself (fault-around, and on recent kernels the whole
        // large page-cache folio readahead made: measured ~300 KiB a frame on Linux 6.18), so
        // each chunk of GATHER_SPAN frames releases its layer's pages: the mapped part stays
        // bounded (benches/kmeans_rss.sh) instead of growing to the whole store.
        let release = self.len().saturating_mul(4 * d as u64) > MAPPED_LAYER_BUDGET;
        out.par_chunks_mut(d * GATHER_SPAN)
            .zip(ids.par_chunks(GATHER_SPAN))
            .try_for_each(|(out, ids)| -> anyhow::Result<()> {
                for (o, &f) in out.chunks_exact_mut(d).zip(ids) {
                    let (i, t) = self.locate(f);
                    copy_frame(&self.view(i)?, t, o);
                }
                if release {
                    self.store.release_layer_pages(self.layer);
                }
                Ok(())
            })
    }

    fn range(&self, start: u64, out: &mut [f32]) -> anyhow::Result<()> {
        let d = self.dim();
        let (mut i, mut t) = self.locate(start);
        let mut filled = 0;
        while filled < out.len() {
            let view = self.view(i)?;
            let take = (view.frames() - t).min((out.len() - filled) / d);
            if t == 0 && take == view.frames() {
                view.write_f32(&mut out[filled..filled + take * d]);
            } else {
                for (j, o) in out[filled..filled + take * d]
                    .chunks_exact_mut(d)
                    .enumerate()
                {
                    copy_frame(&view, t + j, o);
                }
            }
            filled += take * d;
            i += 1;
            t = 0;
        }
        Ok(())
    }

    fn release(&self) {
        self.store.release_pages();
    }
}

/// What `kmeans.json` records.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct KmeansMeta {
    pub layer: usize,
    pub clusters: usize,
    pub dim: usize,
    pub seed: u64,
    pub frames: u64,
    pub utterances: usize,
    /// Σ of squared distances to the nearest centroid over the frames used.
    pub inertia: f64,
    pub inertia_per_frame: f64,
    pub steps: usize,
    pub converged_early: bool,
    pub config: KmeansConfig,
    pub max_frames: Option<u64>,
    /// The source store: its directory and fingerprint.
    pub source: serde_json::Value,
    pub tool: String,
    pub seconds: f64,
}

pub const CENTROIDS: &str = "centroids.npy";
pub const KMEANS_JSON: &str = "kmeans.json";

pub fn run_kmeans(args: &KmeansArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if args.out.join(KMEANS_JSON).exists() || args.out.join(CENTROIDS).exists() {
        anyhow::bail!(
            "{}: already holds a k-means model (choose another --out or remove it)",
            args.out.display()
        );
    }
    let store = crate::units::open_features(&args.data)?;
    let frames = StoreFrames::new(&store, args.layer, args.max_frames, args.seed)?;
    let cfg = KmeansConfig {
        clusters: args.clusters,
        seed: args.seed,
        batch_size: args.batch_size,
        max_iter: args.max_iter,
        max_no_improvement: args.max_no_improvement,
        n_init: args.n_init,
        init_size: None,
    };
    if !args.quiet {
        eprintln!(
            "kmeans: {} frames of layer {} ({} utterances, dim {}) into {} clusters",
            frames.len(),
            args.layer,
            frames.rows().len(),
            frames.dim(),
            args.clusters
        );
    }
    let fit = kmeans::fit(&frames, &cfg)
        .with_context(|| format!("k-means on {} layer {}", args.data.display(), args.layer))?;
    let meta = KmeansMeta {
        layer: args.layer,
        clusters: args.clusters,
        dim: fit.dim,
        seed: args.seed,
        frames: fit.frames,
        utterances: frames.rows().len(),
        inertia: fit.inertia,
        inertia_per_frame: fit.inertia / fit.frames.max(1) as f64,
        steps: fit.steps,
        converged_early: fit.converged_early,
        config: cfg,
        max_frames: args.max_frames,
        source: serde_json::json!({
            "store": std::fs::canonicalize(&args.data).unwrap_or_else(|_| args.data.clone()),
            "fingerprint": store.meta().fingerprint,
        }),
        tool: format!("speechcache {}", env!("CARGO_PKG_VERSION")),
        seconds: started.elapsed().as_secs_f64(),
    };
    write_model(&args.out, &fit.centroids, &meta)?;
    if !args.quiet {
        eprintln!(
            "kmeans: {} steps{}, inertia {:.4} per frame, {:.1} s; written to {}",
            meta.steps,
            if meta.converged_early {
                " (no improvement: stopped early)"
            } else {
                ""
            },
            meta.inertia_per_frame,
            meta.seconds,
            args.out.display()
        );
    }
    Ok(())
}

/// `KM_DIR/centroids.npy` and `KM_DIR/kmeans.json`, each written atomically.
fn write_model(dir: &Path, centroids: &[f32], meta: &KmeansMeta) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut npy = crate::store::npy::header_bytes("<f4", &[meta.clusters as u64, meta.dim as u64])?;
    npy.extend_from_slice(bytemuck::cast_slice(centroids));
    let write = |name: &str, bytes: &[u8]| {
        crate::regular_file::write_atomic(&dir.join(name), bytes)
            .map_err(|(p, e)| anyhow::anyhow!("cannot write {}: {e}", p.display()))
    };
    write(CENTROIDS, &npy)?;
    let mut json = serde_json::to_string_pretty(meta)?;
    json.push('\n');
    write(KMEANS_JSON, json.as_bytes())
}

/// Assign every frame of one layer of a feature store to its nearest centroid.
#[derive(Args, Debug)]
#[command(
    long_about = "Assign every frame of a feature store's layer to its nearest k-means centroid \
(squared Euclidean, as fairseq's ApplyKmeans) and write a units store: shards/NNNNN.npy of int16 \
unit ids (one per frame, utterances concatenated), index.jsonl rows with id/shard/offset/length \
and the source row's text and speaker, meta.json; plus UNITS/units.km, one line of \
space-separated ids per utterance in index order (fairseq's dump_km_label format).\n\n--dedup \
collapses repeated ids in units.km and writes the run lengths to units.lengths, line for line. \
--part K/N and `speechcache merge` work as for the other stores, and a killed run resumes to the \
bytes of an uninterrupted one."
)]
pub struct UnitsArgs {
    /// Feature store to read.
    #[arg(long)]
    pub data: PathBuf,
    /// A `speechcache kmeans` output directory (centroids.npy + kmeans.json); or, together
    /// with --layer, a centroids .npy file (`[K, D]` float32 or float64) or a scikit-learn
    /// k-means model: fairseq's `km.bin` (`joblib.dump` of a MiniBatchKMeans) or a
    /// `pickle.dump` of MiniBatchKMeans/KMeans, read without executing it.
    #[arg(long, value_name = "KM_DIR|centroids.npy|km.bin")]
    pub kmeans: PathBuf,
    /// Layer to assign (default: the layer the k-means model was fitted on).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Output units store.
    #[arg(long)]
    pub out: PathBuf,
    /// Collapse repeated ids in units.km and write their run lengths to units.lengths.
    #[arg(long)]
    pub dedup: bool,
    /// Process only part K of N (1-based) into --out; join the parts with `speechcache merge`.
    #[arg(long, value_name = "K/N", value_parser = crate::store::partition::parse_part)]
    pub part: Option<crate::store::partition::PartSpec>,
    /// Seal a shard before it grows past this size.
    #[arg(long, default_value = "256MiB", value_parser = crate::progress::parse_size)]
    pub shard_size: u64,
    /// Replace a store already at --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Threads (default: all cores).
    #[arg(long)]
    pub jobs: Option<usize>,
    #[arg(long, short)]
    pub quiet: bool,
}

/// Centroids `[K, D]` and the layer they were fitted on (when known).
fn load_centroids(path: &Path) -> anyhow::Result<(Vec<f32>, usize, usize, Option<usize>)> {
    let (file, layer) = if path.is_dir() {
        let meta_path = path.join(KMEANS_JSON);
        let text = crate::regular_file::read_regular_to_string(&meta_path)
            .with_context(|| format!("{}: not a k-means model directory", meta_path.display()))?;
        let meta = parse_kmeans_json(&text)
            .with_context(|| format!("{}: not a kmeans.json", meta_path.display()))?;
        (path.join(CENTROIDS), Some(meta.layer))
    } else {
        (path.to_path_buf(), None)
    };
    let bytes = crate::regular_file::read_regular(&file)
        .with_context(|| format!("cannot read the centroids {}", file.display()))?;
    let (values, k, d) =
        parse_centroids(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    Ok((values, k, d, layer))
}

/// A `kmeans.json`.
pub fn parse_kmeans_json(text: &str) -> anyhow::Result<KmeansMeta> {
    let meta: KmeansMeta = serde_json::from_str(text)?;
    anyhow::ensure!(
        meta.clusters >= 1 && meta.dim >= 1,
        "{} clusters of dim {}",
        meta.clusters,
        meta.dim
    );
    Ok(meta)
}

/// Centroids `[K, D]` (row-major f32, K, D) from a centroids file's bytes: a `.npy` of float32
/// or float64, or a pickled scikit-learn k-means model (fairseq's joblib `km.bin`, or a plain
/// `pickle.dump`), read without executing it. The error is the reason, without the file.
pub fn parse_centroids(bytes: &[u8]) -> anyhow::Result<(Vec<f32>, usize, usize)> {
    let (values, k, d) = match bytes.first() {
        Some(b'\x93') => parse_npy_centroids(bytes)?,
        // a pickle starts with PROTO (protocol 2+), which fairseq's km.bin always has
        Some(0x80) => sklearn_kmeans::read_cluster_centers(bytes)
            .map_err(|e| anyhow::anyhow!("not a readable scikit-learn k-means pickle: {e}"))?,
        // joblib.dump(..., compress=N) writes zlib, gzip, bz2, lzma/xz or lz4 streams
        Some(0x78 | 0x1f | b'B' | 0xfd | 0x5d | 0x04) => anyhow::bail!(
            "a compressed joblib file (read uncompressed ones only): save it again with \
             joblib.dump(km, path) (no compress), or np.save(path, km.cluster_centers_)"
        ),
        _ => anyhow::bail!("neither a .npy file nor a pickled scikit-learn k-means model"),
    };
    anyhow::ensure!(
        values.iter().all(|v| v.is_finite()),
        "centroids hold NaN or infinite values"
    );
    Ok((values, k, d))
}

fn parse_npy_centroids(bytes: &[u8]) -> anyhow::Result<(Vec<f32>, usize, usize)> {
    let npy = npyz::NpyFile::new(bytes).context("not a .npy file")?;
    let shape = npy.shape().to_vec();
    let [k, d] = shape[..] else {
        anyhow::bail!("centroids must be [K, D], found shape {shape:?}");
    };
    anyhow::ensure!(
        (1..=sklearn_kmeans::MAX_CLUSTERS).contains(&k) && d >= 1,
        "{k} centroids of dim {d} (1 to 32768 centroids: ids are stored as int16)"
    );
    let descr = npy.dtype().descr();
    // the header's shape is untrusted: the values it claims must be in the file before any
    // allocation is sized by it
    let width = if descr.trim_matches('\'') == "<f8" {
        8
    } else {
        4
    };
    let claimed = k.checked_mul(d).and_then(|n| n.checked_mul(width));
    anyhow::ensure!(
        claimed.is_some_and(|n| n <= bytes.len() as u64),
        "the header claims [{k}, {d}] values, the file holds {} bytes",
        bytes.len()
    );
    let (k, d) = (k as usize, d as usize);
    let values: Vec<f32> = match descr.trim_matches('\'') {
        "<f4" => npy.into_vec::<f32>()?,
        "<f8" => npy
            .into_vec::<f64>()?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        other => anyhow::bail!("centroids of dtype {other} (float32 or float64 expected)"),
    };
    anyhow::ensure!(
        values.len() == k * d,
        "the file holds {} values for [{k}, {d}]",
        values.len()
    );
    Ok((values, k, d))
}

/// Rows assigned per parallel round (each row's frames go through one gemm).
const ROWS_PER_ROUND: usize = 64;

pub fn run_units(args: &UnitsArgs) -> anyhow::Result<()> {
    use crate::store::{ItemData, StoreKind, WriterSpec};
    let started = Instant::now();
    let (centroids, k, d, fitted_layer) = load_centroids(&args.kmeans)?;
    let layer = match (args.layer, fitted_layer) {
        (Some(l), _) | (None, Some(l)) => l,
        (None, None) => anyhow::bail!(
            "{}: a bare centroids file does not say its layer: add --layer",
            args.kmeans.display()
        ),
    };
    let store = crate::units::open_features(&args.data)?;
    if !store.layers().contains(&layer) {
        anyhow::bail!(
            "{}: no layer {layer} (the store holds layers {:?})",
            args.data.display(),
            store.layers()
        );
    }
    if store.dim() != d {
        anyhow::bail!(
            "{}: the centroids are {d}-dimensional but {} holds {}-dimensional features",
            args.kmeans.display(),
            args.data.display(),
            store.dim()
        );
    }
    crate::store::refuse_overlapping_out(&args.out, &[args.data.as_path()])?;
    let centroids_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(bytemuck::cast_slice::<f32, u8>(
            &centroids,
        )))
    };
    let spec = WriterSpec {
        kind: StoreKind::Units,
        dtype: crate::store::Dtype::Int16,
        sample_rate: None,
        frame_rate: Some(store.frame_rate()),
        dim: None,
        layers: vec![layer],
        options: serde_json::json!({"centroids_sha256": centroids_sha, "clusters": k, "layer": layer, "dedup": args.dedup}),
        source: serde_json::json!({"features": store.meta().fingerprint}),
        extra: serde_json::json!({"clusters": k, "kmeans": args.kmeans}),
        shard_bytes: args.shard_size,
        overwrite: args.overwrite,
    };
    let run = crate::store::mapped::write_mapped(
        &args.out,
        spec,
        store.rows(),
        args.part,
        args.jobs,
        ROWS_PER_ROUND,
        |i| {
            store.check_row(i).map_err(|e| e.to_string())?;
            let view = store.view(i, layer).map_err(|e| e.to_string())?;
            let t = view.frames();
            let mut x = vec![0f32; t * d];
            view.write_f32(&mut x);
            let mut labels = vec![0u32; t];
            kmeans::assign(&x, d, &centroids, Some(&mut labels));
            Ok(ItemData::Units(
                labels.into_iter().map(|l| l as i16).collect(),
            ))
        },
        || store.release_pages(),
    )?;
    let Some(run) = run else {
        if !args.quiet {
            eprintln!("units: {} is already complete", args.out.display());
        }
        return Ok(());
    };
    let meta = run.meta;
    if !args.quiet {
        eprintln!(
            "units: {} utterances, {} frames of layer {layer} into {k} units ({} failed), {:.1} s; \
             written to {}",
            meta.totals.items,
            meta.totals.length,
            meta.totals.failed,
            started.elapsed().as_secs_f64(),
            args.out.display()
        );
    }
    Ok(())
}
