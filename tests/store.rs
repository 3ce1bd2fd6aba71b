//! The store format, checked without the store's own reader: headers parsed by hand, data
//! compared with what was written, checksums recomputed with a bitwise CRC-32.
mod common;
use common::tree_bytes;
use ndarray::Array2;
use speechcache::store::{
    verify_store, AudioStore, Dtype, ErrorRow, FeatureStore, IndexRow, InputResult, ItemData,
    StoreKind, StoreWriter, WriterSpec,
};
use std::path::Path;

/// Reference CRC-32 (zlib polynomial), bit by bit.
fn crc32_reference(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Parses an .npy v1 header by hand: (descr, shape, data offset).
fn parse_npy(bytes: &[u8]) -> (String, Vec<u64>, usize) {
    assert_eq!(&bytes[..6], b"\x93NUMPY", "magic");
    assert_eq!(bytes[6], 1, "version 1.0");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let text = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(text.ends_with('\n'));
    assert!(text.contains("'fortran_order': False"));
    let descr = text
        .split("'descr': '")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap()
        .to_string();
    let shape_txt = text
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    (descr, shape, 10 + len)
}

fn tone(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32) * 0.01 * seed).sin() * 0.5)
        .collect()
}

fn audio_input(i: usize) -> InputResult {
    if i % 5 == 3 {
        return InputResult {
            items: vec![],
            errors: vec![ErrorRow {
                path: format!("f{i}.wav"),
                id: Some(format!("u{i}")),
                reason: "corrupt".into(),
            }],
        };
    }
    let samples = tone(1000 + 137 * i, 1.0 + i as f32);
    let row = IndexRow {
        id: format!("u{i}"),
        text: Some(format!("text {i}")),
        source: format!("f{i}.wav"),
        duration: samples.len() as f64 / 16000.0,
        ..Default::default()
    };
    InputResult {
        items: vec![(row, ItemData::Audio(samples))],
        errors: vec![],
    }
}

fn write_audio(dir: &Path, n: usize, stop_after: Option<usize>) -> bool {
    let mut w = StoreWriter::create_or_resume(
        dir,
        common::audio_writer_spec(8000, serde_json::json!({"a": 1})),
    )
    .unwrap();
    for i in w.next_input()..n {
        if Some(i) == stop_after {
            return false; // "killed": dropped without finish
        }
        w.push_input(i, audio_input(i)).unwrap();
    }
    w.finish().unwrap();
    true
}

#[test]
fn audio_store_layout_is_numpy_readable_and_checksummed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    write_audio(&dir, 12, None);
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("index.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let expected_ids: Vec<String> = (0..12)
        .filter(|i| i % 5 != 3)
        .map(|i| format!("u{i}"))
        .collect();
    assert_eq!(
        rows.iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>(),
        expected_ids
    );
    let errors = std::fs::read_to_string(dir.join("errors.jsonl")).unwrap();
    assert_eq!(errors.lines().count(), 2);
    assert!(errors.contains("\"reason\":\"corrupt\""));
    let mut shards_seen = std::collections::BTreeSet::new();
    for row in &rows {
        let shard = row["shard"].as_u64().unwrap();
        shards_seen.insert(shard);
        let bytes = std::fs::read(dir.join(format!("shards/{shard:05}.npy"))).unwrap();
        let (descr, shape, offset) = parse_npy(&bytes);
        assert_eq!(descr, "<f4");
        assert_eq!(offset % 64, 0);
        assert_eq!(bytes.len() - offset, shape[0] as usize * 4);
        let (o, n) = (
            row["offset"].as_u64().unwrap() as usize,
            row["length"].as_u64().unwrap() as usize,
        );
        let data = &bytes[offset + o * 4..offset + (o + n) * 4];
        assert_eq!(
            format!("{:08x}", crc32_reference(data)),
            row["checksum"].as_str().unwrap()
        );
        let i: usize = row["id"].as_str().unwrap()[1..].parse().unwrap();
        let expected = tone(1000 + 137 * i, 1.0 + i as f32);
        let got: Vec<f32> = data
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(got, expected);
    }
    assert!(
        shards_seen.len() > 2,
        "small shard size gives several shards"
    );
    // The library reader agrees, zero-copy.
    let store = AudioStore::open(&dir).unwrap();
    assert_eq!(store.len(), expected_ids.len());
    assert_eq!(store.samples(1), &tone(1137, 2.0)[..]);
    let report = verify_store(&dir).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(!dir.join("in_progress.json").exists());
}

#[test]
fn killed_writer_resumes_to_identical_store() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    write_audio(&full, 20, None);
    for stop in [1, 4, 9, 17] {
        let dir = tmp.path().join(format!("killed{stop}"));
        assert!(!write_audio(&dir, 20, Some(stop)));
        assert!(
            AudioStore::open(&dir).is_err(),
            "an unfinished store is not presented as complete"
        );
        // Leftover junk from the killed run: a half-written shard.
        std::fs::write(dir.join("shards/00099.npy.tmp"), b"partial").unwrap();
        assert!(write_audio(&dir, 20, None));
        assert_eq!(
            tree_bytes(&dir),
            tree_bytes(&full),
            "resume after input {stop}"
        );
    }
}

