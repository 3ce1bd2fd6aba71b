//! `speechcache kmeans` through the CLI, on feature stores written here: the centroids and
//! kmeans.json it writes, its inertia recomputed independently, determinism, and bad input.
mod common;

use common::{bin, ok, s};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use speechcache::store::{
    Dtype, IndexRow, InputResult, ItemData, StoreKind, StoreWriter, WriterSpec,
};
use std::path::Path;

const DIM: usize = 12;
const BLOBS: usize = 6;

/// A feature store of `n` utterances whose layer-3 frames come from `BLOBS` separated blobs
/// (layer 5 is noise); returns the blob centres.
fn write_store(dir: &Path, n: usize, dtype: Dtype) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let centres: Vec<f32> = (0..BLOBS * DIM)
        .map(|_| rng.random_range(-8.0..8.0))
        .collect();
    let spec = WriterSpec {
        kind: StoreKind::Features,
        dtype,
        sample_rate: None,
        frame_rate: Some(50.0),
        dim: Some(DIM),
        layers: vec![3, 5],
        options: serde_json::json!({"synthetic": "units"}),
        source: serde_json::json!({}),
        extra: serde_json::Value::Null,
        shard_bytes: 64 << 10,
        overwrite: false,
    };
    let mut w = StoreWriter::create_or_resume(dir, spec).unwrap();
    for i in 0..n {
        let t = rng.random_range(20..90);
        let mut l3 = Array2::<f32>::zeros((t, DIM));
        let mut l5 = Array2::<f32>::zeros((t, DIM));
        for f in 0..t {
            let c = rng.random_range(0..BLOBS);
            for d in 0..DIM {
                l3[[f, d]] = centres[c * DIM + d] + rng.random_range(-0.3..0.3);
                l5[[f, d]] = rng.random_range(-1.0..1.0);
            }
        }
        let row = IndexRow {
            id: format!("u{i:03}"),
            source: format!("u{i}.wav"),
            duration: t as f64 / 50.0,
            ..Default::default()
        };
        w.push_input(
            i,
            InputResult {
                items: vec![(row, ItemData::Features(vec![l3, l5]))],
                errors: vec![],
            },
        )
        .unwrap();
    }
    w.finish().unwrap();
    centres
}

/// Every frame of `layer`, as f32, through the public reader.
fn frames(store: &Path, layer: usize) -> Vec<f32> {
    let st = speechcache::store::FeatureStore::open(store).unwrap();
    (0..st.len())
        .flat_map(|i| {
            st.to_array(i, layer)
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>()
        })
        .collect()
}

fn read_centroids(path: &Path) -> (Vec<u64>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = npy.shape().to_vec();
    (shape, npy.into_vec::<f32>().unwrap())
}

