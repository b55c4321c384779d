"""Speed and memory of noisy-label synthesis (`emseg noise`).

1. Pointwise modes (flip, sample, random) on the whole volume in memory: voxels/s against the
   unavoidable floor ``rng.random(n) < p`` on an array of the same size (one uniform per voxel),
   as a ratio, and the peak memory of one call (tracemalloc: numpy allocations, the input
   excluded). Times are CPU seconds of this process (``time.process_time``), best of
   ``--repeat``, the floor and the modes taking turns, so other processes sharing the core
   change neither much.
2. Morphology (dilate, skeleton) blockwise -- in memory and from disk to disk with
   ``noise_file`` -- against scikit-image called once on the whole array.
3. Peak memory (tracemalloc: numpy allocations) of ``noise_file`` on a volume larger than its
   blocks, against loading the whole volume and calling the core function on it.

Labels: binary mitochondria of the drosophila VNC stack (20 x 1024 x 1024) when it is found,
else a synthetic volume of the same shape.

    python benchmarks/noise_speed.py [--repeat 3] [--json /tmp/noise_speed.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, data_dir, machine  # noqa: E402

from emseg.noise import dilate, flip, random_labels, sample, skeleton  # noqa: E402
from emseg.noise.blockwise import (  # noqa: E402
    NoiseConfig,
    apply_noise,
    default_block_shape,
    halo_shape,
    noise_file,
    plan_noise_blocks,
    resolve_params,
)


def interleaved_best(fns: dict, repeat: int) -> dict[str, float]:
    """Best of ``repeat`` CPU times (process_time) of each function, the functions taking turns."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            gc.collect()
            t = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - t)
    return best


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def load_labels() -> tuple[np.ndarray, str]:
    root = data_dir()
    if root is not None:
        with h5py.File(root / "vnc_stack1.h5", "r") as fh:
            return (fh["label"][:] == 1).astype(np.uint8), "VNC stack1 mitochondria (label == 1)"
    from emseg.synthetic import make_volume

    vol = make_volume((20, 1024, 1024), rng=0)
    return (vol.label == 2).astype(np.uint8), "synthetic make_volume mitochondria (VNC data not found)"


