#!/usr/bin/env python3
"""scikit-learn's MiniBatchKMeans on the frames of one layer of a speechcache feature store, the
baseline for `speechcache kmeans` (benches/kmeans_vs_sklearn.sh).

  fit   STORE LAYER K --seed S --batch-size B --max-iter I --max-no-improvement M --n-init N
        loads every frame of the layer (as fairseq's simple_kmeans does), fits, prints one line
        `seconds=… load_s=… fit_s=… inertia=… frames=…` (inertia: sum over the frames)
  score STORE LAYER CENTROIDS.npy
        prints `inertia=… frames=…` of the given centroids over the same frames (squared
        Euclidean to the nearest centroid), the independent check of speechcache's own number

Pinned: scikit-learn 1.5.2, numpy from ../shared/peers (the versions are printed).
"""
import argparse, sys, time

t0 = time.perf_counter()
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 2)[0] + "/python")
from speechcache_reader import open_store


def frames(store, layer):
    with open_store(store) as s:
        return np.concatenate([np.asarray(s.layer(i, layer), dtype=np.float32) for i in range(len(s))])


def inertia(x, c):
    c_norms = (c.astype(np.float64) ** 2).sum(1)
    total = 0.0
    for i in range(0, len(x), 8192):
        b = x[i:i + 8192].astype(np.float64)
        d = (b ** 2).sum(1)[:, None] - 2 * b @ c.T.astype(np.float64) + c_norms[None, :]
        total += np.maximum(d.min(1), 0).sum()
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["fit", "score"])
    p.add_argument("store")
    p.add_argument("layer", type=int)
    p.add_argument("arg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=10000)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--max-no-improvement", type=int, default=100)
    p.add_argument("--n-init", type=int, default=3)
    a = p.parse_args()
    x = frames(a.store, a.layer)
    load_s = time.perf_counter() - t0
    if a.mode == "score":
        print(f"inertia={inertia(x, np.load(a.arg)):.6f} frames={len(x)}")
        return
    import sklearn
    from sklearn.cluster import MiniBatchKMeans
    assert sklearn.__version__ == "1.5.2", sklearn.__version__
    t1 = time.perf_counter()
    # fairseq examples/hubert/simple_kmeans/learn_kmeans.py's settings, except n_init
    km = MiniBatchKMeans(n_clusters=int(a.arg), init="k-means++", max_iter=a.max_iter,
                         batch_size=a.batch_size, tol=0.0, max_no_improvement=a.max_no_improvement,
                         n_init=a.n_init, reassignment_ratio=0.0, compute_labels=False,
                         random_state=a.seed)
    km.fit(x)
    fit_s = time.perf_counter() - t1
    total = inertia(x, km.cluster_centers_)
    print(f"seconds={time.perf_counter() - t0:.3f} load_s={load_s:.3f} fit_s={fit_s:.3f} "
          f"inertia={total:.6f} frames={len(x)} steps={km.n_steps_} sklearn={sklearn.__version__} "
          f"numpy={np.__version__}")


if __name__ == "__main__":
    main()
