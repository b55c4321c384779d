"""The fast path, measured: precision fp32 vs auto, the GEMM roofline, emseg predict vs MONAI, BALD vs baal.

Printed in one run (and written as JSON with --json-out):

1. GEMM rates (2048^2 matmul) in fp32 and bf16: the machine's roofline.
2. FLOPs per voxel of the networks (torch's FlopCounterMode, forward pass; training ~3x).
3. Network throughput on random data, for the 2D U-Net (depth 4, width 16, 5 classes, batches of
   8 x 256^2) and an anisotropic 3D U-Net (depth 3, width 16, 2 in-plane levels, batches of 2 x
   16 x 128 x 128): training steps and inference in fp32, fp32 + channels-last, bf16 and bf16 +
   channels-last, with the fraction of the roofline reached.
4. ``emseg train`` end to end on VNC sections 0-14 (patch reads, augmentation, prefetch): patches/s at
   fp32 and at auto, prefetch on and off.
5. ``emseg predict`` end to end (h5 in, zarr float32 probabilities out) on the VNC stack against
   MONAI's ``sliding_window_inference`` in memory, same model, window 256, overlap 0.25: MONAI at its
   defaults (fp32, sw_batch_size 1, constant blending) and MONAI given bf16 + channels-last
   (sw_batch_size 4, gaussian). Each runs in its own process: voxels/s and peak RSS.
6. BALD scoring at T = 20 on 128^2 patches with a dropout U-Net: emseg's ``score_pool`` (encoder once,
   decoder T times, streamed) against baal's ``ModelWrapper.predict_on_batch`` (the batch replicated T
   times) + ``BALD`` heuristic, patches/s and peak RSS.
7. ``emseg pretrain`` (the default masked pretext, and contrastive) against ``emseg train`` on the same VNC
   sections, patch (128^2), batch (16), network and precision: patches/s of each and their ratio.
8. The pipeline around the network (``pipeline``): ``emseg predict`` end to end on the VNC stack for
   labels, uint8 and float32 probabilities, each as a fraction of the network's own voxels/s at the
   same overlap (the same prepared network timed alone on batches of windows, divided by the
   window voxels computed per output voxel) and of the GEMM roofline of the precision that ran;
   and ``emseg predict`` of the whole stack as a command (labels, process start to end).
9. Reading the formats (``formats``): the VNC stack as uncompressed HDF5, a multi-page TIFF, a
   compressed TIFF, a folder of TIFF slices, a folder of PNG slices and an MRC file, read whole
   section by section and as 512 random 128^2 training patches (each the best of 15 timings, the formats taking turns),
   opening the volume each time; seconds and the ratio to HDF5.
10. ``emseg segment`` against ``emseg predict`` on the same network (``segment``): voxels/s and peak
   RSS of predict (float32 probabilities), segment with the network (components of class 1, and
   the per-section watershed of classes 2-4; the watershed also as ``--resume`` runs it, its passes
   through the files of ``OUT.partial``) and the post-processing alone on the predicted
   probabilities (``segment --from-probabilities``), each in its own process. The network has
   random weights, so its maps hold few objects; the post-processing alone is timed on maps made
   from the VNC labels (smoothed, with smooth noise), which hold the stack's real objects.

Usage::

    python benchmarks/speed.py [--quick] [--json-out speed.json]
        [--only gemm,net,train,predict,bald,pretrain,pipeline,formats,segment]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import data_dir, machine  # noqa: E402
from emseg.runtime import Runtime
from emseg.runtime.precision import cpu_bf16_support

HERE = Path(__file__).resolve()


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _timed(fn, seconds: float, warmup: int = 1) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 2:
            return n / dt


# --------------------------------------------------------------------------- 1. GEMM
def bench_gemm(seconds: float) -> dict:
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype == torch.bfloat16 and not cpu_bf16_support()[0]:
            out["gemm_bf16_gflops"] = float("nan")  # emulated: one product takes minutes, and no roofline
            continue
        a = torch.randn(2048, 2048, dtype=dtype)
        b = torch.randn(2048, 2048, dtype=dtype)
        rate = _timed(lambda: a @ b, seconds)
        out[f"gemm_{name}_gflops"] = rate * 2 * 2048**3 / 1e9
    return out


# --------------------------------------------------------------------------- 2-3. networks
NETS = {
    "2d": dict(config=dict(ndim=2, out_channels=5, depth=4, base_width=16), batch=(8, 1, 256, 256)),
    "3d": dict(config=dict(ndim=3, out_channels=5, depth=3, base_width=16, anisotropic_levels=2),
               batch=(2, 1, 16, 128, 128)),
}
MODES = {"fp32": ("fp32", False), "fp32+cl": ("fp32", True), "bf16": ("bf16", False), "bf16+cl": ("bf16", True)}
#: Inference also with batch norm folded into the convolutions (what emseg predicts with) and,
#: with --compile-too, the 2D network under torch.compile.
FOLD_MODES = ("fp32+cl", "bf16+cl")


def flops_per_voxel(net: torch.nn.Module, shape) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1,) + tuple(shape[1:]))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops() / x.numel()


def bench_networks(seconds: float, gemm: dict, compile_too: bool = False) -> dict:
    from emseg.models import UNet, fold_batchnorm
    from emseg.runtime.precision import Precision

    out = {}
    for key, spec in NETS.items():
        torch.manual_seed(0)
        net = UNet(**spec["config"])
        fpv = flops_per_voxel(net.eval(), spec["batch"])
        out[f"{key}_gflop_per_mvoxel"] = fpv * 1e6 / 1e9
        x = torch.rand(spec["batch"])
        target = torch.randint(0, 5, (spec["batch"][0],) + spec["batch"][2:])
        vox = x.numel()
        for mode, (name, cl) in MODES.items():
            prec = Precision(name, "cpu", cl)
            model = UNet(**spec["config"])
            prec.prepare_model(model)
            xin = prec.prepare_input(x)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            fwd = prec.wrap(model)

            def train_step():
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(fwd(xin), target)
                loss.backward()
                opt.step()

            model.train()
            train = _timed(train_step, seconds)
            model.eval()

            def infer():
                with torch.no_grad():
                    fwd(xin)

            inf = _timed(infer, seconds)
            roof = gemm["gemm_bf16_gflops" if name == "bf16" else "gemm_fp32_gflops"] * 1e9
            row = {
                "train_mpx_s": train * vox / 1e6, "infer_mvox_s": inf * vox / 1e6,
                "infer_roofline_fraction": inf * vox * fpv / roof,
                "train_roofline_fraction": train * vox * 3 * fpv / roof,
            }
            line = (f"  {key} {mode:8s} train {train * vox / 1e6:6.2f} Mpx/s   infer {inf * vox / 1e6:6.2f} Mvox/s"
                    f" ({100 * inf * vox * fpv / roof:4.1f}% of the {name} GEMM rate)")
            if mode in FOLD_MODES:
                folded = prec.prepare_model(fold_batchnorm(model.eval()))
                fold_rate = _timed(lambda: _no_grad_call(prec, folded, xin), seconds)
                row["infer_folded_mvox_s"] = fold_rate * vox / 1e6
                row["infer_folded_roofline_fraction"] = fold_rate * vox * fpv / roof
                line += f"; BN folded {fold_rate * vox / 1e6:6.2f} Mvox/s ({100 * fold_rate * vox * fpv / roof:4.1f}%)"
                if compile_too and key == "2d":
                    t0 = time.perf_counter()
                    compiled = torch.compile(folded, dynamic=False)
                    _no_grad_call(prec, compiled, xin)
                    row["compile_s"] = time.perf_counter() - t0
                    rate = _timed(lambda: _no_grad_call(prec, compiled, xin), seconds)
                    row["infer_compiled_mvox_s"] = rate * vox / 1e6
                    line += f"; compiled {rate * vox / 1e6:6.2f} Mvox/s (compile {row['compile_s']:.0f} s)"
            out[f"{key}_{mode}"] = row
            print(line, flush=True)
    return out


def _no_grad_call(prec, model, x):
    with torch.no_grad(), prec.autocast():
        return model(x)


# --------------------------------------------------------------------------- 4. emseg train
def bench_train(seconds: float, vnc: Path | None) -> dict:
    from emseg.engine.config import config_from_dict
    from emseg.engine.training import run_training
    from emseg.semantic.train import SegmentationTask

    if vnc is None:
        return {"skipped": "no VNC data"}
    out = {}
    for precision in ("fp32", "auto"):
        for prefetch in (False, True):
            cfg = config_from_dict({
                "n_classes": 5, "patch_shape": [1, 256, 256], "batch_size": 8, "steps": 10**6,
                "max_seconds": seconds, "precision": precision, "prefetch": prefetch,
                "log_every": 10**6, "checkpoint_every": 10**6, "valid_every": 10**6,
                "model": {"depth": 4, "base_width": 16},
                "train": [{"raw": f"{vnc}/vnc_stack1.h5:raw", "label": f"{vnc}/vnc_stack1.h5:label",
                           "region": [[0, 15]]}]})
            task = SegmentationTask(cfg)
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    r = run_training(task, cfg, tmp, runtime=Runtime(device="cpu", seed=0))
                finally:
                    task.close()
            key = f"{precision}_prefetch_{'on' if prefetch else 'off'}"
            out[key] = {"steps": r.final_step, "seconds": r.seconds, "patches_per_s": r.patches_per_s,
                        "mpx_s": r.patches_per_s * 256 * 256 / 1e6, "precision": r.precision}
            print(f"  emseg train {key:22s} {r.patches_per_s:6.1f} patches/s ({r.final_step} steps, "
                  f"{r.precision})", flush=True)
    return out


def _vnc_input(vnc: str, sections: int, folder: str) -> str:
    """The spec of VNC stack 1's raw volume, or of its first ``sections`` copied into ``folder``."""
    import h5py

    if sections >= 20:
        return f"{vnc}/vnc_stack1.h5:raw"
    with h5py.File(f"{vnc}/vnc_stack1.h5", "r") as fh, h5py.File(f"{folder}/in.h5", "w") as out:
        out["raw"] = fh["raw"][:sections]
    return f"{folder}/in.h5:raw"


