#!/usr/bin/env python3
"""PyTorch baseline for the SSL-base finetuning shape (manifests/conf/ssl_base_conformer.toml):
the layer-wise hidden states of a wav2vec2/HuBERT base model (13 layers x 768 dims at 50
frames/s), read straight from a speechcache feature store with numpy (the documented store
format: index.jsonl + shards/NNNNN/layer_LL.npy), -> learnable softmax-weighted sum of the
layers (s3prl featurizer) -> utterance MVN -> Linear 768->80 (ESPnet linear preencoder) ->
ESPnet Conv2dSubsampling2 (3x3 s2, ReLU, 3x3 s1, ReLU, Linear; time / 2) -> torchaudio
Conformer (12 blocks of 256, 4 heads, ffn 1024, kernel 31, dropout 0.1) -> CTC; Adam with
Noam warm-up, SpecAugment masks, clipping at 5, 2 threads, for a wall-clock budget or a number
of steps. Same batching rule and printout as ../shared/peers/peer_finetune.py: the last line
holds epochs, steps, training frames/s (input frames of optimizer steps per second of the
training loop: start-up excluded, per-epoch dev scoring included), dev CER and the time to the
first optimizer step.

usage: peer_finetune_ssl.py --train STORE --dev STORE [--minutes M] [--max-frames 4000]
Needs torch 2.5.1 and torchaudio (../shared/peers/setup.sh --torch).
"""
import argparse, json, math, os, random, time
T0 = time.perf_counter()
import numpy as np, torch
from torchaudio.models import Conformer


def load_store(path):
    """Every utterance as ([L, T, D] float32, transcript characters)."""
    meta = json.load(open(os.path.join(path, "meta.json")))
    layers = meta["layers"]
    shards = {}
    items = []
    for line in open(os.path.join(path, "index.jsonl"), encoding="utf-8"):
        row = json.loads(line)
        s = row["shard"]
        if s not in shards:
            shards[s] = [np.load(os.path.join(path, "shards", f"{s:05d}", f"layer_{l:02d}.npy"), mmap_mode="r")
                         for l in layers]
        o, n = row["offset"], row["length"]
        feats = np.stack([np.asarray(a[o:o + n], dtype=np.float32) for a in shards[s]])
        items.append((feats, [c for c in row.get("text", "") if not c.isspace()]))
    return items