def peak_mb(fn) -> tuple[float, object]:
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    out = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="best of N for the timings")
    ap.add_argument("--radius", type=int, default=3, help="dilation radius (per section)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file (e.g. under /tmp)")
    args = ap.parse_args()
    print("machine:", machine())
    print("cpu:", cpu_model())
    lab, what = load_labels()
    n = lab.size
    print(f"labels: {what}, shape {lab.shape}, {n / 1e6:.1f} M voxels, foreground {lab.mean():.3f}")

    # ------------------------------------------------------------------ 1. pointwise vs floor
    rng = np.random.default_rng(0)
    floor_name = "floor rng.random(n) < p"
    pointwise = {
        floor_name: lambda: rng.random(n) < 0.45,
        "flip p=0.45 (binary)": lambda: flip(lab, 0.45, rng=rng),
        "flip p=0.45 (K=5)": lambda: flip(lab, 0.45, n_classes=5, rng=rng),
        "sample p=0.1": lambda: sample(lab, 0.1, rng=rng),
        "random p=0.1": lambda: random_labels(lab.shape, 0.1, rng=rng, dtype=np.uint8),
    }
    times = interleaved_best(pointwise, args.repeat)
    results: dict[str, dict] = {}
    for name, fn in pointwise.items():
        peak, _ = peak_mb(fn)
        results[name] = {"seconds": times[name], "voxels_per_s": n / times[name],
                         "ratio": times[name] / times[floor_name], "peak_mb": peak}
    print(f"\n1. pointwise modes, whole array in memory (CPU seconds, best of {args.repeat}; "
          "ratio = time / floor time; peak = tracemalloc of one call)")
    print(f"   {'mode':<26} {'seconds':>8} {'Mvoxels/s':>10} {'x floor':>8} {'peak MiB':>9}")
    for name, r in results.items():
        print(f"   {name:<26} {r['seconds']:>8.3f} {r['voxels_per_s'] / 1e6:>10.1f} {r['ratio']:>8.2f} "
              f"{r['peak_mb']:>9.1f}")
    flip_peak = results["flip p=0.45 (binary)"]["peak_mb"]
    print(f"   flip p=0.45 on the whole volume ({lab.nbytes / 2**20:.0f} MiB of uint8 labels) "
          f"holds at most {flip_peak:.1f} MiB")

    # ------------------------------------------------------------------ 2. morphology
    from skimage.morphology import dilation, disk, skeletonize

    fp = disk(args.radius)[np.newaxis]
    block = default_block_shape(lab.shape)
    morph: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        src = Path(d) / "in.h5"
        with h5py.File(src, "w") as fh:
            fh.create_dataset("label", data=lab, chunks=(1, 512, 512), compression="gzip")
        cases = {
            f"dilate r={args.radius} per section": (
                "dilate", {"radius": args.radius, "per_section": True},
                lambda: dilation(lab, fp),
                lambda: dilate(lab, args.radius, per_section=True)),
            "skeleton per section": (
                "skeleton", {"per_section": True},
                lambda: np.stack([skeletonize(s.astype(bool)) for s in lab]),
                lambda: skeleton(lab)),
        }
        for name, (mode, params, peer, whole) in cases.items():
            peer_t = best_of(peer, 1 if mode == "skeleton" else args.repeat)
            expected = peer().astype(np.uint8)
            t0 = time.perf_counter()
            resolved = resolve_params(lab, mode, params)  # skeleton: the width scan for its halo
            scan_t = time.perf_counter() - t0
            blocks = plan_noise_blocks(lab.shape, mode, resolved, block)
            out = np.zeros_like(lab)
            mem_t = best_of(lambda: apply_noise(lab, out, mode, resolved, 0, blocks=blocks),
                            1 if mode == "skeleton" else args.repeat)
            whole_t = best_of(whole, 1)
            disk_t = best_of(lambda: noise_file(NoiseConfig(f"{src}:label", f"{d}/out.h5:x", mode, params,
                                                              overwrite=True)),
                             1 if mode == "skeleton" else args.repeat)
            with h5py.File(f"{d}/out.h5", "r") as fh:
                on_disk = fh["x"][...]
            morph[name] = {
                "skimage_whole_s": peer_t, "emseg_whole_s": whole_t, "emseg_blockwise_memory_s": mem_t,
                "emseg_blockwise_disk_s": disk_t, "param_scan_s": scan_t,
                "halo": list(halo_shape(mode, resolved, lab.ndim)),
                "blocks": len(blocks), "block_shape": list(block),
                "equal_to_skimage": bool(np.array_equal(out, expected) and np.array_equal(on_disk, expected)),
            }
    print(f"\n2. morphology: blockwise (blocks {block}, halo per mode) vs scikit-image on the whole array")
    print(f"   {'mode':<24} {'skimage':>8} {'core whole':>10} {'blockwise mem':>13} {'x skimage':>9} "
          f"{'disk->disk':>10} {'x skimage':>9} {'scan':>6} {'halo':>12} {'== skimage':>10}")
    for name, r in morph.items():
        print(f"   {name:<24} {r['skimage_whole_s']:>8.2f} {r['emseg_whole_s']:>10.2f} "
              f"{r['emseg_blockwise_memory_s']:>13.2f} {r['emseg_blockwise_memory_s'] / r['skimage_whole_s']:>9.2f} "
              f"{r['emseg_blockwise_disk_s']:>10.2f} {r['emseg_blockwise_disk_s'] / r['skimage_whole_s']:>9.2f} "
              f"{r['param_scan_s']:>6.2f} {str(tuple(r['halo'])):>12} {str(r['equal_to_skimage']):>10}")
    print("   (seconds; disk->disk = noise_file h5 -> h5 incl. reading, gzip writing and, for skeleton, "
          "the width scan that sets the halo; scan = that scan alone)")

    # ------------------------------------------------------------------ 3. memory
    memory: dict[str, dict] = {}
    small = (8, 256, 256)
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        src = Path(d) / "in.h5"
        with h5py.File(src, "w") as fh:
            fh.create_dataset("label", data=lab, chunks=(1, 256, 256), compression="gzip")
        vol_mb = lab.nbytes / 2**20
        for mode, params, core in [
            ("flip", {"p": 0.45}, lambda a: flip(a, 0.45, rng=0)),
            ("dilate", {"radius": args.radius, "per_section": True},
             lambda a: dilate(a, args.radius, per_section=True)),
            ("skeleton", {"per_section": True}, lambda a: skeleton(a)),
        ]:
            def whole():
                with h5py.File(src, "r") as fh:
                    data = fh["label"][...]
                return core(data).sum()

            whole_mb, _ = peak_mb(whole)
            row = {"volume_mb": vol_mb, "whole_peak_mb": whole_mb}
            for bs in (block, small):
                mb, _ = peak_mb(lambda: noise_file(NoiseConfig(f"{src}:label", f"{d}/o.h5:{mode}", mode, params,
                                                               block_shape=bs, overwrite=True)))
                row[f"blockwise_{'x'.join(map(str, bs))}_peak_mb"] = mb
            memory[mode] = row
    print(f"\n3. peak traced memory (tracemalloc, MiB) on a {vol_mb:.0f} MiB uint8 volume:"
          " whole = read all + core call")
    print(f"   {'mode':<10} {'whole':>8} {'blocks ' + 'x'.join(map(str, block)):>18} "
          f"{'blocks ' + 'x'.join(map(str, small)):>18}")
    for mode, r in memory.items():
        vals = list(r.values())
        print(f"   {mode:<10} {vals[1]:>8.1f} {vals[2]:>18.1f} {vals[3]:>18.1f}")

    if args.json:
        Path(args.json).write_text(json.dumps({"labels": what, "shape": list(lab.shape), "machine": machine(),
                                               "cpu": cpu_model(), "pointwise": results,
                                               "morphology": morph, "memory": memory}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