def _random_checkpoint(folder: str) -> str:
    """A checkpoint of the 2D network of section 3 with random weights (seed 0), in ``folder``."""
    from emseg.models import UNet
    from emseg.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = UNet(**NETS["2d"]["config"])
    ckpt = f"{folder}/m.pt"
    save_checkpoint(ckpt, {"model": net.state_dict(), "model_config": net.config,
                           "config": {"patch_shape": [1, 256, 256]}, "step": 0})
    return ckpt


def _in_fresh_process(args: list[str]) -> dict:
    """Run one case of this script in a new process (its own peak RSS); its JSON, or the error."""
    proc = subprocess.run([sys.executable, str(HERE)] + args, capture_output=True, text=True)
    if proc.returncode != 0:
        error = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        print(f"  {args[1]}: failed: {error}", flush=True)
        return {"error": error}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- 5. predict vs MONAI
def _predict_case(case: str, vnc: str, ckpt: str, sections: int) -> dict:
    """Runs in a fresh process: one way of predicting the first ``sections`` VNC sections."""
    import h5py

    from emseg.models.checkpoint import load_model
    from emseg.runtime.precision import Precision

    with h5py.File(f"{vnc}/vnc_stack1.h5", "r") as fh:
        shape = (sections,) + fh["raw"].shape[1:]
    voxels = int(np.prod(shape))
    if case.startswith("emseg"):
        from emseg.semantic.predict import PredictConfig, predict_file

        precision = case.split("-")[1]
        with tempfile.TemporaryDirectory() as tmp:
            src = _vnc_input(vnc, sections, tmp)
            base = _peak_rss_mb()
            t0 = time.perf_counter()
            res = predict_file(PredictConfig(model=ckpt, input=src, output=f"{tmp}/p.zarr", device="cpu",
                                             precision=precision, overlap=0.25, overwrite=True))
            dt = time.perf_counter() - t0
        return {"voxels_per_s": voxels / dt, "seconds": dt, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": base,
                "block_shape": list(res.block_shape), "precision": res.precision}
    from monai.inferers import sliding_window_inference

    model, _ = load_model(ckpt)
    t0 = time.perf_counter()
    with h5py.File(f"{vnc}/vnc_stack1.h5", "r") as fh:
        raw = torch.from_numpy(fh["raw"][:sections].astype(np.float32) / 255)[:, None]
    if case == "monai-default":
        prec, kw = Precision("fp32", "cpu", False), dict(sw_batch_size=1, mode="constant")
    else:
        prec, kw = Precision("bf16", "cpu", True), dict(sw_batch_size=4, mode="gaussian")
    prec.prepare_model(model)

    def predictor(x):
        with prec.autocast():
            return torch.softmax(model(prec.prepare_input(x)).float(), 1)

    with torch.no_grad():
        probs = sliding_window_inference(raw, (256, 256), predictor=predictor, overlap=0.25, **kw)
    dt = time.perf_counter() - t0
    assert probs.shape == (sections, 5) + shape[1:]
    return {"voxels_per_s": voxels / dt, "seconds": dt, "peak_rss_mb": _peak_rss_mb()}


