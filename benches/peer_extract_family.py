#!/usr/bin/env python3
"""The extract step as a user runs it today, for any family transformers' AutoModel loads
(WavLM, data2vec-audio, wav2vec2, HuBERT): the model directory benches/extract_vs_peer.sh
saved, on CPU, output_hidden_states=True, batches of equal-length chunks of noise. The same
protocol and last line as ../shared/peers/peer_extract.py (which knows only wav2vec2/HuBERT).

usage: peer_extract_family.py --model DIR [--seconds 60] [--chunk 10] [--batch 4] [--threads 2]
"""
import argparse
import time

import torch
from transformers import AutoModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--chunk", type=float, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(a.model).eval()
    cfg = model.config
    size = f"h{cfg.hidden_size}xl{cfg.num_hidden_layers}"
    n_chunks = int(a.seconds // a.chunk)
    audio = torch.randn(n_chunks, int(a.chunk * 16000)) * 0.1
    with torch.inference_mode():
        model(audio[:1], output_hidden_states=True)  # warm-up
        t0 = time.perf_counter()
        for i in range(0, n_chunks, a.batch):
            out = model(audio[i:i + a.batch], output_hidden_states=True)
            _ = [h.to(torch.float16) for h in out.hidden_states]
        wall = time.perf_counter() - t0
    print(f"family={cfg.model_type} size={size} threads={a.threads} audio_s={n_chunks * a.chunk:.0f} "
          f"wall_s={wall:.2f} x_realtime={n_chunks * a.chunk / wall:.2f}")


if __name__ == "__main__":
    main()
