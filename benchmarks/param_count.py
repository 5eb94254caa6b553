"""Parameter counts and CPU forward time of the paper configurations: `python benchmarks/param_count.py`.

MNAD variants at the papers' profile (ped2's in params.yaml: width 1.0, 256x256, BGR, 4 input frames for prediction,
1 for reconstruction); MemAE on 16 x 256 x 256 grey clips with 2000 items. Time is one sample, eval mode, no gradient,
best of `--repeats` after one warm-up pass.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (first: pins the CPU kernels of numpy and torch, as every stage does)
import torch  # noqa: E402

from models.build import build_model  # noqa: E402
from models.clips import split_clip  # noqa: E402
from pipeline.config import load_params  # noqa: E402

VARIANTS = ("mnad-pred", "mnad-recon", "ae-pred", "memae")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    params = load_params()
    profile = params.dataset("ped2").profile
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, ped2's profile "
          f"(width {profile.width}, {profile.frame_size}x{profile.frame_size})")
    print(f"{'variant':<12} {'input':<22} {'parameters':>12} {'memory buffer':>14} {'forward s':>10}")
    for name in VARIANTS:
        variant = params.variant(name)
        torch.manual_seed(0)
        model = build_model(variant, profile).eval()
        channels = 1 if variant.grayscale else profile.channels
        clip = torch.rand(1, variant.window, channels, profile.frame_size, profile.frame_size) * 2 - 1
        inputs, _ = split_clip(clip, variant)
        parameters = sum(p.numel() for p in model.parameters())
        buffer = model.memory.items.numel() if variant.memory == "mnad" else 0
        with torch.no_grad():
            model(inputs)
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                model(inputs)
                times.append(time.perf_counter() - started)
        print(f"{name:<12} {str(list(inputs.shape)):<22} {parameters:>12,} {buffer:>14,} {min(times):>10.3f}")


if __name__ == "__main__":
    main()