def bench_predict(vnc: Path | None, sections: int) -> dict:
    if vnc is None:
        return {"skipped": "no VNC data"}
    out = {"sections": sections}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _random_checkpoint(tmp)
        for case in ("emseg-fp32", "emseg-auto", "monai-default", "monai-bf16"):
            if case == "monai-bf16" and not cpu_bf16_support()[0]:
                # emulated bf16 ran more than 10 times slower than fp32 here: not a comparison
                out[case] = {"skipped": "this CPU has no native bf16"}
                continue
            out[case] = _in_fresh_process(["--predict-case", case, "--vnc", str(vnc), "--ckpt", ckpt,
                                           "--sections", str(sections)])
            if "error" not in out[case]:
                print(f"  {case:14s} {out[case]['voxels_per_s'] / 1e6:5.2f} Mvoxel/s  peak RSS "
                      f"{out[case]['peak_rss_mb']:6.0f} MB", flush=True)
    for a, b in (("emseg-auto", "monai-default"), ("emseg-auto", "monai-bf16"), ("emseg-auto", "emseg-fp32")):
        if "voxels_per_s" in out.get(a, {}) and "voxels_per_s" in out.get(b, {}):
            out[f"speed_{a}_over_{b}"] = out[a]["voxels_per_s"] / out[b]["voxels_per_s"]
            out[f"rss_{a}_over_{b}"] = out[a]["peak_rss_mb"] / out[b]["peak_rss_mb"]
    return out