#[test]
fn a_run_killed_while_claiming_its_directory_resumes() {
    // What a kill -9 between taking the lock and writing `in_progress.json` can leave.
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    write_audio(&full, 5, None);
    let leftovers: [&[&str]; 3] = [
        &["writer.lock"],
        &["writer.lock", "shards/"],
        &["writer.lock", "shards/", "in_progress.json.tmp"],
    ];
    for (i, left) in leftovers.iter().enumerate() {
        let dir = tmp.path().join(format!("claim{i}"));
        std::fs::create_dir(&dir).unwrap();
        for name in left.iter() {
            match name.strip_suffix('/') {
                Some(sub) => std::fs::create_dir(dir.join(sub)).unwrap(),
                None => std::fs::write(dir.join(name), b"{\"pid\": 1").unwrap(),
            }
        }
        assert!(write_audio(&dir, 5, None), "{left:?}");
        assert_eq!(tree_bytes(&dir), tree_bytes(&full), "{left:?}");
    }
    // A non-empty shards/ that no store claims is not ours to take over.
    let dir = tmp.path().join("foreign_shards");
    std::fs::create_dir_all(dir.join("shards")).unwrap();
    std::fs::write(dir.join("shards/00000.npy"), b"x").unwrap();
    let err = StoreWriter::create_or_resume(
        &dir,
        common::audio_writer_spec(8000, serde_json::json!({"a": 1})),
    )
    .err()
    .expect("refused");
    assert!(
        err.to_string().contains("is not a speechcache store"),
        "{err}"
    );
}

#[test]
fn finished_store_is_not_redone_and_other_options_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    write_audio(&dir, 6, None);
    let w = StoreWriter::create_or_resume(
        &dir,
        common::audio_writer_spec(8000, serde_json::json!({"a": 1})),
    )
    .unwrap();
    assert!(w.is_complete());
    let err = StoreWriter::create_or_resume(
        &dir,
        common::audio_writer_spec(8000, serde_json::json!({"a": 2})),
    )
    .err()
    .expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("different options") && msg.contains("a: 1 in the store, 2 now"),
        "{msg}"
    );
    let mut spec = common::audio_writer_spec(8000, serde_json::json!({"a": 2}));
    spec.overwrite = true;
    let w = StoreWriter::create_or_resume(&dir, spec).unwrap();
    assert!(!w.is_complete());
    // A directory with foreign files is never taken over.
    let foreign = tmp.path().join("home");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("thesis.tex"), b"x").unwrap();
    let mut spec = common::audio_writer_spec(8000, serde_json::json!({}));
    spec.overwrite = true;
    assert!(StoreWriter::create_or_resume(&foreign, spec).is_err());
    assert!(foreign.join("thesis.tex").exists());
}

#[test]
fn verify_finds_a_flipped_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    write_audio(&dir, 6, None);
    let shard = dir.join("shards/00000.npy");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();
    let report = verify_store(&dir).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("checksum mismatch")),
        "{:?}",
        report.problems
    );
}

fn features(frames: usize, dim: usize, seed: f32) -> Array2<f32> {
    Array2::from_shape_fn((frames, dim), |(t, d)| {
        ((t * dim + d) as f32 * 0.37 + seed).sin() * (1.0 + d as f32)
    })
}

fn write_features(dir: &Path, dtype: Dtype, lengths: &[usize]) {
    write_features_as(dir, dtype, lengths, false)
}

