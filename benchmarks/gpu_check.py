"""The GPU path, proven on a CUDA machine in one run: paper-size training steps in every setting, then the
tiny-profile `dvc repro` end to end on CUDA, then the GPU hours of the full paper study at the measured rates.

    python benchmarks/gpu_check.py [--out DIR] [--steps 10] [--skip-repro]

Settings per variant (mnad-pred, mnad-recon, memae at 256x256, width 1.0, each family's batch): fp32 (the papers'
reproduction), bf16 autocast (profile.precision bf16), channels-last, channels-last with bf16, and torch.compile.
Each prints samples/s, achieved GFLOP/s and the ratio to the in-run fp32 matrix-product rate (bf16 rows also to
the bf16 rate). Writes DIR/gpu_check.json. On a machine without CUDA it stops with a message (--allow-cpu runs
it anyway, at the default study's size, to test the script).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (first: pins the CPU kernels of numpy and torch, as every stage does)
import torch  # noqa: E402

from benchmarks.common import matmul_gflops, report  # noqa: E402
from benchmarks.tiny_study import repro, tiny_study_copy  # noqa: E402
from benchmarks.train_speed import measure  # noqa: E402
from pipeline.config import load_params  # noqa: E402

SETTINGS = ("baseline", "bf16", "channels_last", "channels_last+bf16", "compile")
VARIANTS = ("mnad-pred", "mnad-recon", "memae")
# training frames of the real datasets (docs/datasets.md); one epoch visits every training window once
TRAIN_FRAMES = {"ped2": 2550, "avenue": 15328, "shanghaitech": 274515}


def study_gpu_hours(params, samples_per_s: dict[str, float]) -> float:
    """Hours to train every variant of study.variants with every seed on the three real datasets at the papers'
    epochs, at `samples_per_s` per family (mnad, memae); evaluation is a small fraction and is left out."""
    seconds = 0.0
    for dataset, frames in TRAIN_FRAMES.items():
        for name in params.study.variants:
            variant = params.variant(name)
            epochs = params.dataset(dataset).training_profile(variant).epochs
            seconds += frames * epochs / samples_per_s[variant.family] * len(params.study.seeds)
    return seconds / 3600


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-repro", action="store_true")
    parser.add_argument("--allow-cpu", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check: no CUDA device here; run it on a GPU machine (--allow-cpu tests the script on the CPU)")
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = load_params()
    dataset = params.dataset("ped2" if device.type == "cuda" else "synthetic")
    fp32, bf16 = matmul_gflops(device, 8192 if device.type == "cuda" else 2048), None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        bf16 = matmul_gflops(device, 8192, dtype=torch.bfloat16)
    print(f"{device}: fp32 matmul {fp32:.0f} GFLOP/s, bf16 matmul {bf16 or float('nan'):.0f} GFLOP/s", flush=True)
    rows = []
    for name in VARIANTS:
        variant = params.variant(name)
        profile = dataset.training_profile(variant)
        for setting in SETTINGS:
            try:
                row = {"frame": profile.frame_size, **measure(variant, profile, setting, args.steps, device)}
            except Exception as error:  # one setting failing (e.g. compile) must not hide the others
                row = {"variant": name, "setting": setting, "error": f"{type(error).__name__}: {error}"[:300]}
            if "gflop_per_s" in row:
                row["fp32_matmul_ratio"] = row["gflop_per_s"] / fp32
                if bf16 and "bf16" in setting:
                    row["bf16_matmul_ratio"] = row["gflop_per_s"] / bf16
            rows.append(row)
            print(" ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    fp32_rates = {params.variant(r["variant"]).family: r["samples_per_s"] for r in rows
                  if r.get("setting") == "baseline" and r["variant"] in ("mnad-pred", "memae") and "samples_per_s" in r}
    hours = study_gpu_hours(params, fp32_rates) if len(fp32_rates) == 2 and device.type == "cuda" else None
    if hours is not None:
        print(f"full paper study (3 datasets x {len(params.study.variants)} variants x {len(params.study.seeds)} "
              f"seeds, fp32): about {hours:.0f} GPU hours of training on this GPU")
    repro_result = None
    if not args.skip_repro:
        work = Path(tempfile.mkdtemp(prefix="memvad-gpu-"))
        env = tiny_study_copy(work)
        started = time.perf_counter()
        result = repro(work, env, timeout=900)
        repro_result = {"exit": result.returncode, "seconds": time.perf_counter() - started,
                        "tail": (result.stdout + result.stderr)[-2000:]}
        print(f"tiny-profile dvc repro on {device}: exit {result.returncode}, {repro_result['seconds']:.0f} s")
        if result.returncode:
            print(repro_result["tail"])
    args.out.mkdir(parents=True, exist_ok=True)
    report(rows, args.out / "gpu_check.json", device=str(device), matmul_fp32_gflops=fp32, matmul_bf16_gflops=bf16,
           study_gpu_hours=hours, tiny_repro=repro_result)
    return 0 if repro_result is None or repro_result["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