# --------------------------------------------------------------------------- 8. pipeline
def window_voxels(shape, block_shape, patch, overlap: float, divisor) -> int:
    """Voxels the network computes to predict ``shape`` block by block (halo = patch // 2)."""
    import math

    from emseg.engine.blocks import plan_blocks
    from emseg.engine.inference import window_starts

    total = 0
    for block in plan_blocks(shape, block_shape, [p // 2 for p in patch]):
        region = [sl.stop - sl.start for sl in block.outer]
        window = [int(math.ceil(min(p, r) / d) * d) for p, r, d in zip(patch, region, divisor)]
        padded = [max(r, w) for r, w in zip(region, window)]
        stride = [max(1, int(round(w * (1 - overlap)))) for w in window]
        n = math.prod(len(window_starts(r, w, st)) for r, w, st in zip(padded, window, stride))
        total += n * math.prod(window)
    return total


def _pipeline_case(case: str, vnc: str, ckpt: str, sections: int) -> dict:
    """Runs in a fresh process: ``emseg predict`` of one output kind, and the network alone."""
    import h5py

    from emseg.engine.inference import make_predictor
    from emseg.models.loading import prepare_network
    from emseg.models.checkpoint import load_model
    from emseg.runtime.device import resolve_device
    from emseg.semantic.predict import PredictConfig, predict_file

    output_type, dtype = {"labels": ("labels", "float32"), "uint8": ("probabilities", "uint8"),
                          "float32": ("probabilities", "float32")}[case]
    with h5py.File(f"{vnc}/vnc_stack1.h5", "r") as fh:
        shape = (sections,) + fh["raw"].shape[1:]
    with tempfile.TemporaryDirectory() as tmp:
        src = _vnc_input(vnc, sections, tmp)
        t0 = time.perf_counter()
        res = predict_file(PredictConfig(model=ckpt, input=src, output=f"{tmp}/p.zarr", device="cpu",
                                         output_type=output_type, dtype=dtype, overlap=0.25, batch_size=4,
                                         overwrite=True))
        dt = time.perf_counter() - t0
    model, _ = load_model(ckpt)
    device = resolve_device("cpu")
    predictor = make_predictor(model, res.patch_shape, PredictConfig(ckpt, "", "").window, device)
    x = torch.rand((4, 1) + tuple(res.patch_shape[1:]))
    net = prepare_network(model, predictor.precision)  # folded, laid out: what predict runs
    rate = _timed(lambda: _no_grad_call(predictor.precision, net, x), 8.0) * x.numel()
    computed = window_voxels(shape, res.block_shape, res.patch_shape, 0.25, (1,) + tuple(model.divisor))
    voxels = int(np.prod(shape))
    at_overlap = rate * voxels / computed
    return {"voxels_per_s": voxels / dt, "seconds": dt, "precision": res.precision,
            "network_voxels_per_s": rate, "windows_per_voxel": computed / voxels,
            "network_at_overlap_voxels_per_s": at_overlap, "fraction_of_network": voxels / dt / at_overlap,
            "flops_per_voxel": flops_per_voxel(model.eval(), (1, 1) + tuple(res.patch_shape[1:])),
            "block_shape": list(res.block_shape), "peak_rss_mb": _peak_rss_mb()}


def bench_pipeline(vnc: Path | None, sections: int, gemm: dict) -> dict:
    if vnc is None:
        return {"skipped": "no VNC data"}
    out: dict = {"sections": sections}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _random_checkpoint(tmp)
        for case in ("labels", "uint8", "float32"):
            row = _in_fresh_process(["--pipeline-case", case, "--vnc", str(vnc), "--ckpt", ckpt,
                                     "--sections", str(sections)])
            if "error" not in row:
                roof = gemm["gemm_bf16_gflops" if row["precision"] == "bf16" else "gemm_fp32_gflops"] * 1e9
                row["fraction_of_roofline"] = row["voxels_per_s"] * row["flops_per_voxel"] / roof
                print(f"  predict {case:8s} {row['voxels_per_s'] / 1e6:5.2f} Mvoxel/s = "
                      f"{100 * row['fraction_of_network']:4.1f}% of the network at this overlap "
                      f"({row['network_at_overlap_voxels_per_s'] / 1e6:.2f}), "
                      f"{100 * row['fraction_of_roofline']:4.1f}% of the {row['precision']} GEMM rate", flush=True)
            out[case] = row
        labels = f"{tmp}/labels.zarr"
        t0 = time.perf_counter()
        proc = subprocess.run([str(Path(sys.executable).with_name("emseg")), "-q", "--device", "cpu", "predict", ckpt,
                               f"{vnc}/vnc_stack1.h5:raw", labels, "--output-type", "labels"],
                              capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if proc.returncode == 0 and "labels" in out and "flops_per_voxel" in out["labels"]:
            voxels = 20 * 1024 * 1024
            roof = gemm["gemm_bf16_gflops" if out["labels"]["precision"] == "bf16" else "gemm_fp32_gflops"] * 1e9
            out["command_labels"] = {"seconds": dt, "voxels_per_s": voxels / dt,
                                     "fraction_of_roofline": voxels / dt * out["labels"]["flops_per_voxel"] / roof}
            print(f"  emseg predict (whole stack, labels, process start to end) {voxels / dt / 1e6:5.2f} Mvoxel/s = "
                  f"{100 * out['command_labels']['fraction_of_roofline']:4.1f}% of the GEMM rate", flush=True)
    return out


# --------------------------------------------------------------------------- 10. segment
def _segment_case(case: str, vnc: str, ckpt: str, sections: int) -> dict:
    """Runs in a fresh process: predict, segment with the network, or segment the probabilities."""
    import h5py

    from emseg.instances.config import SegmentConfig
    from emseg.instances.segment import SegmentFileConfig, segment_file, segment_probabilities
    from emseg.semantic.predict import PredictConfig, predict_file

    with tempfile.TemporaryDirectory() as tmp:
        with h5py.File(f"{vnc}/vnc_stack1.h5", "r") as fh, h5py.File(f"{tmp}/in.h5", "w") as out:
            out["raw"] = fh["raw"][:sections]
        src, probs = f"{tmp}/in.h5:raw", f"{tmp}/p.zarr"
        voxels = sections * 1024 * 1024
        mode = case.removesuffix("-resumable").split("-")[-1]
        seg = SegmentConfig(mode=mode if mode != "predict" else "components")

        def predict():
            return predict_file(PredictConfig(model=ckpt, input=src, output=probs, device="cpu", overwrite=True))

        if case.startswith("post-"):  # maps with real geometry: the labels smoothed, with smooth noise
            from scipy import ndimage
            import zarr

            with h5py.File(f"{vnc}/vnc_stack1.h5", "r") as fh:
                onehot = np.stack([fh["label"][:sections] == c for c in range(5)]).astype(np.float32)
            p = ndimage.gaussian_filter(onehot, (0, 0, 2, 2))
            p += 0.3 * ndimage.gaussian_filter(np.random.default_rng(0).random(p.shape, dtype=np.float32), (0, 0, 2, 2))
            p /= p.sum(0, keepdims=True)
            zarr.create_array(store=probs, shape=p.shape, dtype=np.float32, chunks=(1, 1, 1024, 1024))[...] = p
            del onehot, p
            seg = seg.replace(seed_threshold=0.35)  # above this map's noise floor (docs/instances.md)
        base = _peak_rss_mb()
        t0 = time.perf_counter()
        if case == "predict":
            res = predict()
        elif case.startswith("segment-"):  # "-resumable": the passes through files in OUT.partial (--resume)
            res = segment_file(SegmentFileConfig(output=f"{tmp}/s.zarr", model=ckpt, input=src, segment=seg,
                                                 device="cpu", resume=case.endswith("-resumable")))
        else:
            res = segment_probabilities(probs, seg, f"{tmp}/s.zarr")
        dt = time.perf_counter() - t0
        row = {"voxels_per_s": voxels / dt, "seconds": dt, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": base,
               "block_shape": list(res.block_shape)}
        if case != "predict":
            row["n_objects"] = res.n_objects
        return row


def bench_segment(vnc: Path | None, sections: int) -> dict:
    if vnc is None:
        return {"skipped": "no VNC data"}
    out: dict = {"sections": sections}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _random_checkpoint(tmp)
        for case in ("predict", "segment-components", "segment-watershed", "segment-watershed-resumable",
                     "post-components", "post-watershed"):
            out[case] = row = _in_fresh_process(["--segment-case", case, "--vnc", str(vnc), "--ckpt", ckpt,
                                                 "--sections", str(sections)])
            if "error" not in row:
                print(f"  {case:28s} {row['voxels_per_s'] / 1e6:6.2f} Mvoxel/s  peak RSS {row['peak_rss_mb']:6.0f} MB"
                      + (f"  {row['n_objects']} objects" if "n_objects" in row else ""), flush=True)
    for case in ("segment-components", "segment-watershed", "segment-watershed-resumable"):
        if "voxels_per_s" in out.get(case, {}) and "voxels_per_s" in out.get("predict", {}):
            out[f"speed_{case}_over_predict"] = out[case]["voxels_per_s"] / out["predict"]["voxels_per_s"]
    return out


# --------------------------------------------------------------------------- 9. formats
def _best_of(fn, repeats: int) -> float:
    """The shortest of ``repeats`` timings of ``fn()`` (the least disturbed by other work)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best

def bench_formats(vnc: Path | None, patches: int = 512, repeat: int = 1) -> dict:
    """The same volume in every input format: whole reads and random patch reads, against HDF5.

    ``repeat`` stacks the volume that many times along z (larger volumes: the fixed cost of opening
    a file counts less)."""
    import h5py
    import mrcfile
    import tifffile
    from PIL import Image

    from emseg.io import open_volume

    if vnc is not None:
        with h5py.File(f"{vnc}/vnc_stack1.h5", "r") as fh:
            raw = fh["raw"][...]
    else:
        raw = (np.random.default_rng(0).random((20, 1024, 1024)) * 255).astype(np.uint8)
    raw = np.concatenate([raw] * repeat) if repeat > 1 else raw
    out: dict = {"shape": list(raw.shape), "dtype": str(raw.dtype)}
    rng = np.random.default_rng(0)
    corners = [(int(rng.integers(raw.shape[0])), int(rng.integers(raw.shape[1] - 128)),
                int(rng.integers(raw.shape[2] - 128))) for _ in range(patches)]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        with h5py.File(t / "v.h5", "w") as fh:
            fh["raw"] = raw  # contiguous, uncompressed
        with h5py.File(t / "v16.h5", "w") as fh:  # MRC stores uint8 as uint16 (no unsigned 8-bit mode)
            fh["raw"] = raw.astype(np.uint16)
        tifffile.imwrite(t / "v.tif", raw)
        tifffile.imwrite(t / "vz.tif", raw, compression="zlib")
        (t / "tif").mkdir()
        (t / "png").mkdir()
        for z in range(raw.shape[0]):
            tifffile.imwrite(t / "tif" / f"s{z}.tif", raw[z])
            Image.fromarray(raw[z]).save(t / "png" / f"s{z}.png")
        with mrcfile.new(str(t / "v.mrc")) as mrc:
            mrc.set_data(raw)
        specs = {"h5": f"{t}/v.h5:raw", "h5-uint16": f"{t}/v16.h5:raw", "tiff": f"{t}/v.tif", "tiff-zlib": f"{t}/vz.tif", "tiff-folder": f"{t}/tif/",
                 "png-folder": f"{t}/png/", "mrc": f"{t}/v.mrc"}
        def whole(spec):
            with open_volume(spec) as vol:
                for z in range(vol.shape[0]):
                    np.asarray(vol[z])

        def patch_reads(spec):
            with open_volume(spec) as vol:
                for z, y, x in corners:
                    np.asarray(vol[z, y:y + 128, x:x + 128])

        for spec in specs.values():
            whole(spec)  # warm the page cache: every format is read from memory
        best = {name: [np.inf, np.inf] for name in specs}
        for _ in range(15):  # the formats interleaved, so that a disturbance hits them alike; the best kept
            for name, spec in specs.items():
                best[name][0] = min(best[name][0], _best_of(lambda: whole(spec), 1))
                best[name][1] = min(best[name][1], _best_of(lambda: patch_reads(spec), 1))
        for name in specs:
            out[name] = {"whole_s": best[name][0], "patches_s": best[name][1]}
        with open_volume(specs["mrc"]) as vol:
            mrc_dtype = np.dtype(vol.dtype)
        for name in specs:
            same = "h5-uint16" if name == "mrc" and mrc_dtype == np.uint16 else "h5"  # against the same bytes
            out[name]["whole_over_h5"] = out[name]["whole_s"] / out[same]["whole_s"]
            out[name]["patches_over_h5"] = out[name]["patches_s"] / out[same]["patches_s"]
            out[name]["against"] = same
            against = out[name]["against"]
            print(f"  read {name:11s} whole {out[name]['whole_s']:6.3f} s ({out[name]['whole_over_h5']:4.2f}x "
                  f"{against})   {patches} patches {out[name]['patches_s']:6.3f} s "
                  f"({out[name]['patches_over_h5']:4.2f}x {against})", flush=True)
    return out


# --------------------------------------------------------------------------- 6. BALD
def _bald_case(case: str, n: int, t: int) -> dict:
    from emseg.models import UNet

    torch.manual_seed(0)
    net = UNet(ndim=2, out_channels=5, depth=4, base_width=16, dropout=0.5).eval()
    vol = (np.random.default_rng(0).random((n, 128, 128)) * 255).astype(np.uint8)
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    if case.startswith("emseg"):
        from emseg.active.pool import build_pool
        from emseg.active.scoring.stream import score_pool

        pool = build_pool([vol.shape], (1, 128, 128))
        scores = score_pool(net, pool, [vol], "bald", mc_samples=t, batch_size=8, seed=0, fold=True,
                            precision=case.split("-")[1]).scores
    else:
        from baal.active.heuristics import BALD
        from baal.bayesian.dropout import patch_module
        from baal.modelwrapper import ModelWrapper, TrainingArgs

        wrapper = ModelWrapper(patch_module(net), TrainingArgs(use_cuda=False, replicate_in_memory=True))
        outs = []
        for b0 in range(0, n, 8):
            x = torch.from_numpy(vol[b0:b0 + 8].astype(np.float32) / 255)[:, None]
            logits = wrapper.predict_on_batch(x, iterations=t)  # (B, C, H, W, T)
            outs.append(torch.softmax(logits, 1).numpy())
        scores = BALD(reduction="mean").compute_score(np.concatenate(outs))
    dt = time.perf_counter() - t0
    return {"patches_per_s": n / dt, "seconds": dt, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": base,
            "n": n, "finite": bool(np.isfinite(scores).all())}


def bench_bald(n: int, t: int) -> dict:
    out = {"n": n, "T": t}
    for case in ("emseg-fp32", "emseg-auto", "baal"):
        out[case] = _in_fresh_process(["--bald-case", case, "--n", str(n), "--t", str(t)])
        if "error" not in out[case]:
            print(f"  BALD {case:11s} {out[case]['patches_per_s']:6.2f} patches/s  peak RSS "
                  f"{out[case]['peak_rss_mb']:6.0f} MB", flush=True)
    for a in ("emseg-fp32", "emseg-auto"):
        if "patches_per_s" in out.get(a, {}) and "patches_per_s" in out.get("baal", {}):
            out[f"speed_{a}_over_baal"] = out[a]["patches_per_s"] / out["baal"]["patches_per_s"]
    return out


def bench_pretrain(seconds: float, vnc: Path | None) -> dict:
    """Pretraining's patches/s against supervised training's, everything else equal."""
    from emseg.engine.config import config_from_dict
    from emseg.pretrain import pretrain, pretrain_config_from_dict
    from emseg.semantic.train import train

    if vnc is None:
        return {"skipped": "no VNC data"}
    stack = f"{vnc}/vnc_stack1.h5"
    common = {"patch_shape": [1, 128, 128], "batch_size": 16, "max_seconds": seconds,
              "model": {"depth": 4, "base_width": 16}}
    out = {}

    def pretrain_run(tmp: str, precision: str, kind: str):
        return pretrain(pretrain_config_from_dict(dict(common, precision=precision, pretext={"kind": kind},
                                                       data=[{"raw": f"{stack}:raw", "region": [[0, 15]]}])),
                        Path(tmp) / kind, runtime=Runtime(device="cpu", seed=0))

    for precision in ("fp32", "auto"):
        with tempfile.TemporaryDirectory() as tmp:
            runs = {"masked": pretrain_run(tmp, precision, "masked")}  # masked before train, as measured before
            sup = train(config_from_dict(dict(common, precision=precision, n_classes=5, valid_every=10**6,
                                              train=[{"raw": f"{stack}:raw", "label": f"{stack}:label",
                                                      "region": [[0, 12]]}])),
                        Path(tmp) / "sup", runtime=Runtime(device="cpu", seed=0))
            runs["contrastive"] = pretrain_run(tmp, precision, "contrastive")  # two views per patch: two passes
            for kind, pre in runs.items():
                key = precision if kind == "masked" else f"{precision}_{kind}"
                out[key] = {"pretrain_patches_per_s": pre.patches_per_s, "train_patches_per_s": sup.patches_per_s,
                            "ratio": pre.patches_per_s / sup.patches_per_s, "precision": pre.precision, "kind": kind}
                print(f"  emseg pretrain ({kind}) {pre.patches_per_s:6.1f} patches/s, emseg train "
                      f"{sup.patches_per_s:6.1f} ({precision} -> {pre.precision}): ratio {out[key]['ratio']:.2f}",
                      flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Short timings and 4 sections (a smoke run).")
    ap.add_argument("--only", default="gemm,net,train,predict,bald,pretrain,pipeline,formats,segment")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--compile-too", action="store_true", help="Also time torch.compile on the 2D network.")
    ap.add_argument("--predict-case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bald-case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pipeline-case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--formats-repeat", type=int, default=1,
                    help="formats: stack the VNC volume this many times along z (a larger volume).")
    ap.add_argument("--segment-case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--vnc", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sections", type=int, default=20, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--t", type=int, default=20, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from emseg.runtime.device import configure_threads

    configure_threads()
    if args.predict_case:
        print(json.dumps(_predict_case(args.predict_case, args.vnc, args.ckpt, args.sections)))
        return
    if args.bald_case:
        print(json.dumps(_bald_case(args.bald_case, args.n, args.t)))
        return
    if args.pipeline_case:
        print(json.dumps(_pipeline_case(args.pipeline_case, args.vnc, args.ckpt, args.sections)))
        return
    if args.segment_case:
        print(json.dumps(_segment_case(args.segment_case, args.vnc, args.ckpt, args.sections)))
        return

    only = set(args.only.split(","))
    seconds = 2.0 if args.quick else 8.0
    vnc = data_dir()
    results: dict = {"machine": machine(), "cpu_bf16": cpu_bf16_support()[1], "load_average": os.getloadavg()}
    print(f"machine: {results['machine']}; native bf16: {results['cpu_bf16']}; load {results['load_average']}")
    gemm = bench_gemm(2.0 if args.quick else 5.0)
    results["gemm"] = gemm
    print(f"GEMM 2048^2: fp32 {gemm['gemm_fp32_gflops']:.0f} GFLOP/s, bf16 {gemm['gemm_bf16_gflops']:.0f} GFLOP/s")
    if "net" in only:
        results["networks"] = bench_networks(seconds, gemm, args.compile_too)
    if "train" in only:
        results["train"] = bench_train(20.0 if args.quick else 60.0, vnc)
    if "predict" in only:
        results["predict"] = bench_predict(vnc, 4 if args.quick else 20)
    if "bald" in only:
        results["bald"] = bench_bald(16 if args.quick else 64, 20)
    if "pretrain" in only:
        results["pretrain"] = bench_pretrain(10.0 if args.quick else 60.0, vnc)
    if "pipeline" in only:
        results["pipeline"] = bench_pipeline(vnc, 4 if args.quick else 20, gemm)
    if "formats" in only:
        results["formats"] = bench_formats(vnc, 64 if args.quick else 512, args.formats_repeat)
    if "segment" in only:
        results["segment"] = bench_segment(vnc, 4 if args.quick else 20)
    results["load_average_end"] = os.getloadavg()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