fn kmeans(store: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    bin()
        .args(["kmeans", "--quiet", "--data", s(store), "--out", s(out)])
        .args(["--batch-size", "256", "--max-iter", "30"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn cli_kmeans_finds_the_blobs_and_reports_its_inertia() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("feats");
    let truth = write_store(&store, 40, Dtype::F16);
    let km = tmp.path().join("km");
    ok(&kmeans(
        &store,
        &km,
        &["--layer", "3", "--clusters", "6", "--seed", "4"],
    ));

    let (shape, c) = read_centroids(&km.join("centroids.npy"));
    assert_eq!(shape, vec![BLOBS as u64, DIM as u64]);
    for t in truth.chunks(DIM) {
        let nearest = c
            .chunks(DIM)
            .map(|f| f.iter().zip(t).map(|(a, b)| (a - b).powi(2)).sum::<f32>())
            .fold(f32::INFINITY, f32::min);
        assert!(
            nearest < 0.05,
            "a blob centre is {nearest} from every centroid"
        );
    }

    // kmeans.json's inertia = Σ min_k ‖x − c_k‖², recomputed here in f64 over every frame
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(km.join("kmeans.json")).unwrap()).unwrap();
    let x = frames(&store, 3);
    let mut want = 0f64;
    for f in x.chunks(DIM) {
        want += c
            .chunks(DIM)
            .map(|ck| {
                f.iter()
                    .zip(ck)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>()
            })
            .fold(f64::INFINITY, f64::min);
    }
    let got = meta["inertia"].as_f64().unwrap();
    assert!(
        (got - want).abs() <= 1e-4 * want,
        "inertia {got} vs recomputed {want}"
    );
    assert_eq!(meta["frames"].as_u64().unwrap() as usize, x.len() / DIM);
    assert_eq!(meta["layer"], 3);
    assert_eq!(meta["clusters"], 6);
    assert_eq!(meta["seed"], 4);
    let fp = speechcache::store::FeatureStore::open(&store)
        .unwrap()
        .meta()
        .fingerprint
        .clone();
    assert_eq!(meta["source"]["fingerprint"], serde_json::json!(fp));

    // the same seed gives the same bytes; an existing model is not overwritten
    let again = tmp.path().join("km2");
    ok(&kmeans(
        &store,
        &again,
        &["--layer", "3", "--clusters", "6", "--seed", "4"],
    ));
    assert_eq!(
        std::fs::read(km.join("centroids.npy")).unwrap(),
        std::fs::read(again.join("centroids.npy")).unwrap()
    );
    let out = kmeans(&store, &km, &["--layer", "3", "--clusters", "6"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a k-means model"));

    // --max-frames: whole utterances up to the budget
    let part = tmp.path().join("km-part");
    ok(&kmeans(
        &store,
        &part,
        &["--layer", "3", "--clusters", "6", "--max-frames", "500"],
    ));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(part.join("kmeans.json")).unwrap()).unwrap();
    let used = meta["frames"].as_u64().unwrap();
    assert!(
        (500..500 + 90).contains(&used),
        "{used} frames used for a budget of 500"
    );
}

#[test]
fn cli_kmeans_bad_input_is_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("feats");
    write_store(&store, 3, Dtype::Int8);
    let cases: [(&[&str], &str); 3] = [
        (
            &["--layer", "7", "--clusters", "4"],
            "no layer 7 (the store holds layers [3, 5])",
        ),
        (
            &["--layer", "3", "--clusters", "100000"],
            "fewer than the 100000 clusters",
        ),
        (
            &["--layer", "3", "--clusters", "0"],
            "--clusters must be at least 1",
        ),
    ];
    for (i, (args, want)) in cases.iter().enumerate() {
        let out = kmeans(&store, &tmp.path().join(format!("km{i}")), args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let out = kmeans(
        &tmp.path().join("nowhere"),
        &tmp.path().join("kmx"),
        &["--layer", "3", "--clusters", "2"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("nowhere"), "{err}");
}

/// `speechcache units` on a store: writes `units` and returns the run's output.
fn units(store: &Path, km: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    bin()
        .args([
            "units",
            "--quiet",
            "--data",
            s(store),
            "--kmeans",
            s(km),
            "--out",
            s(out),
        ])
        .args(["--shard-size", "2KiB"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn cli_units_are_the_argmin_and_parts_merge_to_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("feats");
    write_store(&store, 30, Dtype::F32);
    let km = tmp.path().join("km");
    ok(&kmeans(
        &store,
        &km,
        &["--layer", "3", "--clusters", "6", "--seed", "2"],
    ));
    let (_, c) = read_centroids(&km.join("centroids.npy"));

    let whole = tmp.path().join("units");
    ok(&units(&store, &km, &whole, &[]));
    let feats = speechcache::store::FeatureStore::open(&store).unwrap();
    let u = speechcache::store::UnitsStore::open(&whole).unwrap();
    assert_eq!(u.len(), feats.len());
    let km_text = std::fs::read_to_string(whole.join("units.km")).unwrap();
    assert_eq!(
        km_text.lines().count(),
        feats.len(),
        "one .km line per utterance"
    );
    let mut frames = 0;
    for (i, line) in km_text.lines().enumerate() {
        let (row, ids) = (&u.rows()[i], u.values(i));
        assert_eq!(row.id, feats.rows()[i].id);
        assert_eq!(row.length, feats.rows()[i].length);
        u.check_row(i).unwrap();
        let x = feats.to_array(i, 3).unwrap();
        for (f, &id) in x.rows().into_iter().zip(ids) {
            let dist = |k: usize| -> f64 {
                f.iter()
                    .zip(&c[k * DIM..(k + 1) * DIM])
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum()
            };
            let best = (0..6).map(dist).fold(f64::INFINITY, f64::min);
            assert!(
                dist(id as usize) <= best * (1.0 + 1e-5) + 1e-6,
                "{}: frame not at its argmin",
                row.id
            );
        }
        let line_ids: Vec<i16> = line.split(' ').map(|v| v.parse().unwrap()).collect();
        assert_eq!(line_ids, ids);
        frames += ids.len();
    }
    assert_eq!(frames as u64, u.meta().totals.length);

    // --dedup: repeats collapsed in units.km, run lengths beside it, frame counts kept
    let dd = tmp.path().join("units-dedup");
    ok(&units(&store, &km, &dd, &["--dedup"]));
    let kept = std::fs::read_to_string(dd.join("units.km")).unwrap();
    let runs = std::fs::read_to_string(dd.join("units.lengths")).unwrap();
    for (i, (k, r)) in kept.lines().zip(runs.lines()).enumerate() {
        let k: Vec<i16> = k.split(' ').map(|v| v.parse().unwrap()).collect();
        let r: Vec<usize> = r.split(' ').map(|v| v.parse().unwrap()).collect();
        let expanded: Vec<i16> = k.iter().zip(&r).flat_map(|(&id, &n)| vec![id; n]).collect();
        assert_eq!(expanded, u.values(i));
        assert!(k.windows(2).all(|w| w[0] != w[1]));
    }

    // parts 1/3..3/3 merged hold the rows, ids and units.km of the whole run (shards are cut
    // at part boundaries too); a rerun of a complete store changes nothing
    let parts: Vec<_> = (1..=3)
        .map(|k| tmp.path().join(format!("part{k}")))
        .collect();
    for (k, p) in parts.iter().enumerate() {
        ok(&units(&store, &km, p, &["--part", &format!("{}/3", k + 1)]));
    }
    let merged = tmp.path().join("merged");
    ok(&bin()
        .arg("merge")
        .args(parts.iter().map(|p| s(p)))
        .args(["--out", s(&merged)])
        .output()
        .unwrap());
    let m = speechcache::store::UnitsStore::open(&merged).unwrap();
    assert_eq!(m.len(), u.len());
    for i in 0..u.len() {
        let (a, b) = (&m.rows()[i], &u.rows()[i]);
        assert_eq!(
            (&a.id, &a.text, a.length, &a.checksum),
            (&b.id, &b.text, b.length, &b.checksum)
        );
        assert_eq!(m.values(i), u.values(i));
    }
    assert_eq!(
        std::fs::read_to_string(merged.join("units.km")).unwrap(),
        km_text
    );
    drop((m, u));
    let before = common::tree_bytes(&whole);
    ok(&units(&store, &km, &whole, &[]));
    assert!(
        before == common::tree_bytes(&whole),
        "a rerun changed a complete store"
    );
}

#[test]
fn cli_units_bad_input_is_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("feats");
    write_store(&store, 4, Dtype::F16);
    let km = tmp.path().join("km");
    ok(&kmeans(&store, &km, &["--layer", "3", "--clusters", "3"]));
    // a bare centroids file without --layer; of another dimension; a missing layer
    let bare = km.join("centroids.npy");
    let wrong_dim = tmp.path().join("wide.npy");
    let mut npy = speechcache::store::npy::header_bytes("<f4", &[2, 5]).unwrap();
    npy.extend_from_slice(&[0u8; 2 * 5 * 4]);
    std::fs::write(&wrong_dim, npy).unwrap();
    // a header that claims far more values than the file holds (no allocation sized by it),
    // and one whose shape overflows
    let lying = tmp.path().join("lying.npy");
    let mut npy = speechcache::store::npy::header_bytes("<f4", &[2, 1 << 40]).unwrap();
    npy.extend_from_slice(&[0u8; 8]);
    std::fs::write(&lying, npy).unwrap();
    let overflow = tmp.path().join("overflow.npy");
    let mut npy = speechcache::store::npy::header_bytes("<f8", &[3, u64::MAX / 2]).unwrap();
    npy.extend_from_slice(&[0u8; 8]);
    std::fs::write(&overflow, npy).unwrap();
    let cases: [(&Path, &[&str], &str); 6] = [
        (
            &lying,
            &["--layer", "3"],
            "the header claims [2, 1099511627776] values",
        ),
        (&overflow, &["--layer", "3"], "the header claims"),
        (&bare, &[], "does not say its layer: add --layer"),
        (
            &wrong_dim,
            &["--layer", "3"],
            "centroids are 5-dimensional but",
        ),
        (
            &km,
            &["--layer", "4"],
            "no layer 4 (the store holds layers [3, 5])",
        ),
        (
            &tmp.path().join("none"),
            &["--layer", "3"],
            "cannot read the centroids",
        ),
    ];
    for (i, (model, args, want)) in cases.iter().enumerate() {
        let out = units(&store, model, &tmp.path().join(format!("u{i}")), args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{want}: {err}");
        assert!(err.contains(want), "{want}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // a bare centroids file with --layer works
    ok(&units(
        &store,
        &bare,
        &tmp.path().join("ok"),
        &["--layer", "3"],
    ));
}

fn kmeans_fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kmeans")
        .join(name)
}

/// The reference: a fixture's `cluster_centers_` as numpy saved it, read with npyz, as f32.
fn npy_centers(name: &str) -> (Vec<u64>, Vec<f32>) {
    let bytes = std::fs::read(kmeans_fixture(name)).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = npy.shape().to_vec();
    let values = if npy.dtype().descr().contains("f8") {
        npy.into_vec::<f64>()
            .unwrap()
            .into_iter()
            .map(|v| v as f32)
            .collect()
    } else {
        npy.into_vec::<f32>().unwrap()
    };
    (shape, values)
}

/// scikit-learn models pickled by joblib (fairseq's km.bin) and by pickle (protocols 4 and 5),
/// float64 and float32, C and Fortran order: their `cluster_centers_` as numpy saved them.
#[test]
fn km_bin_models_read_as_their_cluster_centers() {
    for (model, centers) in [
        ("mbk_f64.joblib.bin", "mbk_f64.centers.npy"),
        ("mbk_f64.pickle4.bin", "mbk_f64.centers.npy"),
        ("kmeans_f64.joblib.bin", "kmeans_f64.centers.npy"),
        ("kmeans_f32.joblib.bin", "kmeans_f32.centers.npy"),
        ("kmeans_f32.pickle5.bin", "kmeans_f32.centers.npy"),
        ("kmeans_fortran.joblib.bin", "kmeans_fortran.centers.npy"),
    ] {
        let bytes = std::fs::read(kmeans_fixture(model)).unwrap();
        let (values, k, d) = speechcache::units::parse_centroids(&bytes)
            .unwrap_or_else(|e| panic!("{model}: {e:#}"));
        let (shape, want) = npy_centers(centers);
        assert_eq!(vec![k as u64, d as u64], shape, "{model}");
        assert!(values == want, "{model}: centers differ from {centers}");
    }
}

/// `units --kmeans km.bin` equals `units --kmeans centers.npy` of the same centers.
#[test]
fn cli_units_with_km_bin_equal_units_with_the_npy() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("feats");
    write_store(&store, 12, Dtype::F32);
    let (a, b) = (tmp.path().join("from-bin"), tmp.path().join("from-npy"));
    ok(&units(
        &store,
        &kmeans_fixture("mbk_f64.joblib.bin"),
        &a,
        &["--layer", "3"],
    ));
    ok(&units(
        &store,
        &kmeans_fixture("mbk_f64.centers.npy"),
        &b,
        &["--layer", "3"],
    ));
    let km = std::fs::read_to_string(a.join("units.km")).unwrap();
    assert_eq!(km, std::fs::read_to_string(b.join("units.km")).unwrap());
    let ids: std::collections::BTreeSet<&str> = km.split_whitespace().collect();
    assert!(ids.len() > 1, "every frame got one unit: {ids:?}");
}

/// Hostile or broken km.bin files: one error line naming the file and the reason.
#[test]
fn cli_units_refuses_broken_km_bin_files() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("feats");
    write_store(&store, 4, Dtype::F32);
    let good = std::fs::read(kmeans_fixture("kmeans_f64.joblib.bin")).unwrap();
    let at = |needle: &[u8]| {
        good.windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
    };
    let centers = at(b"cluster_centers_");
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    // cut inside the centers' bytes
    cases.push(("truncated", good[..centers + 200].to_vec(), "truncated"));
    // the centers' dtype code f8 → i8 (the first dtype after cluster_centers_ is reused by
    // reference, so patch the shared definition: every float64 array becomes int64)
    let mut wrong = good.clone();
    let f8 = at(b"\x8c\x02f8");
    wrong[f8 + 2] = b'i';
    cases.push(("wrong-dtype", wrong, "float32 or float64"));
    // the centers' shape (3, 12) → (2^31-1, 12): more bytes than the file
    let mut absurd = good[..centers].to_vec();
    let rest = &good[centers..];
    let k3 = rest.windows(4).position(|w| w == b"K\x03K\x0c").unwrap();
    absurd.extend_from_slice(&rest[..k3]);
    absurd.extend_from_slice(b"J\xff\xff\xff\x7fK\x0c");
    absurd.extend_from_slice(&rest[k3 + 4..]);
    cases.push(("absurd-shape", absurd, "needs"));
    // a model whose cluster_centers_ is the model itself
    let cycle = b"\x80\x04\x8c\x0fsklearn.cluster\x8c\x0fMiniBatchKMeans\x93)\x81\x94}\x8c\x10cluster_centers_h\x00sb.".to_vec();
    cases.push(("self-reference", cycle, "not a numpy array"));
    // deeply nested state
    let mut deep = b"\x80\x04\x8c\x0fsklearn.cluster\x8c\x0fMiniBatchKMeans\x93)\x81".to_vec();
    deep.extend(std::iter::repeat_n(b']', 200_000));
    deep.extend(std::iter::repeat_n(b'a', 199_999));
    deep.extend_from_slice(b"b.");
    cases.push(("nested", deep, "k-means"));
    cases.push(("compressed", vec![0x78, 0x9c, 1, 2, 3], "compressed joblib"));
    for (name, bytes, needle) in cases {
        let path = tmp.path().join(format!("{name}.bin"));
        std::fs::write(&path, &bytes).unwrap();
        let out = units(&store, &path, &tmp.path().join(name), &["--layer", "3"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(&*path.to_string_lossy()), "{name}: {err}");
        assert!(err.contains(needle), "{name}: expected {needle:?} in {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: {err}");
    }
}

/// Sealed shards under `store` so far.
fn seals(store: &Path) -> usize {
    std::fs::read_dir(store.join("shards")).map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".seal.json"))
            .count()
    })
}

/// `units` killed with SIGKILL mid-run and run again gives the bytes of an uninterrupted run.
#[test]
fn killed_units_resumes_to_the_bytes_of_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("feats");
    write_store(&store, 600, Dtype::F16);
    let km = kmeans_fixture("mbk_f64.joblib.bin");
    let args = |out: &Path| -> Vec<String> {
        [
            "units",
            "--quiet",
            "--data",
            s(&store),
            "--kmeans",
            s(&km),
            "--layer",
            "3",
            "--out",
            s(out),
            "--shard-size",
            "1KiB",
            "--jobs",
            "1",
            "--dedup",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let full = tmp.path().join("full");
    ok(&bin().args(args(&full)).output().unwrap());
    let shards = std::fs::read_dir(full.join("shards")).unwrap().count();
    assert!(shards > 20, "{shards} shards");
    let killed = tmp.path().join("killed");
    let mut interrupted = 0;
    for at in [3, 12] {
        let mut child = bin().args(args(&killed)).spawn().unwrap();
        let started = std::time::Instant::now();
        while seals(&killed) < at
            && started.elapsed().as_secs() < 60
            && child.try_wait().unwrap().is_none()
        {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if !killed.join("meta.json").exists() {
            interrupted += 1;
        }
    }
    assert!(interrupted > 0, "every run finished before it was killed");
    ok(&bin().args(args(&killed)).output().unwrap());
    common::assert_same_tree(&killed, &full);
}
