"""speechcache_reader against stores the CLI wrote in this test run (tests/python.sh builds
them and passes their directory in SPEECHCACHE_TEST_STORES)."""
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from speechcache_reader import StoreError, bf16_to_float32, open_store

STORES = Path(os.environ.get("SPEECHCACHE_TEST_STORES", ""))
REPO = Path(__file__).resolve().parents[2]

if not (STORES / "audio" / "meta.json").exists():
    pytest.skip(
        "no stores: run tests/python.sh (it builds them with the CLI)", allow_module_level=True
    )


def raw_npy_slice(store, relative, row):
    """The row's values straight from the .npy file, read without the reader."""
    array = np.load(store / relative)
    return array[row["offset"] : row["offset"] + row["length"]]


def test_audio_rows_are_zero_copy_views_of_the_shards():
    store = open_store(STORES / "audio")
    assert store.kind == "audio" and store.sample_rate == 16000
    assert store.ids == ["1272-128104-0000", "1272-128104-0001", "2428-83705-0000"]
    assert store.rows[0]["text"] == "THE CACHE KEEPS EVERY FEATURE"
    for i, row in enumerate(store.rows):
        x = store.audio(i)
        assert x.dtype == np.float32 and x.shape == (row["length"],)
        assert np.shares_memory(x, store._npy(f"shards/{row['shard']:05d}.npy"))
        want = raw_npy_slice(STORES / "audio", f"shards/{row['shard']:05d}.npy", row)
        np.testing.assert_array_equal(x, want)
        assert abs(len(x) / 16000 - row["duration"]) < 1e-6
    np.testing.assert_array_equal(store["2428-83705-0000"], store.audio(2))
    store.verify()


def test_f32_and_f16_layers_are_views_and_match_each_other():
    f32 = open_store(STORES / "fbank_f32", verify=True)
    f16 = open_store(STORES / "fbank_f16", verify=True)
    assert f32.layers == [0] and f32.dim == 40 and f32.frame_rate == 100.0
    for i in range(len(f32)):
        a = f32.layer(i, 0)
        b = f16.layer(i, 0)
        assert a.dtype == np.float32 and b.dtype == np.float16
        assert np.shares_memory(a, f32._npy(f"shards/{f32.rows[i]['shard']:05d}/layer_00.npy"))
        np.testing.assert_allclose(b.astype(np.float32), a, rtol=2**-10, atol=1e-3)
        assert f32.features(i).shape == (1, len(a), 40)


def test_bf16_and_int8_are_decoded_to_float32():
    f32 = open_store(STORES / "fbank_f32")
    bf16 = open_store(STORES / "fbank_bf16", verify=True)
    int8 = open_store(STORES / "fbank_int8", verify=True)
    for i in range(len(f32)):
        want = np.asarray(f32.layer(i, 0))
        got = bf16.layer(i, 0)
        assert got.dtype == np.float32
        # bf16 keeps 8 significant bits: round-to-nearest is within 2^-9 relative
        np.testing.assert_allclose(got, want, rtol=2**-8, atol=1e-30)
        got = int8.layer(i, 0)
        assert got.dtype == np.float32
        half_step = np.abs(want).max(axis=1, keepdims=True) / 127 / 2
        assert np.all(np.abs(got - want) <= half_step * 1.001 + 1e-7)
    # the decoding rule itself: bf16 bits are the high half of a float32
    assert bf16_to_float32(np.array([0x3F80, 0xC000], dtype=np.uint16)).tolist() == [1.0, -2.0]


def test_many_layers_come_as_L_T_D_or_one_layer():
    store = open_store(STORES / "w2v", verify=True)
    assert len(store.layers) > 2
    x = store.features(0)
    assert x.shape == (len(store.layers), store.rows[0]["length"], store.dim)
    last = store.layers[-1]
    np.testing.assert_array_equal(x[-1], store.layer(0, last))
    two = store.features(0, layers=store.layers[:2])
    assert two.shape[0] == 2
    with pytest.raises(KeyError, match="layer 99 is not in"):
        store.layer(0, 99)
    mean, var = store.stats(last)
    assert mean.shape == (store.dim,) and np.all(var >= 0)


def test_checksums_catch_a_damaged_shard(tmp_path):
    copy = tmp_path / "audio"
    shutil.copytree(STORES / "audio", copy)
    store = open_store(copy, verify=True)
    row = store.rows[1]
    shard = copy / f"shards/{row['shard']:05d}.npy"
    data = bytearray(shard.read_bytes())
    header = len(data) - 4 * sum(r["length"] for r in store.rows if r["shard"] == row["shard"])
    data[header + 4 * (row["offset"] + 10)] ^= 0xFF
    shard.write_bytes(bytes(data))
    damaged = open_store(copy)
    damaged.verify([0, 2])
    with pytest.raises(StoreError, match="checksum mismatch for '1272-128104-0001'"):
        damaged.verify()
    with pytest.raises(StoreError, match="checksum mismatch"):
        damaged.audio(1, verify=True)
    with pytest.raises(StoreError, match="checksum mismatch"):
        open_store(copy, verify=True)