/// As `write_features`; `encoded`: items come pre-encoded by the store's `FeatureEncoder` (as
/// extract's compute threads hand them over).
fn write_features_as(dir: &Path, dtype: Dtype, lengths: &[usize], encoded: bool) {
    let spec = WriterSpec {
        kind: StoreKind::Features,
        dtype,
        sample_rate: None,
        frame_rate: Some(50.0),
        dim: Some(6),
        layers: vec![0, 3, 7],
        options: serde_json::json!({"dtype": dtype}),
        source: serde_json::json!({}),
        extra: serde_json::Value::Null,
        shard_bytes: 400,
        overwrite: false,
    };
    let mut w = StoreWriter::create_or_resume(dir, spec).unwrap();
    for (i, &t) in lengths.iter().enumerate() {
        let layers: Vec<Array2<f32>> = (0..3).map(|l| features(t, 6, (i * 3 + l) as f32)).collect();
        let data = if encoded {
            let flat: Vec<&[f32]> = layers.iter().map(|l| l.as_slice().unwrap()).collect();
            w.feature_encoder().encode(&flat, t).unwrap()
        } else {
            ItemData::Features(layers)
        };
        let row = IndexRow {
            id: format!("u{i}"),
            source: "x".into(),
            duration: t as f64 / 50.0,
            ..Default::default()
        };
        w.push_input(
            i,
            InputResult {
                items: vec![(row, data)],
                errors: vec![],
            },
        )
        .unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn feature_store_round_trips_every_dtype() {
    let lengths = [5, 1, 9, 4, 12];
    for (dtype, tol_rel) in [
        (Dtype::F32, 0.0),
        (Dtype::F16, 1e-3),
        (Dtype::Bf16, 8e-3),
        (Dtype::Int8, 1.0 / 127.0),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("f");
        write_features(&dir, dtype, &lengths);
        let store = FeatureStore::open(&dir).unwrap();
        assert_eq!(store.layers(), &[0, 3, 7]);
        for (i, &t) in lengths.iter().enumerate() {
            for (l, &layer) in [0, 3, 7].iter().enumerate() {
                let got = store.to_array(i, layer).unwrap();
                let want = features(t, 6, (i * 3 + l) as f32);
                for (row_g, row_w) in got.rows().into_iter().zip(want.rows()) {
                    let peak = row_w.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for (g, w) in row_g.iter().zip(row_w.iter()) {
                        let bound = if dtype == Dtype::Int8 {
                            peak * tol_rel * 0.5 + 1e-6
                        } else {
                            w.abs() * tol_rel + 1e-7
                        };
                        assert!(
                            (g - w).abs() <= bound,
                            "{dtype:?} utt {i} layer {layer}: {g} vs {w}"
                        );
                    }
                }
            }
        }
        // Each layer file is its own numpy array [frames, dim].
        let bytes = std::fs::read(dir.join("shards/00000/layer_03.npy")).unwrap();
        let (descr, shape, _) = parse_npy(&bytes);
        assert_eq!(descr, dtype_descr(dtype));
        assert_eq!(shape[1], 6);
        assert!(verify_store(&dir).unwrap().problems.is_empty());
        // Padded batch: [B, L, T, D] with zeros past each length.
        let (batch, lens) = store
            .batch(&[1, 2], &[7, 0], &candle_core::Device::Cpu)
            .unwrap();
        assert_eq!(batch.dims(), &[2, 2, 9, 6]);
        assert_eq!(lens, vec![1, 9]);
        let flat: Vec<f32> = batch.flatten_all().unwrap().to_vec1().unwrap();
        let pad = &flat[6..9 * 6]; // utterance 1 (1 frame), layer 7, frames 1..9
        assert!(pad.iter().all(|v| *v == 0.0));
        let first = store.to_array(1, 7).unwrap();
        assert_eq!(&flat[..6], first.as_slice().unwrap());
    }
}

#[test]
fn pre_encoded_items_give_the_bytes_of_plain_ones() {
    let tmp = tempfile::tempdir().unwrap();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16, Dtype::Int8] {
        let plain = tmp.path().join(format!("plain-{dtype:?}"));
        let encoded = tmp.path().join(format!("encoded-{dtype:?}"));
        write_features_as(&plain, dtype, &[5, 9, 1, 12], false);
        write_features_as(&encoded, dtype, &[5, 9, 1, 12], true);
        for file in ["index.jsonl", "errors.jsonl"] {
            assert_eq!(
                std::fs::read(plain.join(file)).unwrap(),
                std::fs::read(encoded.join(file)).unwrap(),
                "{dtype:?} {file}"
            );
        }
        assert_eq!(
            tree_bytes(&plain.join("shards")),
            tree_bytes(&encoded.join("shards")),
            "{dtype:?} shards"
        );
        // per-item sums added per shard: the same statistics up to f64 rounding
        let (a, b) = (
            FeatureStore::open(&plain).unwrap(),
            FeatureStore::open(&encoded).unwrap(),
        );
        for layer in [0, 3, 7] {
            let (ma, sa) = a.stats(layer).unwrap();
            let (mb, sb) = b.stats(layer).unwrap();
            for (x, y) in ma.iter().chain(&sa).zip(mb.iter().chain(&sb)) {
                assert!(
                    (x - y).abs() <= 1e-12 * x.abs().max(1.0),
                    "{dtype:?} {x} {y}"
                );
            }
        }
    }
}

fn dtype_descr(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "<f4",
        Dtype::F16 => "<f2",
        Dtype::Bf16 => "<u2",
        Dtype::Int8 => "|i1",
        Dtype::Int16 => "<i2",
    }
}

#[test]
fn feature_stats_equal_a_direct_computation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("f");
    let lengths = [5, 1, 9, 4, 12];
    write_features(&dir, Dtype::F32, &lengths);
    let store = FeatureStore::open(&dir).unwrap();
    for (l, &layer) in [0usize, 3, 7].iter().enumerate() {
        let (mean, var) = store.stats(layer).unwrap();
        let mut all = Vec::new();
        for (i, &t) in lengths.iter().enumerate() {
            all.push(features(t, 6, (i * 3 + l) as f32));
        }
        for d in 0..6 {
            let values: Vec<f64> = all
                .iter()
                .flat_map(|a| a.column(d).to_vec())
                .map(|v| v as f64)
                .collect();
            let m = values.iter().sum::<f64>() / values.len() as f64;
            let v = values.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / values.len() as f64;
            assert!(
                (mean[d] - m).abs() < 1e-9 && (var[d] - v).abs() < 1e-6,
                "layer {layer} dim {d}"
            );
        }
    }
}
