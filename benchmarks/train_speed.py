"""Training-step throughput against the machine's own limit: samples/s and achieved GFLOP/s per variant and size,
beside the rate of a large fp32 matrix product timed in the same run.

    python benchmarks/train_speed.py [--sizes default paper] [--variants mnad-pred mnad-recon memae]
        [--settings baseline channels_last ...] [--steps 10] [--batch paper=4] [--json out.json]

Sizes: "default" is the default study's (params.yaml datasets.synthetic profile), "paper" the papers' (the ped2
profile: 256x256, width 1.0, each family's batch). Each step is pipeline.train.training_step on random clips (no
data loading): forward, loss, backward, Adam. FLOPs per step are counted once with torch.utils.flop_counter
(convolutions and matrix products, forward and backward; BatchNorm, activations and the optimiser count nothing,
so the ratio is the share of the machine's matmul rate the counted arithmetic reaches).

Settings (joined with "+"): baseline (pipeline.train's step: NCHW weights, fp32, foreach Adam), channels_last
(the weights in the channels-last layout), compile (torch.compile of the model; its compile seconds are reported
apart), bf16 (bf16 autocast, as profile.precision bf16), batch=N (N samples per step instead of the profile's),
threads=N (torch's intra-op threads). Two warm-up steps precede the timed ones.

At the papers' size, run it with the heap-reuse tunables in the environment too (README, "Speed, and the GPU"):
`GLIBC_TUNABLES=<pipeline.HEAP_REUSE_TUNABLES> python benchmarks/train_speed.py --sizes paper`. glibc reads them at
process start, so one run measures one setting; the JSON's machine names the tunables in force (`allocator`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (first: pins the CPU kernels of numpy and torch, as every stage does)
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.common import matmul_gflops, report, synchronize  # noqa: E402
from models.build import build_model, image_channels  # noqa: E402
from models.clips import split_clip  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.train import training_step  # noqa: E402

SIZE_DATASETS = {"default": "synthetic", "paper": "ped2"}


def step_flops(model, optimizer, inputs, target, variant) -> int:
    """Flops of one training step (forward and backward), as torch's flop counter counts them."""
    with FlopCounterMode(display=False) as counter:
        training_step(model, optimizer, inputs, target, variant)
    return counter.get_total_flops()


def parse_setting(setting: str) -> dict:
    options = {"channels_last": False, "compile": False, "bf16": False, "batch": None, "threads": None}
    for part in setting.split("+"):
        if part == "baseline":
            continue
        if part.startswith(("batch=", "threads=")):
            key, value = part.split("=", 1)
            options[key] = int(value)
        elif part in ("channels_last", "compile", "bf16"):
            options[part] = True
        else:
            raise SystemExit(f"--settings: unknown {part!r}; use baseline, channels_last, compile, bf16, "
                             f"batch=N, threads=N")
    return options


def measure(variant, profile, setting: str, steps: int, device: torch.device) -> dict:
    options = parse_setting(setting)
    batch = options["batch"] or profile.batch_size
    threads = torch.get_num_threads()
    torch.set_num_threads(options["threads"] or threads)
    try:
        return _measure(variant, profile, options, batch, steps, device) | {"setting": setting,
                                                                            "threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(threads)


def _measure(variant, profile, options: dict, batch: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(variant, profile).to(device)
    if options["channels_last"]:
        # weights in this layout make every convolution's output channels-last too
        model = model.to(memory_format=torch.channels_last_3d if variant.family == "memae" else torch.channels_last)
    clip = torch.rand(batch, variant.window, image_channels(variant, profile), profile.frame_size,
                      profile.frame_size, device=device) * 2 - 1
    inputs, target = split_clip(clip, variant)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)
    flops = step_flops(model, optimizer, inputs, target, variant)
    precision = "bf16" if options["bf16"] else "fp32"
    compile_s = 0.0
    if options["compile"]:
        model = torch.compile(model)
        started = time.perf_counter()
        training_step(model, optimizer, inputs, target, variant, precision)
        synchronize(device)
        compile_s = time.perf_counter() - started
    for _ in range(2):
        training_step(model, optimizer, inputs, target, variant, precision)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        training_step(model, optimizer, inputs, target, variant, precision)
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    return {"variant": variant.name, "batch": batch, "ms_per_step": seconds * 1000,
            "samples_per_s": batch / seconds, "gflop_per_sample": flops / batch / 1e9,
            "gflop_per_s": flops / seconds / 1e9, "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["default", "paper"], choices=list(SIZE_DATASETS))
    parser.add_argument("--variants", nargs="+", default=["mnad-pred", "mnad-recon", "memae"])
    parser.add_argument("--settings", nargs="+", default=["baseline", "channels_last"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement (paper size: use 2-3)")
    parser.add_argument("--batch", nargs="*", default=[], metavar="SIZE=N",
                        help="override the profile's batch at a size, e.g. paper=2")
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    params = load_params(args.params)
    batches = dict(item.split("=") for item in args.batch)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    matmul = matmul_gflops(device)
    print(f"fp32 matrix product (2048^3): {matmul:.1f} GFLOP/s on {device}, {torch.get_num_threads()} threads")
    rows = []
    for size in args.sizes:
        dataset = params.dataset(SIZE_DATASETS[size])
        for name in args.variants:
            variant = params.variant(name)
            profile = dataset.training_profile(variant)
            if size in batches:
                profile = profile.model_copy(update={"batch_size": int(batches[size])})
            for setting in args.settings:
                row = {"size": size, "frame": profile.frame_size, "width": profile.width,
                       **measure(variant, profile, setting, args.steps, device)}
                row["matmul_ratio"] = row["gflop_per_s"] / matmul
                rows.append(row)
                print(f"  {size} {name} {setting}: {row['samples_per_s']:.2f} samples/s, "
                      f"{row['gflop_per_s']:.1f} GFLOP/s ({row['matmul_ratio']:.0%} of matmul)", flush=True)
        baseline = {r["variant"]: r["samples_per_s"] for r in rows if r["size"] == size and r["setting"] == "baseline"}
        for row in rows:
            if row["size"] == size and row["variant"] in baseline:
                row["speedup"] = row["samples_per_s"] / baseline[row["variant"]]
    matmul_end = matmul_gflops(device)  # the rate can drift (clocks, other load): both ends are reported
    report(rows, args.json, matmul_gflops=matmul, matmul_gflops_end=matmul_end, device=str(device))


if __name__ == "__main__":
    main()
