"""Read speechcache stores from Python: numpy memory maps, an optional torch Dataset.

    from speechcache_reader import open_store
    store = open_store("cache/feats")          # refuses unfinished or newer stores
    x = store.layer("1272-128104-0000", 6)     # [T, D]; store.features(i) is [L, T, D]

With torch installed: `StoreDataset`, `LengthBucketSampler`, `collate_padded`.
"""
from .store import (
    FORMAT_VERSION,
    AudioStore,
    FeatureStore,
    StoreError,
    UnitsStore,
    bf16_to_float32,
    open_store,
)

__all__ = [
    "FORMAT_VERSION",
    "AudioStore",
    "FeatureStore",
    "StoreError",
    "UnitsStore",
    "bf16_to_float32",
    "open_store",
    "StoreDataset",
    "LengthBucketSampler",
    "collate_padded",
]

__version__ = "0.1.0"


def __getattr__(name):
    # torch is optional: its names are imported on first use
    if name in ("StoreDataset", "LengthBucketSampler", "collate_padded"):
        from . import torch_data

        return getattr(torch_data, name)
    raise AttributeError(f"module 'speechcache_reader' has no attribute {name!r}")
