#!/usr/bin/env python3
"""Synthesises the finetune benchmark corpus: Mandarin sentences spoken by espeak-ng (voice cmn,
several variants, pitches and speeds), 16 kHz mono WAV, split into train/dev/test, written both
as Kaldi data dirs (wav.scp + text, for ../shared/peers/peer_finetune.py) and as speechcache
JSON-lines manifests (train.jsonl, dev.jsonl, test.jsonl). The shape of the corpus in the
finetune issue: 1,200 / 100 / 100 utterances over an 80-character vocabulary.

Deterministic (fixed seed); reuses files that already exist. Needs espeak-ng and sox.
usage: make_finetune_corpus.py OUT_DIR [--train 1200] [--dev 100] [--test 100]
"""
import argparse, concurrent.futures, json, os, random, subprocess

# 80 common characters (digits, pronouns, verbs, nouns): enough to form varied sentences.
CHARS = ("的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去"
         "之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主")
VOICES = ["cmn+m1", "cmn+m2", "cmn+m3", "cmn+m4", "cmn+f1", "cmn+f2", "cmn+f3", "cmn+f4"]


def synth(job):
    path, text, voice, speed, pitch = job
    if os.path.exists(path):
        return
    tmp = path + ".tmp.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", tmp, text],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["sox", "-R", "-q", "-v", "0.8", tmp, "-r", "16000", "-c", "1", "-b", "16", path + ".part.wav"],
                   check=True)
    os.replace(path + ".part.wav", path)
    os.remove(tmp)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=1200)
    ap.add_argument("--dev", type=int, default=100)
    ap.add_argument("--test", type=int, default=100)
    a = ap.parse_args()
    assert len(CHARS) == 80, len(CHARS)
    rng = random.Random(20261203)
    wav_dir = os.path.join(a.out, "wav")
    os.makedirs(wav_dir, exist_ok=True)
    splits = {"train": a.train, "dev": a.dev, "test": a.test}
    jobs, rows = [], {s: [] for s in splits}
    for split, n in splits.items():
        for i in range(n):
            voice = rng.choice(VOICES)
            speed, pitch = rng.randint(140, 185), rng.randint(30, 70)
            text = "".join(rng.choice(CHARS) for _ in range(rng.randint(8, 24)))
            uid = f"{voice.replace('+', '_')}-{split}{i:04d}"
            path = os.path.abspath(os.path.join(wav_dir, uid + ".wav"))
            jobs.append((path, text, voice, speed, pitch))
            rows[split].append((uid, path, text, voice))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(synth, jobs))
    for split, items in rows.items():
        kaldi = os.path.join(a.out, split)
        os.makedirs(kaldi, exist_ok=True)
        with open(os.path.join(kaldi, "wav.scp"), "w", encoding="utf-8") as scp, \
                open(os.path.join(kaldi, "text"), "w", encoding="utf-8") as txt, \
                open(os.path.join(a.out, f"{split}.jsonl"), "w", encoding="utf-8") as js:
            for uid, path, text, voice in items:
                scp.write(f"{uid} {path}\n")
                txt.write(f"{uid} {text}\n")
                js.write(json.dumps({"id": uid, "path": path, "text": text, "speaker": voice},
                                    ensure_ascii=False) + "\n")
    print(f"corpus ready: {a.out} ({a.train} train / {a.dev} dev / {a.test} test)")


if __name__ == "__main__":
    main()
