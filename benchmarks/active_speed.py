"""Active-learning speed: k-center greedy (fast vs naive) and pool scoring (streaming vs stacking).

1. Core-set selection, N = 100,000 embeddings of D = 128 (float32), n = 200 picks with 100
   labelled centres: :func:`emseg.active.kcenter_greedy` (one matrix-vector product per pick on a
   running minimum) against :func:`emseg.active.selection.diversity.kcenter_greedy_naive` (an (N, D) difference
   array per centre). Both must pick the same samples.
2. Scoring a pool of patches of 128 x 128 with a small U-Net (depth 3, base width 8), entropy
   (512 patches, one pass) and BALD (128 patches, T = 10 passes):
   :func:`emseg.active.score_pool` (batch by batch, only (N,) scores kept) against a baseline
   that first stacks all probabilities ((N, C, Y, X), or (T, N, C, Y, X) for BALD) and then
   applies :func:`emseg.active.entropy` / :func:`emseg.active.bald`. Each variant runs in a fresh
   process so its peak resident memory can be measured (ru_maxrss minus the RSS just before
   scoring).

Usage::

    python benchmarks/active_speed.py [--threads 1] [--json-out /tmp/active_speed.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

N_EMB, DIM, PICKS, LABELLED = 100_000, 128, 200, 100
POOL_PATCHES = {"entropy": 512, "bald": 128}
PATCH, T_MC, BATCH = 128, 10, 8


def _rss_kb() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def bench_kcenter() -> dict:
    from emseg.active import kcenter_greedy
    from emseg.active.selection.diversity import kcenter_greedy_naive

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_EMB, DIM, generator=gen)
    lab = torch.randperm(N_EMB, generator=gen)[:LABELLED]
    kcenter_greedy(x[:1000], 5)  # warm-up
    t0 = time.perf_counter()
    fast = kcenter_greedy(x, PICKS, labeled_idx=lab)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = kcenter_greedy_naive(x, PICKS, labeled_idx=lab)
    t_naive = time.perf_counter() - t0
    same = int((fast == naive).sum())
    return {"n": N_EMB, "d": DIM, "picks": PICKS, "labelled": LABELLED, "fast_s": t_fast, "naive_s": t_naive,
            "speedup": t_naive / t_fast, "same_picks": same, "identical": bool(torch.equal(fast, naive))}


def _setup(n_patches: int):
    from emseg.active import build_pool
    from emseg.models import UNet

    torch.manual_seed(0)
    net = UNet(ndim=2, out_channels=2, depth=3, base_width=8, dropout=0.2).eval()
    vol = (np.random.default_rng(0).random((n_patches, PATCH, PATCH)) * 255).astype(np.uint8)
    pool = build_pool([vol.shape], (1, PATCH, PATCH))
    return net, vol, pool


def _stacked_scores(net, vol, pool, strategy: str) -> np.ndarray:
    """Baseline: keep every probability map, then score all at once."""
    from emseg.active import bald, entropy
    from emseg.data import to_float
    from emseg.models import set_mc_dropout

    chunks = []
    with torch.no_grad():
        for b0 in range(0, len(pool), BATCH):
            x = torch.from_numpy(np.stack([to_float(vol[pool.box(i).slices()])[0]
                                           for i in range(b0, min(b0 + BATCH, len(pool)))])[:, None])
            if strategy == "bald":
                set_mc_dropout(net, True)
                chunks.append(torch.stack([torch.softmax(net(x), 1) for _ in range(T_MC)]))  # (T, B, C, Y, X)
            else:
                net.eval()
                chunks.append(torch.softmax(net(x), 1))
        net.eval()
        if strategy == "bald":
            allp = torch.cat(chunks, dim=1)  # (T, N, C, Y, X)
            del chunks
            return bald(allp).double().numpy()
        allp = torch.cat(chunks, dim=0)  # (N, C, Y, X)
        del chunks
        return entropy(allp).double().numpy()


def worker(mode: str, strategy: str, threads: int) -> None:
    torch.set_num_threads(threads)
    from emseg.active import score_pool

    net, vol, pool = _setup(POOL_PATCHES[strategy])
    with torch.no_grad():  # warm-up outside the measurement
        net(torch.zeros(1, 1, PATCH, PATCH))
    torch.manual_seed(1)
    before = _rss_kb()
    t0 = time.perf_counter()
    if mode == "stream":
        scores = score_pool(net, pool, [vol], strategy, mc_samples=T_MC, batch_size=BATCH).scores
    else:
        scores = _stacked_scores(net, vol, pool, strategy)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "scores": scores.tolist()}))


def bench_scoring(threads: int) -> dict:
    out = {}
    for strategy in ("entropy", "bald"):
        runs = {}
        for mode in ("stream", "stack"):
            proc = subprocess.run([sys.executable, __file__, "--worker", mode, strategy, "--threads", str(threads)],
                                  capture_output=True, text=True, check=True)
            runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        passes = T_MC if strategy == "bald" else 1
        n = POOL_PATCHES[strategy]
        diff = float(np.max(np.abs(np.array(runs["stream"]["scores"]) - np.array(runs["stack"]["scores"]))))
        out[strategy] = {
            "patches": n, "passes": passes,
            "stream_patches_per_s": n / runs["stream"]["seconds"],
            "stack_patches_per_s": n / runs["stack"]["seconds"],
            "stream_peak_mib": runs["stream"]["peak_mib"], "stack_peak_mib": runs["stack"]["peak_mib"],
            "stacked_probabilities_mib": passes * n * 2 * PATCH * PATCH * 4 / 2**20,
            "max_abs_score_diff": diff,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json-out", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.threads)
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    kc = bench_kcenter()
    print(f"k-center greedy N={kc['n']} D={kc['d']} n={kc['picks']} (+{kc['labelled']} labelled): "
          f"fast {kc['fast_s']:.2f} s, naive {kc['naive_s']:.2f} s, speed-up x{kc['speedup']:.1f}, "
          f"same picks {kc['same_picks']}/{kc['picks']}")
    sc = bench_scoring(args.threads)
    for name, r in sc.items():
        print(f"{name:8s} scoring {r['patches']} patches 128x128 ({r['passes']} pass(es) each): "
              f"streaming {r['stream_patches_per_s']:.1f} patches/s, peak +{r['stream_peak_mib']:.0f} MiB; "
              f"stacking {r['stack_patches_per_s']:.1f} patches/s, peak +{r['stack_peak_mib']:.0f} MiB "
              f"(stacked maps alone {r['stacked_probabilities_mib']:.0f} MiB); "
              f"max |score diff| {r['max_abs_score_diff']:.2e}")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"kcenter": kc, "scoring": sc, "threads": args.threads}, fh, indent=2)


if __name__ == "__main__":
    main()
