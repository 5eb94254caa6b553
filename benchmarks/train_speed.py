"""Training and evaluation speed per variant at a dataset's profile size, on random clips (no disk I/O).

    python benchmarks/train_speed.py [--dataset synthetic] [--steps 20]

Prints ms per training sample and per evaluated sample for every variant of the study, plus an estimate of one
training run's compute (profile.epochs x max_train_clips samples). Used to size the synthetic profile.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.build import build_model  # noqa: E402
from models.clips import split_clip  # noqa: E402
from models.losses import compute_loss  # noqa: E402
from pipeline.config import load_params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="synthetic", help="the dataset whose profile sets the sizes")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repository's)")
    parser.add_argument("--frame-size", type=int, default=None, help="override the profile's frame size")
    parser.add_argument("--width", type=float, default=None, help="override the profile's width")
    args = parser.parse_args()
    params = load_params(args.params)
    profile = params.dataset(args.dataset).profile
    profile = profile.model_copy(update={k: v for k, v in (("frame_size", args.frame_size), ("width", args.width))
                                         if v is not None})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"profile of {args.dataset}: {profile.frame_size}px x{profile.channels}, width {profile.width}, "
          f"batch {profile.batch_size}, device {device}, torch threads {torch.get_num_threads()}")
    print(f"{'variant':24s} {'params':>10s} {'train ms/sample':>16s} {'eval ms/sample':>15s} {'train s/run':>12s}")
    for name in (*params.study.variants, "copy-last"):
        variant = params.variant(name)
        torch.manual_seed(0)
        model = build_model(variant, profile).to(device)
        channels = 1 if variant.grayscale else profile.channels
        clip = torch.rand(profile.batch_size, variant.window, channels, profile.frame_size, profile.frame_size,
                          device=device) * 2 - 1
        inputs, target = split_clip(clip, variant)
        train_ms = float("nan")
        if variant.trainable:
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            for step in range(args.steps + 2):
                if step == 2:  # two warm-up steps
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                loss, _ = compute_loss(model(inputs, update_memory=True), target, variant)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_ms = (time.perf_counter() - started) * 1000 / (args.steps * profile.batch_size)
        model.eval()
        with torch.no_grad():
            model(inputs)
            started = time.perf_counter()
            for _ in range(args.steps):
                model(inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
        eval_ms = (time.perf_counter() - started) * 1000 / (args.steps * profile.batch_size)
        samples = profile.epochs * (profile.max_train_clips or 0)
        run_s = train_ms * samples / 1000 if samples else float("nan")
        parameters = sum(p.numel() for p in model.parameters())
        print(f"{name:24s} {parameters:10d} {train_ms:16.2f} {eval_ms:15.2f} {run_s:12.1f}")


if __name__ == "__main__":
    main()
