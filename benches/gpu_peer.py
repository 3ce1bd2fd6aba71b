#!/usr/bin/env python3
"""Helpers of benches/gpu_check.sh that need Python (torch, numpy, transformers).

  gpu_peer.py extract --device cuda:0 --size base --dtypes f32,f16,bf16 --batches 1,2,4,8,16
      transformers 4.46.3 on the GPU, the shapes `speechcache bench extract` runs: random weights
      from a real config, 10 s chunks, output_hidden_states=True, every hidden state converted
      to f16 and copied to the host (what a cache stores). One line per (dtype, batch):
      `peer size=base dtype=f16 batch=4 audio_s=640 wall_s=0.12 x_realtime=5333.3 peak_mb=812`
  gpu_peer.py random-model DIR
      a wav2vec2-base with random weights (transformers' own init), saved as DIR/model.safetensors
      + config.json + preprocessor_config.json, for the finetune benchmark's feature store.
  gpu_peer.py noise-corpus DIR --utts N
      N utterances of 16 kHz noise (2-10 s, seeded) with random 80-character transcripts and
      DIR/train.jsonl for `speechcache prepare`: the finetune benchmark's shapes without
      espeak-ng or network.
"""
import argparse
import json
import os
import sys
import time
import wave

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
             feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)


def extract(a):
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = Wav2Vec2Model(Wav2Vec2Config(**(BASE if a.size == "base" else LARGE))).eval()
    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    chunk = int(a.chunk * 16000)
    for name in a.dtypes.split(","):
        m = model.to(dev, dtypes[name])
        for batch in [int(b) for b in a.batches.split(",")]:
            n = max(batch * a.min_batches, int(a.seconds // a.chunk))
            n -= n % batch
            audio = (torch.randn(n, chunk) * 0.1).to(dev, dtypes[name])
            with torch.inference_mode():
                m(audio[:batch], output_hidden_states=True)  # warm-up at this batch size
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                t0 = time.perf_counter()
                for i in range(0, n, batch):
                    out = m(audio[i:i + batch], output_hidden_states=True)
                    _ = [h.to(torch.float16).cpu() for h in out.hidden_states]
                torch.cuda.synchronize(dev)
                wall = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(dev) / 2**20
            print(f"peer size={a.size} dtype={name} batch={batch} audio_s={n * a.chunk:.0f} "
                  f"wall_s={wall:.3f} x_realtime={n * a.chunk / wall:.1f} peak_mb={peak:.0f}", flush=True)
            del audio


def random_model(a):
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(a.dir, safe_serialization=True)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(a.dir)


def noise_corpus(a):
    import numpy as np

    rng = np.random.default_rng(1)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(0x4E00 + i) for i in range(54)]
    os.makedirs(os.path.join(a.dir, "wav"), exist_ok=True)
    rows = []
    for i in range(a.utts):
        n = int(rng.uniform(2.0, 10.0) * 16000)
        x = (rng.standard_normal(n) * 0.1 * 32767).clip(-32767, 32767).astype("<i2")
        path = os.path.abspath(os.path.join(a.dir, "wav", f"utt{i:05d}.wav"))
        with wave.open(path, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(x.tobytes())
        text = "".join(rng.choice(chars, size=int(n / 16000 * 3)))
        rows.append({"id": f"utt{i:05d}", "path": path, "text": text, "speaker": f"s{i % 10}"})
    with open(os.path.join(a.dir, "train.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--device", default="cuda:0")
    e.add_argument("--size", default="base", choices=["base", "large"])
    e.add_argument("--dtypes", default="f32,f16,bf16")
    e.add_argument("--batches", default="1,2,4,8,16")
    e.add_argument("--seconds", type=float, default=320)
    e.add_argument("--chunk", type=float, default=10)
    e.add_argument("--min-batches", type=int, default=4)
    r = sub.add_parser("random-model")
    r.add_argument("dir")
    c = sub.add_parser("noise-corpus")
    c.add_argument("dir")
    c.add_argument("--utts", type=int, default=300)
    a = ap.parse_args()
    {"extract": extract, "random-model": random_model, "noise-corpus": noise_corpus}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