class Model(torch.nn.Module):
    def __init__(self, vocab, layers, dim, pre=80, d=256, blocks=12):
        super().__init__()
        self.weights = torch.nn.Parameter(torch.zeros(layers))
        self.pre = torch.nn.Linear(dim, pre)
        self.sub = torch.nn.Sequential(torch.nn.Conv2d(1, d, 3, 2), torch.nn.ReLU(), torch.nn.Conv2d(d, d, 3, 1), torch.nn.ReLU())
        f = (pre - 1) // 2 - 2
        self.proj = torch.nn.Linear(d * f, d)
        self.enc = Conformer(input_dim=d, num_heads=4, ffn_dim=1024, num_layers=blocks, depthwise_conv_kernel_size=31, dropout=0.1)
        self.out = torch.nn.Linear(d, vocab)

    def forward(self, x, lens):  # x: [B, L, T, D]
        w = self.weights.softmax(0)
        x = torch.einsum("l,bltd->btd", w, x)
        mask = (torch.arange(x.shape[1])[None, :] < lens[:, None]).float()[..., None]
        n = lens.clamp(min=1).float()[:, None, None]
        mean = (x * mask).sum(1, keepdim=True) / n
        var = (((x - mean) * mask) ** 2).sum(1, keepdim=True) / n
        x = (x - mean) / (var + 1e-6).sqrt()
        x = self.sub(self.pre(x).unsqueeze(1))
        b, c, t, f = x.shape
        x = self.proj(x.transpose(1, 2).reshape(b, t, c * f))
        lens = ((lens - 1) // 2 - 2).clamp(min=1, max=t)
        x, lens = self.enc(x, lens)
        return self.out(x).log_softmax(-1), lens


def batches(items, max_frames, rng):
    order = sorted(range(len(items)), key=lambda i: items[i][0].shape[1])
    out, cur, longest = [], [], 0
    for i in order:
        longest = max(longest, items[i][0].shape[1])
        if cur and longest * (len(cur) + 1) > max_frames:
            out.append(cur); cur, longest = [], items[i][0].shape[1]
        cur.append(i)
    if cur: out.append(cur)
    rng.shuffle(out); return out


def collate(items, idx, vocab, specaug, rng):
    feats = [torch.from_numpy(items[i][0]) for i in idx]  # [L, T, D]
    if specaug:
        feats = [f.clone() for f in feats]
        for f in feats:
            for _ in range(2):
                w = rng.randint(0, 27); s = rng.randint(0, f.shape[2] - w); f[:, :, s:s + w] = 0
            for _ in range(5):
                w = rng.randint(0, max(0, f.shape[1] // 20)); s = rng.randint(0, max(0, f.shape[1] - w)); f[:, s:s + w] = 0
    lens = torch.tensor([f.shape[1] for f in feats])
    x = torch.nn.utils.rnn.pad_sequence([f.transpose(0, 1) for f in feats], batch_first=True).transpose(1, 2)
    ys = [torch.tensor([vocab.get(c, 1) for c in items[i][1]]) for i in idx]
    return x.contiguous(), lens, torch.cat(ys), torch.tensor([len(y) for y in ys])


def cer(model, items, vocab, inv, max_frames):
    model.eval(); errs = total = 0
    with torch.no_grad():
        for idx in batches(items, max_frames, random.Random(0)):
            x, lens, _, _ = collate(items, idx, vocab, False, None)
            lp, olens = model(x, lens)
            for k, j in enumerate(idx):
                best = lp[k, :olens[k]].argmax(-1).tolist()
                hyp = [inv[t] for n, t in enumerate(best) if t != 0 and (n == 0 or t != best[n - 1])]
                ref = items[j][1]
                d = list(range(len(hyp) + 1))
                for r in ref:
                    prev, d[0] = d[0], d[0] + 1
                    for h in range(1, len(hyp) + 1):
                        prev, d[h] = d[h], min(d[h] + 1, d[h - 1] + 1, prev + (hyp[h - 1] != r))
                errs += d[-1]; total += len(ref)
    model.train(); return errs / max(total, 1)


def main():
    ap = argparse.ArgumentParser(); ap.add_argument("--train", required=True); ap.add_argument("--dev", required=True)
    ap.add_argument("--minutes", type=float, default=10); ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3); ap.add_argument("--max-frames", type=int, default=4000)
    a = ap.parse_args()
    torch.set_num_threads(2); torch.manual_seed(0); rng = random.Random(0)
    data = {"train": load_store(a.train), "dev": load_store(a.dev)}
    layers, dim = data["train"][0][0].shape[0], data["train"][0][0].shape[2]
    chars = sorted({c for _, t in data["train"] for c in t})
    vocab = {c: i + 2 for i, c in enumerate(chars)}; inv = {i: c for c, i in vocab.items()}; inv[1] = "<unk>"
    model = Model(len(vocab) + 2, layers, dim)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, betas=(0.9, 0.999))
    warm = 15000
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, math.sqrt(warm / (s + 1))))
    ctc = torch.nn.CTCLoss(zero_infinity=True)
    deadline = time.perf_counter() + a.minutes * 60
    steps = epochs = frames = 0; first_step = None; best = 2.0; t_train = time.perf_counter()
    done = False
    while not done:
        for idx in batches(data["train"], a.max_frames, rng):
            x, lens, y, ylens = collate(data["train"], idx, vocab, True, rng)
            lp, olens = model(x, lens)
            loss = ctc(lp.transpose(0, 1), y, olens, ylens)
            opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0); opt.step(); sched.step()
            steps += 1; frames += int(lens.sum())
            if first_step is None: first_step = time.perf_counter() - T0
            if time.perf_counter() > deadline or (a.max_steps and steps >= a.max_steps):
                done = True; break
        epochs += 1
        d = cer(model, data["dev"], vocab, inv, a.max_frames)
        print(f"epoch {epochs} steps {steps} loss {loss.item():.3f} dev_cer {d:.3f}", flush=True)
        best = min(best, d)
    train_s = time.perf_counter() - t_train
    print(f"params={sum(p.numel() for p in model.parameters())}")
    print(f"epochs={epochs} steps={steps} train_frames_per_s={frames / train_s:.0f} sec_per_epoch={train_s / max(epochs, 1):.1f} "
          f"dev_cer={best:.3f} test_cer=nan time_to_first_step_s={first_step:.1f}")


if __name__ == "__main__":
    main()
