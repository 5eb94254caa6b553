"""Learning curves that size the default study: AUC (per anomaly type) and training loss against training steps.

    python benchmarks/learning_curve.py [--params params.yaml] [--dataset synthetic] [--epochs 1 2 4 8]
        [--variants mnad-pred mnad-recon memae 'memae:shrink_threshold=0.0005'] [--seed 0] [--out analysis]

A variant may carry option overrides after a colon (`memae:shrink_threshold=0.0005,entropy_weight=0`): it is then
trained as a copy of that variant with those options, under that label. For each variant and each training length (the dataset's profile with `epochs` replaced; the cosine schedule spans
each length), trains one seed from scratch on the dataset's frames (prepared into a temporary folder), evaluates it
as the run stage does, and records the steps, the seconds, the learning gate's numbers and the AUCs. Writes
<out>/tables/budget/learning_curve.csv and <out>/figures/budget/learning_curve.png (REPORT.md links them), and
prints the table. Nothing is logged to MLflow.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis import plotting  # noqa: E402
from pipeline.checkpoint import load_trained_model  # noqa: E402
from pipeline.config import ANOMALY_TYPES, load_params  # noqa: E402
from pipeline.device import compute_device  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.gate import learning_gate  # noqa: E402
from pipeline.io import write_csv  # noqa: E402
from pipeline.paths import frames_dir, run_dir  # noqa: E402
from pipeline.prepare import prepare  # noqa: E402
from pipeline.train import train  # noqa: E402


def curve(params_path: Path | None, dataset_name: str, variants: list[str], epoch_list: list[int], seed: int,
          work: Path) -> pd.DataFrame:
    params = load_params(params_path)
    base = params.dataset(dataset_name)
    prepare(dataset_name, params_path, work / "data")
    frames = frames_dir(dataset_name, work / "data")
    device = compute_device()
    rows = []
    for variant_name in variants:
        variant = labelled_variant(params, variant_name)
        for epochs in epoch_list:
            dataset = base.model_copy(update={"profile": base.profile.model_copy(update={"epochs": epochs})})
            out = run_dir(dataset_name, variant_name.replace(":", "_"), seed, work / f"runs-{epochs}")
            started = time.perf_counter()
            training = train(dataset, variant, seed, frames, out, device)
            last = training.log[-1]
            seconds = time.perf_counter() - started
            model = load_trained_model(training.checkpoint, dataset, variant, seed, frames, device)
            metrics = evaluate(model, variant, seed, frames, out, params.evaluate, dataset.profile.update_threshold,
                               device)
            gate = learning_gate([r["step"] for r in training.log], [r["loss"] for r in training.log],
                                 metrics["normal_psnr"], metrics["floor_psnr"], variant.task,
                                 params.gate.plateau_window, params.gate.plateau_tolerance,
                                 params.gate.floor_margin_db)
            headline = metrics[metrics["headline"]]
            row = {"dataset": dataset_name, "variant": variant_name, "seed": seed, "epochs": epochs,
                   "steps": training.log[-1]["step"], "train_seconds": round(seconds, 1),
                   "final_loss": last["loss"], "zero_rows": last.get("zero_rows", np.nan),
                   "relative_improvement": gate["relative_improvement"],
                   "plateaued": gate["plateaued"], "normal_psnr": gate["normal_psnr"],
                   "floor_psnr": gate["floor_psnr"], "learnt": gate["learnt"], "auc_micro": headline["auc_micro"],
                   **{f"auc_{kind}": headline.get(f"auc_{kind}", np.nan) for kind in ANOMALY_TYPES}}
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return pd.DataFrame(rows)


def labelled_variant(params, label: str):
    """`name` or `name:option=value,...`: the variant, with the options replaced and the label as its name."""
    name, _, options = label.partition(":")
    variant = params.variant(name)
    if not options:
        return variant
    changed = {}
    for assignment in options.split(","):
        key, value = assignment.split("=")
        current = getattr(variant, key)
        changed[key] = type(current)(value) if not isinstance(current, bool) else value.lower() == "true"
    return variant.model_copy(update={**changed, "name": label})


def figure(table: pd.DataFrame, path: Path) -> Path:
    """Per variant: AUC per anomaly type and micro AUC against steps (left axis), training loss (right axis)."""
    variants = list(dict.fromkeys(table["variant"]))
    fig, axes = plotting.figure(1, len(variants), panel=(3.4, 2.8))
    for ax, variant in zip(axes[0], variants):
        rows = table[table["variant"] == variant].sort_values("steps")
        for column, style in (("auc_micro", "-"), *((f"auc_{k}", ":") for k in ANOMALY_TYPES)):
            ax.plot(rows["steps"], rows[column], style, marker="o", markersize=3, label=column.removeprefix("auc_"))
        ax.set(xscale="log", ylim=(0.3, 1.02), xlabel="training steps", ylabel="AUC", title=variant)
        loss = ax.twinx()
        loss.plot(rows["steps"], rows["final_loss"], color="grey", linewidth=0.8, label="final loss")
        loss.set_ylabel("final training loss")
        loss.grid(False)
        for _, row in rows[~rows["learnt"].astype(bool)].iterrows():   # the gate's verdict on each length
            ax.annotate("not learnt", (row["steps"], 0.32), fontsize=6, rotation=90, ha="center", va="bottom")
    axes[0, 0].legend(loc="lower right")
    fig.suptitle("Learning curves: AUC and training loss against steps (one seed, each length its own schedule)")
    return plotting.save(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--variants", nargs="+", default=["mnad-pred", "mnad-recon", "memae"])
    parser.add_argument("--epochs", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "analysis")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="learning-curve-") as work:
        table = curve(args.params, args.dataset, args.variants, args.epochs, args.seed, Path(work))
    write_csv(args.out / "tables" / "budget" / "learning_curve.csv", table)
    figure(table, args.out / "figures" / "budget" / "learning_curve.png")
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
