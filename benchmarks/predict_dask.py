"""Blockwise prediction throughput: in-process vs dask.distributed LocalCluster (1 and 2 workers).

1. ``emseg predict`` on a crop of the VNC stack (``raw``, default 4 x 512 x 512; a synthetic
   volume of that shape when the data are absent) with a randomly initialised 2D U-Net (depth 3,
   base width 12, 5 classes; throughput does not depend on the weights), patch 1 x 128 x 128,
   blocks 2 x 256 x 256, probabilities into zarr:

   * in-process (:func:`emseg.semantic.predict.predict_file` without a scheduler), torch with one thread
     (the reference of the ratios: workers use one thread each) and with its default thread count
     (run once, warm);
   * a LocalCluster of 1 and of 2 worker processes (one thread each), through
     :func:`emseg.semantic.predict.predict_file` with an already started client.

   Each configuration runs once cold, then ``--repeats`` times warm (model loaded, kernels
   initialised; the default-thread one only once): the median warm time is the throughput figure. Cluster start-up time is reported apart.
   The cluster outputs are checked to equal the one-thread in-process output exactly.
2. Scheduling overhead per block: :func:`emseg.engine.cluster.run_blocks` over 400 no-op blocks on
   the 2-worker cluster, with and without done markers, and in-process for comparison.

Usage::

    python benchmarks/predict_dask.py [--shape 4,512,512] [--repeats 3] [--json-out /tmp/predict_dask.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import data_dir, machine  # noqa: E402

from emseg.models.checkpoint import save_checkpoint  # noqa: E402
from emseg.engine.cluster import DoneMarkers, open_client, run_blocks  # noqa: E402
from emseg.engine.blocks import plan_blocks  # noqa: E402
from emseg.io import create_volume, open_volume  # noqa: E402
from emseg.models import build_model  # noqa: E402
from emseg.semantic.predict import PredictConfig, predict_file  # noqa: E402

PATCH = (1, 128, 128)
BLOCK = (2, 256, 256)
MODEL = dict(ndim=2, in_channels=1, out_channels=5, depth=3, base_width=12, norm="batch")


def noop(block):
    return block.index


def prepare(work: Path, shape: tuple[int, ...]) -> tuple[Path, str, str]:
    torch.manual_seed(0)
    ckpt = work / "model.pt"
    save_checkpoint(ckpt, {"model": build_model(MODEL).state_dict(), "model_config": MODEL,
                           "config": {"patch_shape": list(PATCH)}})
    data = data_dir()
    if data is not None:
        with open_volume(f"{data / 'vnc_stack1.h5'}:raw") as vol:
            raw = vol[tuple(slice(0, s) for s in shape)]
        source = f"VNC vnc_stack1.h5 raw[{', '.join(f'0:{s}' for s in shape)}]"
    else:
        from emseg.synthetic import make_volume
        raw = make_volume(shape, rng=0).raw
        source = f"synthetic {shape}"
    with create_volume(f"{work / 'raw.zarr'}", raw.shape, raw.dtype, chunks=(1,) + raw.shape[1:]) as out:
        out[...] = raw
    return ckpt, f"{work / 'raw.zarr'}", source


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4,512,512")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs per configuration (median)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    voxels = int(np.prod(shape))
    results: dict = {"machine": machine(), "shape": shape, "patch": PATCH, "block": BLOCK,
                     "blocks": len(plan_blocks(shape, BLOCK, (0, 0, 0)))}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt, raw, results["source"] = prepare(work, shape)

        def config(name: str, **kw) -> PredictConfig:
            return PredictConfig(model=str(ckpt), input=raw, output=str(work / f"{name}.zarr"), patch_shape=PATCH,
                                 block_shape=BLOCK, device="cpu", overwrite=True, **kw)

        def run(name: str, **kw) -> tuple[float, float]:
            cold = timed(lambda: predict_file(config(name + "-cold"), **kw))
            warm = [timed(lambda: predict_file(config(name), **kw)) for _ in range(args.repeats)]
            return cold, float(np.median(warm))

        rows = {}
        default_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        rows["in-process, 1 torch thread"] = run("inproc1")
        torch.set_num_threads(default_threads)
        if default_threads != 1:  # kernels are warm now: one run is enough
            rows[f"in-process, {default_threads} torch threads"] = (
                float("nan"), timed(lambda: predict_file(config("inproc"))))
        reference = zarr.open_array(store=str(work / "inproc1.zarr"), mode="r")[...]
        startup = {}
        equal = {}
        overhead = {}
        for workers in (1, 2):
            t = time.perf_counter()
            with open_client("local", workers=workers) as client:
                client.run(lambda: __import__("torch").get_num_threads())  # workers up and torch imported
                startup[workers] = time.perf_counter() - t
                name = f"local{workers}"
                rows[f"LocalCluster, {workers} worker(s) x 1 thread"] = run(name, client=client)
                equal[workers] = bool(np.array_equal(
                    zarr.open_array(store=str(work / f"{name}.zarr"), mode="r")[...], reference))
                if workers == 2:
                    blocks = plan_blocks((400, 1, 1), (1, 1, 1), (0, 0, 0))
                    run_blocks(noop, blocks[:20], client=client)  # warm the task path
                    overhead["cluster"] = run_blocks(noop, blocks, client=client).seconds / len(blocks)
                    markers = DoneMarkers(work / "markers")
                    overhead["cluster + markers"] = run_blocks(noop, blocks, client=client,
                                                               done=markers).seconds / len(blocks)
                    overhead["resume scan (all 400 done)"] = run_blocks(noop, blocks, client=client,
                                                                        done=markers).seconds / len(blocks)
            blocks = plan_blocks((400, 1, 1), (1, 1, 1), (0, 0, 0))
        overhead["in-process"] = run_blocks(noop, blocks).seconds / len(blocks)

    base = rows["in-process, 1 torch thread"][1]
    print(f"machine: {results['machine']}")
    print(f"volume: {results['source']}, {voxels:,} voxels, {results['blocks']} blocks of {BLOCK}, patch {PATCH}, "
          f"U-Net depth {MODEL['depth']} width {MODEL['base_width']}, {MODEL['out_channels']} classes")
    print(f"{'configuration':42s} {'cold s':>8s} {'warm s':>8s} {'voxels/s':>10s} {'vs in-process 1 thread':>23s}")
    out_rows = []
    for name, (cold, warm) in rows.items():
        print(f"{name:42s} {cold:8.2f} {warm:8.2f} {voxels / warm:10,.0f} {base / warm:22.2f}x")
        out_rows.append({"config": name, "cold_s": cold, "warm_s": warm, "voxels_per_s": voxels / warm,
                         "ratio_vs_in_process_1_thread": base / warm})
    for workers, seconds in startup.items():
        print(f"LocalCluster start-up, {workers} worker(s): {seconds:.2f} s; output equal to 1-thread in-process: "
              f"{equal[workers]}")
    for name, seconds in overhead.items():
        print(f"per-block overhead, no-op task, {name}: {seconds * 1e3:.3f} ms")
    results.update(rows=out_rows, startup_s=startup, equal_to_in_process=equal, overhead_s_per_block=overhead)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
