"""Learning curves that size the default study: AUC (per anomaly type) and training loss against training steps.

    python benchmarks/learning_curve.py [--params params.yaml] [--dataset synthetic] [--epochs 2 4 6 8]
        [--variants mnad-pred mnad-recon memae] [--probes 'memae:shrink_threshold=0.0025' 'memae@width=0.5']
        [--probe-epochs 4] [--seed 0] [--out analysis] [--append]

A variant may carry option overrides after a colon (`memae:shrink_threshold=0.0005,entropy_weight=0`), profile
overrides after an at sign (`memae@width=0.5`) and overrides of the dataset's generator after a hash
(`memae#normal_speed=1.25,anomaly_speed=2.5`: frames rendered for that label alone; analysis.probes reads these
labels; a probe's `frame_size` renders its frames at that size too): it is then trained as a copy with those
options, under that label. Probes (`--probes`) are such labels
trained at one length only (`--probe-epochs`), to test one suspect at a time; they are rows of the table, not curves
of the figure. For each variant and each training length (the family's settings with `epochs` replaced; the cosine
schedule spans each length), trains one seed from scratch on the dataset's frames (prepared into a temporary folder),
evaluates it as the run stage does, and records the settings it trained with (frame size, width, batch, lr, clips
per epoch: REPORT.md calls a row stale when its label no longer gives them), the steps, the seconds, the learning
gate's numbers and the AUCs (micro, and per anomaly type against all and against clean normal frames:
analysis.anomaly_types).
Writes <out>/tables/budget/learning_curve.csv and <out>/figures/budget/learning_curve.png (REPORT.md links them),
and prints the table. Nothing is logged to MLflow. `--append` keeps the table's other rows: a row of the same
dataset, label, epochs and seed is replaced (one more probe without training the curves again; `--variants` then
defaults to none).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (first: pins the CPU kernels of numpy and torch, as every stage does)
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from analysis import plotting  # noqa: E402
from analysis.anomaly_types import abnormal_before, aucs_by_normal_set, clean_normal  # noqa: E402
from analysis.common import SCORE_COLUMNS, Run  # noqa: E402
from analysis.probes import curve_profile, labelled_variant, profile_settings  # noqa: E402
from analysis.results import clean_auc_column  # noqa: E402
from pipeline.checkpoint import load_trained_model  # noqa: E402
from pipeline.config import ANOMALY_TYPES, DEFAULT_PARAMS, load_params  # noqa: E402
from pipeline.data import read_labels  # noqa: E402
from pipeline.device import compute_device  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.gate import learning_gate  # noqa: E402
from pipeline.io import write_csv  # noqa: E402
from pipeline.paths import frames_dir, run_dir  # noqa: E402
from pipeline.prepare import prepare  # noqa: E402
from pipeline.train import train  # noqa: E402


def curve(params_path: Path | None, dataset_name: str, jobs: list[tuple[str, int, bool]], seed: int,
          work: Path) -> pd.DataFrame:
    """One row per (label, epochs, probe) of `jobs`."""
    params = load_params(params_path)
    base = params.dataset(dataset_name)
    device = compute_device()
    rows = []
    for variant_name, epochs, probe in jobs:
        variant, profile_options, source_options = labelled_variant(params, variant_name, base)
        frames = rendered(params_path, dataset_name, source_options, profile_options.get("frame_size"), work)
        profile = curve_profile(base, variant, profile_options, epochs)
        dataset = base.model_copy(update={"profile": profile,
                                          "source": base.source.model_copy(update=source_options)})
        out = run_dir(dataset_name, "".join(c if c.isalnum() else "_" for c in variant_name), seed,
                      work / f"runs-{epochs}")
        started = time.perf_counter()
        training = train(dataset, variant, seed, frames, out, device)
        last = training.log[-1]
        seconds = time.perf_counter() - started
        model = load_trained_model(training.checkpoint, dataset, variant, seed, frames, device)
        started = time.perf_counter()
        metrics = evaluate(model, variant, seed, frames, out, params.evaluate, dataset.profile.update_threshold,
                           device)
        eval_seconds = time.perf_counter() - started
        gate = learning_gate([r["step"] for r in training.log], [r["loss"] for r in training.log],
                             metrics["normal_psnr"], metrics["floor_psnr"], variant.task,
                             params.gate.plateau_window, params.gate.plateau_tolerance,
                             params.gate.floor_margin_db)
        headline = metrics[metrics["headline"]]
        scores = Run(dataset_name, variant_name, seed, out).scores()
        clean_frames = clean_normal(scores, abnormal_before(read_labels(frames)), variant)
        clean = aucs_by_normal_set(scores, clean_frames, SCORE_COLUMNS[metrics["headline"]])["clean"]
        row = {"dataset": dataset_name, "variant": variant_name, "probe": probe, "seed": seed, "epochs": epochs,
               **profile_settings(profile),
               "steps": training.log[-1]["step"], "train_seconds": round(seconds, 1),
               "eval_seconds": round(eval_seconds, 1), "updated_frames": headline.get("updated_frames", 0),
               "final_loss": last["loss"], "zero_rows": last.get("zero_rows", np.nan),
               "late_improvement": gate["late_improvement"],
               "plateaued": gate["plateaued"], "normal_psnr": gate["normal_psnr"],
               "floor_psnr": gate["floor_psnr"], "learnt": gate["learnt"], "auc_micro": headline["auc_micro"],
               **{f"auc_{kind}": headline.get(f"auc_{kind}", np.nan) for kind in ANOMALY_TYPES},
               **{clean_auc_column(kind): clean.get(kind, np.nan) for kind in ANOMALY_TYPES}}
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return pd.DataFrame(rows)


def appended(earlier: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """The earlier table with the new rows added; an earlier row of the same (dataset, variant, epochs, seed) gives
    way to the new one in its place (the table keeps its order), the other new rows come last."""
    key = ["dataset", "variant", "epochs", "seed"]
    table = pd.concat([earlier, new], ignore_index=True)
    first_seen = table.groupby(key, sort=False).ngroup()   # a key's place: where it first appears
    return (table.assign(_place=first_seen).drop_duplicates(key, keep="last")
            .sort_values("_place", kind="stable").drop(columns="_place").reset_index(drop=True))


def rendered(params_path: Path | None, dataset_name: str, source_changes: dict, frame_size: int | None,
             work: Path) -> Path:
    """The frames folder of the dataset, with `source_changes` applied to its generator and stored at `frame_size`
    (None: the profile's): prepared once per distinct change under `work` (a params file of their own, so that
    prepare renders exactly what the label says)."""
    changes = {**source_changes, **({"frame_size": frame_size} if frame_size is not None else {})}
    name = "data" + "".join(f"-{k}={v}" for k, v in sorted(changes.items()))
    frames = frames_dir(dataset_name, work / name)
    if not frames.exists():
        path = params_path
        if changes:
            raw = yaml.safe_load((params_path or DEFAULT_PARAMS).read_text())
            raw["datasets"][dataset_name]["source"].update(source_changes)
            if frame_size is not None:
                raw["datasets"][dataset_name]["profile"]["frame_size"] = frame_size
            path = work / f"params-{name}.yaml"
            path.write_text(yaml.safe_dump(raw, sort_keys=False))
        prepare(dataset_name, path, work / name)
    return frames


def figure(table: pd.DataFrame, path: Path) -> Path | None:
    """Per variant: AUC per anomaly type and micro AUC against steps (left axis), training loss (right axis). Probes
    are not curves: a table of probes only draws nothing (None)."""
    table = table[~table["probe"].astype(bool)]
    if table.empty:
        return None
    variants = list(dict.fromkeys(table["variant"]))
    fig, axes = plotting.figure(1, len(variants), panel=(3.4, 2.8))
    for ax, variant in zip(axes[0], variants):
        rows = table[table["variant"] == variant].sort_values("steps")
        for column, style, label in (("auc_micro", "-", "micro"),
                                     *((clean_auc_column(k), ":", k) for k in ANOMALY_TYPES)):
            ax.plot(rows["steps"], rows[column], style, marker="o", markersize=3, label=label)
        ax.set(xscale="log", ylim=(0.3, 1.02), xlabel="training steps", ylabel="AUC", title=variant)
        # the lengths measured as the ticks, in plain numbers (a log axis's own labels overlap on a short span)
        ax.set_xticks(rows["steps"], [str(int(s)) for s in rows["steps"]], rotation=45, fontsize=7)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        loss = ax.twinx()
        loss.plot(rows["steps"], rows["final_loss"], color="grey", linewidth=0.8, label="final loss")
        loss.set_ylabel("final training loss")
        loss.grid(False)
        for _, row in rows[~rows["learnt"].astype(bool)].iterrows():   # the gate's verdict on each length
            ax.annotate("not learnt", (row["steps"], 0.32), fontsize=6, rotation=90, ha="center", va="bottom")
    axes[0, 0].legend(loc="lower right")
    fig.suptitle("Learning curves: AUC (micro; per type against clean normal frames) and training loss against "
                 "steps (one seed, each length its own schedule)")
    return plotting.save(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="default: mnad-pred mnad-recon memae (none with --append)")
    parser.add_argument("--epochs", nargs="+", type=int, default=[2, 4, 6, 8])
    parser.add_argument("--probes", nargs="*", default=[])
    parser.add_argument("--probe-epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "analysis")
    parser.add_argument("--append", action="store_true", help="keep the table's other rows")
    args = parser.parse_args()
    if args.variants is None:
        args.variants = [] if args.append else ["mnad-pred", "mnad-recon", "memae"]
    with tempfile.TemporaryDirectory(prefix="learning-curve-") as work:
        jobs = [(v, e, False) for v in args.variants for e in args.epochs]
        jobs += [(p, args.probe_epochs, True) for p in args.probes]
        table = curve(args.params, args.dataset, jobs, args.seed, Path(work))
    path = args.out / "tables" / "budget" / "learning_curve.csv"
    if args.append and path.exists():
        table = appended(pd.read_csv(path), table)
    write_csv(path, table)
    if figure(table, args.out / "figures" / "budget" / "learning_curve.png") is None:
        print("only probes in the table: no curve to draw")
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
