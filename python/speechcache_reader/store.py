"""Reading a speechcache store: the format the Rust writer documents in `src/store/`.

STORE/meta.json     kind (audio | features | units), format_version, dtype, sample_rate or
                    frame_rate, layers, dim, totals
STORE/index.jsonl   one row per utterance: id, shard, offset, length, checksum, text, ...
STORE/shards/NNNNN.npy                 audio: 1-D <f4, utterances concatenated
                                       units: 1-D <i2 unit ids, one per frame, concatenated
STORE/units.km                         units: one line of space-separated ids per utterance
STORE/shards/NNNNN/layer_LL.npy        features: [frames, dim] per layer; f32 <f4, f16 <f2,
                                       bf16 <u2 (the high 16 bits of a float32), int8 |i1
STORE/shards/NNNNN/layer_LL.scale.npy  int8 only: <f4 [frames], value = q * scale
STORE/stats/layer_LL.npy               features: <f8 [2, dim], per-dim mean and variance

Shards are memory-mapped once; an utterance is a slice of them (no copy) where the stored
dtype is the one returned. The checksum of a row is the zlib CRC-32 of its stored bytes
(features: for each layer in order, its values then, for int8, its scales).
"""
import fcntl
import json
import os
import zlib

import numpy as np

#: The store layout this reader understands (`FORMAT_VERSION` in src/store/mod.rs).
FORMAT_VERSION = 1


class StoreError(Exception):
    """A store that cannot be read, with the path and the reason."""


def open_store(path, verify=False):
    """Opens an audio, feature or units store (by its `meta.json` kind).

    Refuses an unfinished store (`in_progress.json`: the run that writes it has not finished)
    and a store written in a newer format. `verify=True` checks every row's checksum.
    """
    meta = _load_meta(path)
    cls = {"audio": AudioStore, "features": FeatureStore, "units": UnitsStore}[meta["kind"]]
    store = cls(path, meta)
    if verify:
        store.verify()
    return store


def _refuse_if_being_written(path):
    """Refuses a store whose writer lock (`writer.lock`, flock) a live process holds."""
    lock_path = os.path.join(path, "writer.lock")
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreError(f"{lock_path}: cannot check the writer lock ({e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreError(
            f"{path}: is being written by a running speechcache process; read it when that run "
            "has finished"
        ) from None
    finally:
        os.close(fd)


def _take_read_lock(path):
    """A shared flock on meta.json, held while the store is open, as the Rust reader takes:
    `--overwrite` and `prune` refuse to pull the files of a store a reader has open."""
    meta_path = os.path.join(path, "meta.json")
    fd = os.open(meta_path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"{path}: is being replaced or pruned by a speechcache process; read it when that "
            "has finished"
        ) from None
    return fd


def _load_meta(path):
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise StoreError(f"{path}: no such store directory")
    _refuse_if_being_written(path)
    if os.path.exists(os.path.join(path, "in_progress.json")):
        raise StoreError(
            f"{path}: the run that writes this store has not finished (in_progress.json is "
            "there): rerun the same speechcache command to resume it, then read it"
        )
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        raise StoreError(f"{path}: not a speechcache store (no meta.json)")
    with open(meta_path, encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise StoreError(f"{meta_path}: invalid JSON ({e})") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {version} is newer than this reader understands "
            f"(version {FORMAT_VERSION}); upgrade speechcache_reader (pip install ./python from "
            "the speechcache that wrote it)"
        )
    if version < FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {version} is older than this reader's "
            f"{FORMAT_VERSION}; rebuild the store with the current speechcache"
        )
    if meta.get("kind") not in ("audio", "features", "units"):
        raise StoreError(f"{meta_path}: unknown store kind {meta.get('kind')!r}")
    return meta


