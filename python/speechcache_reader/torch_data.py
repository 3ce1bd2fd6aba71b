"""PyTorch side: a Dataset over a store, a length-bucketing batch sampler and a padding
collate. Imported only when torch is installed."""
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .store import AudioStore, open_store


class StoreDataset(Dataset):
    """Items of an audio or feature store as dicts: `id`, `input` (a tensor: `[T]` audio,
    `[T, D]` for one `layer`, or `[L, T, D]` for `layers`), `length` (T), `text`, `speaker`.

    f32 inputs share memory with the memory-mapped shard where torch allows (read-only);
    f16 stays f16 unless `float32=True`; bf16 and int8 are decoded to float32.
    """

    def __init__(self, store, layer=None, layers=None, float32=False):
        self.store = open_store(store) if not hasattr(store, "rows") else store
        if layer is not None and layers is not None:
            raise ValueError("give layer or layers, not both")
        self.layer = layer
        self.layers = layers
        self.float32 = float32

    def __len__(self):
        return len(self.store)

    def lengths(self):
        return self.store.lengths()

    def __getitem__(self, i):
        row = self.store.rows[i]
        if isinstance(self.store, AudioStore):
            array = self.store.audio(i)
        elif self.layer is not None:
            array = self.store.layer(i, self.layer)
        else:
            array = self.store.features(i, self.layers)
        if self.float32 and array.dtype != np.float32:
            array = array.astype(np.float32)
        # torch warns on read-only memory; the tensor is only read, so no copy is made
        tensor = _readonly_tensor(array) if not array.flags.writeable else torch.from_numpy(array)
        return {
            "id": row["id"],
            "input": tensor,
            "length": int(row["length"]),
            "text": row.get("text"),
            "speaker": row.get("speaker"),
        }


def _readonly_tensor(array):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


class LengthBucketSampler(Sampler):
    """Batches of similar length, as `speechcache finetune` makes them: rows sorted by length,
    then grouped while (batch size × longest length) stays within `batch_frames`; a row longer
    than that is a batch of its own. The grouping is fixed; with `shuffle`, the order of the
    batches changes per epoch (`set_epoch`), drawn from `seed` and the epoch."""

    def __init__(self, lengths, batch_frames, shuffle=False, seed=0):
        if batch_frames <= 0:
            raise ValueError("batch_frames must be positive")
        self.lengths = [int(n) for n in lengths]
        self.batch_frames = int(batch_frames)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.batches = self._group()

    def _group(self):
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], i))
        batches, current = [], []
        for i in order:
            if current and (len(current) + 1) * max(self.lengths[i], 1) > self.batch_frames:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = list(range(len(self.batches)))
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            rng.shuffle(order)
        for b in order:
            yield list(self.batches[b])

    def __len__(self):
        return len(self.batches)


def collate_padded(items, pad_value=0.0):
    """Pads `input` along time (axis 0 for `[T]`/`[T, D]`, axis 1 for `[L, T, D]`) to the
    longest item: returns `inputs` `[B, ...]`, `lengths` (int64 `[B]`), `ids`, `texts`,
    `speakers`."""
    lengths = torch.tensor([it["length"] for it in items], dtype=torch.int64)
    longest = int(lengths.max()) if len(items) else 0
    first = items[0]["input"]
    time_axis = 1 if first.dim() == 3 else 0
    shape = list(first.shape)
    shape[time_axis] = longest
    inputs = torch.full([len(items)] + shape, pad_value, dtype=first.dtype)
    for b, it in enumerate(items):
        x = it["input"]
        if time_axis == 0:
            inputs[b, : x.shape[0]] = x
        else:
            inputs[b, :, : x.shape[1]] = x
    return {
        "inputs": inputs,
        "lengths": lengths,
        "ids": [it["id"] for it in items],
        "texts": [it["text"] for it in items],
        "speakers": [it["speaker"] for it in items],
    }