def test_unfinished_and_newer_stores_are_refused(tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(STORES / "audio", unfinished)
    (unfinished / "in_progress.json").write_text("{}")
    with pytest.raises(StoreError, match="has not finished .*rerun the same speechcache command"):
        open_store(unfinished)
    newer = tmp_path / "newer"
    shutil.copytree(STORES / "audio", newer)
    meta = json.loads((newer / "meta.json").read_text())
    meta["format_version"] = meta["format_version"] + 1
    (newer / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="format version 2 is newer than this reader"):
        open_store(newer)
    with pytest.raises(StoreError, match="not a speechcache store"):
        open_store(tmp_path)


try:
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(
    torch is None, reason="torch is not installed: the Dataset/sampler tests are skipped"
)


@needs_torch
def test_dataset_sampler_and_collate_batch_by_frames():
    from speechcache_reader import LengthBucketSampler, StoreDataset, collate_padded

    ds = StoreDataset(STORES / "fbank_f16", layer=0, float32=True)
    item = ds[1]
    assert item["id"] == "1272-128104-0001" and item["input"].dtype == torch.float32
    assert item["input"].shape == (item["length"], 40)
    lengths = ds.lengths()
    budget = max(lengths) * 2
    sampler = LengthBucketSampler(lengths, batch_frames=budget, shuffle=True, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_padded)
    for batch in loader:
        x, n = batch["inputs"], batch["lengths"]
        assert x.shape == (len(n), int(n.max()), 40)
        for j, length in enumerate(n.tolist()):
            ref = ds.store.layer(batch["ids"][j], 0).astype(np.float32)
            np.testing.assert_array_equal(x[j, :length].numpy(), ref)
            assert torch.all(x[j, length:] == 0)

    audio = StoreDataset(STORES / "audio")
    a = audio[0]["input"]
    assert a.dim() == 1 and a.dtype == torch.float32
    many = StoreDataset(STORES / "w2v")
    batch = collate_padded([many[0], many[1]])
    assert batch["inputs"].dim() == 4 and batch["inputs"].shape[2] == int(batch["lengths"].max())


@needs_torch
def test_the_readme_linear_probe_runs():
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Use the cache from your own PyTorch code", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 13
    last = open_store(STORES / "w2v").layers[-1]
    code = code.replace('"feats/train"', repr(str(STORES / "w2v"))).replace(
        "layer=6", f"layer={last}"
    )
    torch.manual_seed(0)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    ds, speakers, probe = scope["ds"], scope["speakers"], scope["probe"]
    torch.manual_seed(0)
    untrained = torch.nn.Linear(ds.store.dim, len(speakers))  # the probe's initial weights

    def loss_of(model):
        x = torch.cat([ds[i]["input"] for i in range(len(ds))])
        y = torch.cat([torch.full((ds[i]["length"],), speakers.index(ds[i]["speaker"])) for i in range(len(ds))])
        return torch.nn.functional.cross_entropy(model(x), y).item()

    with torch.no_grad():
        assert loss_of(probe) < loss_of(untrained) - 0.05


def test_a_lost_or_cut_index_and_a_locked_store_are_refused(tmp_path):
    import fcntl

    lost = tmp_path / "lost"
    shutil.copytree(STORES / "audio", lost)
    (lost / "index.jsonl").unlink()
    with pytest.raises(StoreError, match="is missing"):
        open_store(lost)

    cut = tmp_path / "cut"
    shutil.copytree(STORES / "audio", cut)
    lines = (cut / "index.jsonl").read_text().splitlines(keepends=True)
    (cut / "index.jsonl").write_text("".join(lines[:-1]))
    with pytest.raises(StoreError, match="meta.json counts"):
        open_store(cut)

    locked = tmp_path / "locked"
    shutil.copytree(STORES / "audio", locked)
    with open(locked / "writer.lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(StoreError, match="being written"):
            open_store(locked)
    assert len(open_store(locked)) == len(lines)


def test_units_store_rows_are_int16_views_and_match_units_km():
    store = open_store(STORES / "units")
    feats = open_store(STORES / "fbank_f32")
    assert store.kind == "units" and store.clusters == 8 and store.layer == 0
    assert store.ids == feats.ids
    lines = (STORES / "units" / "units.km").read_text().splitlines()
    assert len(lines) == len(store)
    centroids = np.load(STORES / "km" / "centroids.npy")
    for i, row in enumerate(store.rows):
        u = store.units(i)
        assert u.dtype == np.int16 and u.shape == (row["length"],)
        assert np.shares_memory(u, store._npy(f"shards/{row['shard']:05d}.npy"))
        assert [int(v) for v in lines[i].split()] == u.tolist()
        # each frame's unit is its nearest centroid (squared Euclidean, float64 here)
        x = feats.layer(i, 0).astype(np.float64)
        d = ((x[:, None, :] - centroids[None, :, :].astype(np.float64)) ** 2).sum(-1)
        assert (d[np.arange(len(u)), u] <= d.min(1) * (1 + 1e-5) + 1e-6).all()
    store.verify()