def _read_index(path, meta):
    rows = []
    index = os.path.join(path, "index.jsonl")
    if not os.path.isfile(index):
        raise StoreError(
            f"{index}: is missing, but meta.json counts {meta['totals']['items']} utterances: "
            "the store is damaged"
        )
    with open(index, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise StoreError(f"{index}:{n}: invalid JSON ({e})") from None
    totals = meta.get("totals", {})
    if len(rows) != totals.get("items"):
        raise StoreError(
            f"{index}: holds {len(rows)} rows, but meta.json counts {totals.get('items')} "
            "utterances: the store is damaged"
        )
    for n, row in enumerate(rows, 1):
        if not 0 <= int(row["shard"]) < int(totals.get("shards", 0)):
            raise StoreError(f"{index}:{n}: shard {row['shard']} does not exist")
    return rows


class _Store:
    def __init__(self, path, meta):
        self.path = os.fspath(path)
        self.meta = meta
        self._read_lock = _take_read_lock(self.path)
        self.rows = _read_index(self.path, meta)
        self.ids = [r["id"] for r in self.rows]
        self._by_id = {id_: i for i, id_ in enumerate(self.ids)}
        self._shards = {}

    def __len__(self):
        return len(self.rows)

    def close(self):
        """Releases the shared read lock and the mapped shards."""
        self._shards.clear()
        if self._read_lock is not None:
            os.close(self._read_lock)
            self._read_lock = None

    def __del__(self):
        if getattr(self, "_read_lock", None) is not None:
            os.close(self._read_lock)
            self._read_lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def kind(self):
        return self.meta["kind"]

    @property
    def dtype(self):
        return self.meta["dtype"]

    def lengths(self):
        """Samples (audio) or frames (features) of every row, in order."""
        return [int(r["length"]) for r in self.rows]

    def index_of(self, key):
        """Row number of an id (or the number itself)."""
        if isinstance(key, (int, np.integer)):
            if not -len(self) <= key < len(self):
                raise IndexError(f"row {key} out of range ({len(self)} rows)")
            return int(key) % len(self)
        try:
            return self._by_id[key]
        except KeyError:
            raise KeyError(f"no utterance {key!r} in {self.path}") from None

    def _npy(self, relative):
        """A shard file, memory-mapped once."""
        mapped = self._shards.get(relative)
        if mapped is None:
            full = os.path.join(self.path, relative)
            try:
                mapped = np.load(full, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise StoreError(f"{full}: cannot map ({e})") from None
            self._shards[relative] = mapped
        return mapped

    def _slice(self, relative, row):
        array = self._npy(relative)
        start, length = int(row["offset"]), int(row["length"])
        if start + length > array.shape[0]:
            raise StoreError(
                f"{os.path.join(self.path, relative)}: row {row['id']!r} runs past the shard "
                f"({start}+{length} > {array.shape[0]})"
            )
        return array[start : start + length]

    def verify(self, rows=None):
        """Checks the checksum of each row (all when `rows` is None); raises on a mismatch."""
        for i in range(len(self)) if rows is None else [self.index_of(r) for r in rows]:
            row = self.rows[i]
            crc = 0
            for part in self._stored_parts(row):
                crc = zlib.crc32(np.ascontiguousarray(part).view(np.uint8).reshape(-1), crc)
            if f"{crc:08x}" != row["checksum"]:
                raise StoreError(
                    f"{self.path}: checksum mismatch for {row['id']!r} (shard {row['shard']}): "
                    f"stored {row['checksum']}, computed {crc:08x}; the shard is damaged"
                )


class AudioStore(_Store):
    """An audio store: mono float32 at `sample_rate`."""

    @property
    def sample_rate(self):
        return int(self.meta["sample_rate"])

    def _shard(self, row):
        return f"shards/{int(row['shard']):05d}.npy"

    def _stored_parts(self, row):
        return [self._slice(self._shard(row), row)]

    def audio(self, key, verify=False):
        """`[T]` float32 samples: a read-only view into the memory-mapped shard."""
        i = self.index_of(key)
        if verify:
            self.verify([i])
        return self._slice(self._shard(self.rows[i]), self.rows[i])

    __getitem__ = audio


class UnitsStore(_Store):
    """A units store (`speechcache units`): one int16 unit id per frame at `frame_rate`."""

    @property
    def frame_rate(self):
        return float(self.meta["frame_rate"])

    @property
    def clusters(self):
        return int(self.meta["options"]["clusters"])

    @property
    def layer(self):
        return int(self.meta["layers"][0])

    def _shard(self, row):
        return f"shards/{int(row['shard']):05d}.npy"

    def _stored_parts(self, row):
        return [self._slice(self._shard(row), row)]

    def units(self, key, verify=False):
        """`[T]` int16 unit ids: a read-only view into the memory-mapped shard."""
        i = self.index_of(key)
        if verify:
            self.verify([i])
        return self._slice(self._shard(self.rows[i]), self.rows[i])

    __getitem__ = units


class FeatureStore(_Store):
    """A feature store: `layers` hidden states of `dim` values per frame at `frame_rate`."""

    @property
    def layers(self):
        return list(self.meta["layers"])

    @property
    def dim(self):
        return int(self.meta["dim"])

    @property
    def frame_rate(self):
        return float(self.meta["frame_rate"])

    def _layer_file(self, row, layer, scale=False):
        suffix = ".scale.npy" if scale else ".npy"
        return f"shards/{int(row['shard']):05d}/layer_{layer:02d}{suffix}"

    def _stored_parts(self, row):
        parts = []
        for layer in self.layers:
            parts.append(self._slice(self._layer_file(row, layer), row))
            if self.dtype == "int8":
                parts.append(self._slice(self._layer_file(row, layer, scale=True), row))
        return parts

    def _check_layer(self, layer):
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not in {self.path} (layers: {self.layers})")

    def layer(self, key, layer, verify=False):
        """`[T, D]` of one layer. f32 and f16 are views into the memory-mapped shard (their
        stored dtype); bf16 and int8 are decoded to float32."""
        self._check_layer(layer)
        i = self.index_of(key)
        if verify:
            self.verify([i])
        row = self.rows[i]
        stored = self._slice(self._layer_file(row, layer), row)
        if self.dtype == "bf16":
            return bf16_to_float32(stored)
        if self.dtype == "int8":
            scale = self._slice(self._layer_file(row, layer, scale=True), row)
            return stored.astype(np.float32) * scale[:, None]
        return stored

    def features(self, key, layers=None, verify=False):
        """`[L, T, D]` of the given layers (all by default), stacked (a copy: shards are
        layer-major)."""
        layers = self.layers if layers is None else list(layers)
        i = self.index_of(key)
        if verify:
            self.verify([i])
        return np.stack([self.layer(i, layer) for layer in layers])

    def __getitem__(self, key):
        return self.features(key)

    def stats(self, layer):
        """(mean, variance) per dimension of a layer over the store, float64."""
        self._check_layer(layer)
        stats = np.load(os.path.join(self.path, "stats", f"layer_{layer:02d}.npy"))
        return stats[0], stats[1]


def bf16_to_float32(stored):
    """bfloat16 kept as uint16 → float32 (shift into the high half)."""
    return (np.asarray(stored, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
