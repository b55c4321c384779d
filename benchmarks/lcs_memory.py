"""Peak memory of one training step, label-conditioned (LCS) vs the multi-channel baseline.

For each class count K and each model, a fresh Python process builds the real training task
(``emseg.lcs.LCSTask`` on a temporary volume whose labels hold all K classes, with a patch-sized
atlas), the network and Adam, and measures one step (forward + loss + backward):

* ``tensor_peak`` (the primary figure): after one warm-up step (so the optimiser state and
  one-off caches exist), the next forward + backward runs under ``torch.profiler`` with
  ``profile_memory=True``. Every CPU tensor allocation and free is an event; their running sum
  from the start of the step gives the peak of extra tensor memory held during the step. This
  counts exactly what the step allocates, independent of how malloc returns memory to the system.
* ``rss_peak``: peak resident set size (``resource.getrusage(...).ru_maxrss``) during the first
  step, minus the resident size just before it (after the model and task were built). It also
  counts one-off allocations (kernel caches, optimiser state, allocator slack), so it is noisier.

Both use the same backbone, patch and batch for both models; only the output head (1 channel +
2-channel conditioning for LCS, K+1 channels for the baseline) and the loss differ.

``--infer`` measures inference instead: for each K a fresh process writes a checkpoint of an
(untrained) prototype-conditioned LCS network whose atlas holds K labels, and runs ``infer_file``
(``emseg lcs infer``) on a small random volume, once streaming the labels (``label_batch = 1``,
the default) and once with all K labels at once (``label_batch = K``, what inference held before).
Reported: peak RSS of the process (``ru_maxrss``) and its increase over the resident size just
before ``infer_file``.

Usage::

    python benchmarks/lcs_memory.py                       # K = 2, 10, 50, 95; 3D patch 16x64x64
    python benchmarks/lcs_memory.py --patch 1,128,128 --classes 2,95 --json-out /tmp/lcs_memory.json
    python benchmarks/lcs_memory.py --infer               # inference, volume 8x256x256, patch 1x64x64
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(mode: str, k: int, patch: tuple[int, ...], width: int, depth: int, batch: int) -> dict:
    import h5py
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from emseg.engine.config import config_from_dict
    from emseg.lcs import LCSTask, lcs_config_from_dict
    from emseg.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    shape = tuple(p * (1 if i == 0 and p == 1 else 2) for i, p in enumerate(patch))
    tmp = Path(tempfile.mkdtemp(prefix="lcs_memory_"))
    path = tmp / "data.h5"
    with h5py.File(path, "w") as fh:
        fh["raw"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        fh["label"] = rng.integers(0, k + 1, size=shape).astype(np.uint8)
    data = {"n_classes": k + 1, "patch_shape": list(patch), "batch_size": batch, "amp": False,
            "train": [{"raw": f"{path}:raw", "label": f"{path}:label"}],
            "model": {"depth": depth, "base_width": width, "norm": "batch"},
            "augment": {"flip": False, "rotate90": False, "brightness": 0.0, "contrast": 0.0}}
    config = config_from_dict(data)
    lcs = lcs_config_from_dict({"atlas_raw": f"{path}:raw", "atlas_label": f"{path}:label",
                                "atlas_offset": [0] * len(patch)}, n_classes=k + 1, baseline=mode == "baseline")
    task = LCSTask(config, lcs)
    model = build_model(task.model_config())
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(profiled: bool) -> int:
        optimizer.zero_grad(set_to_none=True)
        batch_data = task.batch(rng)
        if not profiled:
            task.loss(model, batch_data).backward()
            optimizer.step()
            return 0
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            task.loss(model, batch_data).backward()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        optimizer.step()
        return peak

    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    step(False)
    seconds = time.perf_counter() - t0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    tensor_peak = step(True)
    task.close()
    return {"mode": mode, "k": k, "tensor_peak_mb": tensor_peak / 2**20, "rss_peak_mb": rss_peak / 2**20,
            "step_s": seconds, "params": sum(p.numel() for p in model.parameters()),
            "out_channels": task.model_config()["out_channels"]}


def infer_child(k: int, label_batch: int, volume: tuple[int, ...], patch: tuple[int, ...], width: int,
                depth: int) -> dict:
    import h5py
    import numpy as np
    import torch

    from emseg.lcs import Atlas, InferConfig, infer_file
    from emseg.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="lcs_infer_memory_"))
    squeeze = len(patch) == 3 and patch[0] == 1
    net_patch = patch[1:] if squeeze else patch
    config = dict(ndim=len(net_patch), in_channels=1, out_channels=1, depth=depth, base_width=width, norm="batch",
                  cond_channels=2, conditioning="prototype")
    model = build_model(config)
    label = (np.arange(int(np.prod(net_patch))) % k + 1).reshape(net_patch)  # every label in the atlas
    atlas = Atlas(rng.random(net_patch).astype(np.float32), label.astype(np.int64), patch, (0,) * len(patch), patch)
    state = {"model": model.state_dict(), "model_config": config, "task": "lcs",
             "lcs": {"classes": list(range(1, k + 1)), "patch_shape": list(patch), "baseline": False,
                     "n_classes": k + 1, "conditioning": "prototype"}}
    state.update(atlas.to_state())
    torch.save(state, tmp / "model.pt")
    with h5py.File(tmp / "in.h5", "w") as fh:
        fh["raw"] = rng.integers(0, 256, size=volume, dtype=np.uint8)
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    result = infer_file(InferConfig(str(tmp / "model.pt"), f"{tmp / 'in.h5'}:raw", str(tmp / "out.zarr"),
                                    label_batch=label_batch, device="cpu"))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shutil.rmtree(tmp, ignore_errors=True)
    return {"k": k, "label_batch": label_batch, "peak_rss_mb": peak / 2**20,
            "rss_increase_mb": (peak - rss_before) / 2**20, "before_mb": rss_before / 2**20, "seconds": seconds,
            "blocks": result.blocks, "map_mb": int(np.prod(volume)) * 4 / 2**20}


def infer_main(args, ks: list[int]) -> int:
    volume = tuple(int(v) for v in args.volume.split(","))
    patch = tuple(int(p) for p in args.infer_patch.split(","))
    print(f"emseg lcs infer (infer_file), volume {volume} (one float32 map {np.prod(volume) * 4 / 2**20:.1f} MB), "
          f"patch {patch}, prototype U-Net depth {args.depth} width {args.width}; a fresh process per configuration")
    rows = []
    for mode in ("stream", "all"):
        for k in ks:
            lb = 1 if mode == "stream" else k
            cmd = [sys.executable, __file__, "--infer-child", str(k), str(lb), "--volume", args.volume,
                   "--infer-patch", args.infer_patch, "--width", str(args.width), "--depth", str(args.depth)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["mode"] = mode
            rows.append(row)
            print(f"label_batch={'1' if mode == 'stream' else 'K'} K={k:3d}  peak RSS {row['peak_rss_mb']:7.1f} MB  "
                  f"increase during inference {row['rss_increase_mb']:7.1f} MB  {row['seconds']:6.1f} s", flush=True)
    by = {(r["mode"], r["k"]): r for r in rows}
    k0, k1 = ks[0], ks[-1]
    summary = {}
    for mode in ("stream", "all"):
        ratio = by[(mode, k1)]["peak_rss_mb"] / by[(mode, k0)]["peak_rss_mb"]
        summary[f"{mode}_peak_rss_ratio_k{k1}_over_k{k0}"] = ratio
        print(f"label_batch={'1' if mode == 'stream' else 'K'}: peak RSS K={k1} / K={k0}: {ratio:.3f}")
    flat = summary[f"stream_peak_rss_ratio_k{k1}_over_k{k0}"] <= 1.1
    print(f"inference flat in K (peak RSS ratio <= 1.1): {'yes' if flat else 'NO'}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "summary": summary, "args": vars(args)}, indent=2))
    return 0 if flat else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", default="2,10,50,95", help="Class counts K to measure.")
    parser.add_argument("--patch", default="16,64,64", help="Training patch z,y,x (1,y,x for a 2D network).")
    parser.add_argument("--width", type=int, default=8, help="U-Net base width.")
    parser.add_argument("--depth", type=int, default=3, help="U-Net depth.")
    parser.add_argument("--batch", type=int, default=2, help="Patches per step.")
    parser.add_argument("--json-out", default=None, help="Also write the results as JSON here.")
    parser.add_argument("--infer", action="store_true", help="Measure inference (peak RSS) instead of training.")
    parser.add_argument("--volume", default="8,256,256", help="--infer: volume z,y,x.")
    parser.add_argument("--infer-patch", default="1,64,64", help="--infer: patch z,y,x (the atlas shape).")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--infer-child", nargs=2, metavar=("K", "LABEL_BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.infer_child:
        k, lb = (int(v) for v in args.infer_child)
        print(json.dumps(infer_child(k, lb, tuple(int(v) for v in args.volume.split(",")),
                                     tuple(int(p) for p in args.infer_patch.split(",")), args.width, args.depth)))
        return 0
    if args.infer:
        return infer_main(args, [int(k) for k in args.classes.split(",")])
    patch = tuple(int(p) for p in args.patch.split(","))
    if args.child:
        mode, k = args.child
        print(json.dumps(child(mode, int(k), patch, args.width, args.depth, args.batch)))
        return 0
    ks = [int(k) for k in args.classes.split(",")]
    print(f"one training step (forward + loss + backward), patch {patch}, batch {args.batch}, "
          f"U-Net depth {args.depth} width {args.width}; a fresh process per configuration")
    rows = []
    for mode in ("lcs", "baseline"):
        for k in ks:
            cmd = [sys.executable, __file__, "--child", mode, str(k), "--patch", args.patch, "--width",
                   str(args.width), "--depth", str(args.depth), "--batch", str(args.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{mode:8s} K={k:3d}  outputs {row['out_channels']:3d}  tensor peak {row['tensor_peak_mb']:8.1f} MB"
                  f"  RSS peak {row['rss_peak_mb']:8.1f} MB  first step {row['step_s']:.2f} s", flush=True)
    by = {(r["mode"], r["k"]): r for r in rows}
    k0, k1 = ks[0], ks[-1]
    summary = {}
    for mode in ("lcs", "baseline"):
        for metric in ("tensor_peak_mb", "rss_peak_mb"):
            ratio = by[(mode, k1)][metric] / by[(mode, k0)][metric]
            summary[f"{mode}_{metric}_ratio_k{k1}_over_k{k0}"] = ratio
            print(f"{mode:8s} {metric[:-3]:12s} K={k1} / K={k0}: {ratio:.3f}")
    for k in ks:
        ratio = by[("baseline", k)]["tensor_peak_mb"] / by[("lcs", k)]["tensor_peak_mb"]
        summary[f"baseline_over_lcs_tensor_peak_k{k}"] = ratio
        print(f"baseline / LCS tensor peak at K={k}: {ratio:.2f}")
    flat = summary[f"lcs_tensor_peak_mb_ratio_k{k1}_over_k{k0}"] <= 1.05
    print(f"LCS flat (tensor peak ratio <= 1.05): {'yes' if flat else 'NO'}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "summary": summary, "args": vars(args)}, indent=2))
    return 0 if flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
