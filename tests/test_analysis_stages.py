"""Every analysis stage on a tiny study: untrained models saved in the real checkpoint format over the `tiny`
frames, and crafted scores.csv / metrics.json / roc.csv beside them (the real evaluate stage is tested elsewhere)."""
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from threadpoolctl import threadpool_limits

from analysis import anomaly_types, comparisons, memory_usage, replacement, timelines, tsne
from analysis.common import Run
from analysis.inference import LoadedRun, loaded_run
from models.build import build_model
from models.clips import split_clip
from pipeline.checkpoint import fingerprint, save_checkpoint, training_config
from pipeline.config import DEFAULT_PARAMS, REPO_ROOT, load_params
from pipeline.data import clip_dataset
from pipeline.metrics import UsageAccumulator, roc_points, summarise
from pipeline.paths import frames_dir, run_dir
from pipeline.scoring import psnr

VARIANTS = ["ae-recon", "ae-pred", "mnad-recon", "mnad-pred", "mnad-pred-nosep", "mnad-pred-uniform",
            "mnad-recon-skip-sp25", "memae"]
SEEDS = [0, 1]
# How well each variant's crafted normality score separates normal from abnormal frames.
QUALITY = {"ae-recon": 0.2, "ae-pred": 0.4, "mnad-recon": 0.5, "mnad-pred": 1.0, "mnad-pred-nosep": 0.9,
           "mnad-pred-uniform": 0.9, "mnad-recon-skip-sp25": 0.6, "memae": 0.6, "copy-last": 0.3}


def write_params(path, **analysis):
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    raw["study"] = {"datasets": ["tiny"], "variants": VARIANTS, "complex_datasets": [], "complex_variants": [],
                    "seeds": SEEDS}
    raw["analysis"].update({"tsne_queries": 120, "tsne_perplexity": 10, "usage_train_windows": 8,
                            "bootstrap_samples": 200, "replacement_examples": 2, "timeline_videos": 2, **analysis})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP spin-waiting makes torch and
    sklearn's t-SNE 30x slower with two threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(previous)


def calibrate_batchnorm(model, variant, data_root):
    """An untrained network in eval mode keeps unit running statistics, so its activations shrink layer by layer
    and the output hardly depends on the input; one train-mode pass over a few clips sets them from data."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: one pass sets the statistics of that batch
    train = clip_dataset(frames_dir("tiny", data_root), "train", variant)
    clips = torch.stack([train[i]["clip"] for i in range(0, len(train), max(1, len(train) // 8))])
    model.train()
    with torch.no_grad():
        model(split_clip(clips, variant)[0])
    model.eval()


def save_untrained(params, variant_name, seed, runs_root, data_root):
    """A finished checkpoint as pipeline.train writes it (its fingerprint matches the params), of a model that was
    never trained."""
    dataset, variant = params.dataset("tiny"), params.variant(variant_name)
    torch.manual_seed(seed)
    model = build_model(variant, dataset.profile)
    calibrate_batchnorm(model, variant, data_root)
    path = run_dir("tiny", variant_name, seed, runs_root) / "checkpoint.pt"
    config = training_config(dataset, variant, seed, frames_dir("tiny", data_root))
    save_checkpoint(path, {"model": model.state_dict(), "config": config, "fingerprint": fingerprint(config),
                           "epoch": dataset.profile.epochs})
    return path


def write_crafted_scores(params, variant_name, seed, data_root, runs_root):
    """scores.csv, metrics.json and roc.csv in the evaluate stage's format, from a crafted normality score."""
    variant = params.variant(variant_name)
    windows = clip_dataset(frames_dir("tiny", data_root), "test", variant).windows
    scores = windows[["video", "frame", "label", "anomaly_type"]].copy()
    rng = np.random.default_rng(seed * 31 + len(variant_name))
    normal = 1 - scores["label"].to_numpy()
    score = np.clip(0.3 + QUALITY[variant_name] * 0.4 * normal + rng.normal(0, 0.15, len(scores)), 0, 1)
    scores["psnr"] = 20 + 10 * score
    scores["score"] = score
    metrics = {"frames": len(scores), "videos": int(scores["video"].nunique()),
               "without_update": {**summarise(scores, "score", 0), "mean_psnr": float(scores["psnr"].mean())}}
    if variant.memory == "mnad":
        scores["distance"] = 1 - score
        scores["psnr_update"], scores["distance_update"], scores["score_update"] = scores["psnr"], 1 - score, score
        metrics["with_update"] = {**summarise(scores, "score_update", 0), "mean_psnr": float(scores["psnr"].mean())}
    out = run_dir("tiny", variant_name, seed, runs_root)
    out.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out / "scores.csv", index=False)
    roc_points(scores["label"].to_numpy(), score).to_csv(out / "roc.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture(scope="module")
def study(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    params = write_params(root / "params.yaml")
    runs_root = root / "runs"
    for variant in VARIANTS:
        for seed in SEEDS:
            save_untrained(params, variant, seed, runs_root, tiny_data)
            write_crafted_scores(params, variant, seed, tiny_data, runs_root)
    write_crafted_scores(params, "copy-last", 0, tiny_data, runs_root)
    return {"params": params, "runs": runs_root, "data": tiny_data, "out": root / "analysis"}


def roots(study):
    return {"runs_root": study["runs"], "data_root": study["data"], "out_root": study["out"]}


def test_memory_usage_writes_histograms_and_a_row_per_run_and_split(study):
    usage = memory_usage.memory_usage("tiny", study["params"], **roots(study))
    memory_variants = [v for v in VARIANTS if study["params"].variant(v).has_memory]
    assert len(usage) == len(memory_variants) * len(SEEDS) * 2
    table = pd.read_csv(study["out"] / "tables" / "memory_usage" / "tiny" / "usage.csv")
    counts = pd.read_csv(study["out"] / "tables" / "memory_usage" / "tiny" / "counts.csv")
    assert set(table["split"]) == {"test", "train"}
    # the counts table lists each used item once and sums to the queries of each histogram
    keyed = table.set_index(["variant", "seed", "split"]).sort_index()
    summed = counts.groupby(["variant", "seed", "split"])["count"].agg(["sum", "size"])
    assert (summed["sum"].values == keyed.loc[summed.index, "queries"].values).all()
    assert (summed["size"].values == keyed.loc[summed.index, "items_used"].values).all()
    assert (keyed.loc["memae", "items"] == 2000).all() and (keyed.loc["mnad-pred", "items"] == 10).all()
    for name in ("usage.png", "pred_vs_uniform.png"):
        assert (study["out"] / "figures" / "memory_usage" / "tiny" / name).stat().st_size > 1000


def test_usage_numbers_on_crafted_counts():
    def usage(counts):
        accumulator = UsageAccumulator(len(counts), 1, 2)
        accumulator.add(np.repeat(np.arange(len(counts)), counts)[:, None], np.zeros((int(sum(counts)), 1, 2)))
        return accumulator

    collapsed = memory_usage.usage_row(usage(np.array([0, 0, 57, 0, 0])), collapse_share=0.9)
    assert collapsed["entropy"] == 0.0 and collapsed["items_used"] == 1 and collapsed["collapsed"] == 1
    assert collapsed["top_item"] == 2 and collapsed["top_share"] == 1.0
    even = memory_usage.usage_row(usage(np.full(10, 7)), collapse_share=0.9)
    assert math.isclose(even["entropy"], math.log(10)) and math.isclose(even["entropy"], even["max_entropy"])
    assert math.isclose(even["perplexity"], 10) and even["items_used"] == 10 and even["collapsed"] == 0


def test_a_memory_that_every_query_picks_one_item_of_is_flagged_collapsed(study, tmp_path):
    """Constant queries (the encoder's last conv zeroed to its bias) all pick one item: the stage must say so."""
    params = write_params(tmp_path / "params.yaml")
    runs_root = tmp_path / "runs"
    for seed in SEEDS:
        path = save_untrained(params, "mnad-pred", seed, runs_root, study["data"])
        state = torch.load(path, weights_only=True)
        last_conv = "encoder.block4.3"
        state["model"][f"{last_conv}.weight"].zero_()
        state["model"][f"{last_conv}.bias"].copy_(torch.linspace(-1, 1, state["model"][f"{last_conv}.bias"].numel()))
        save_checkpoint(path, state)
    usage = memory_usage.memory_usage("tiny", params, runs_root, study["data"], tmp_path / "analysis")
    assert len(usage) == len(SEEDS) * 2  # only mnad-pred has a checkpoint here
    assert (usage["entropy"] == 0).all() and (usage["items_used"] == 1).all() and (usage["collapsed"] == 1).all()
    assert (usage["top_share"] == 1.0).all()


def test_tsne_writes_embedding_silhouettes_and_the_figure(study):
    silhouettes = tsne.tsne("tiny", study["params"], **roots(study))
    assert sorted(silhouettes["variant"].unique()) == sorted(tsne.VARIANTS)
    assert len(silhouettes) == len(tsne.VARIANTS) * len(SEEDS)
    assert (silhouettes["queries"] == 120).all()
    embedding = pd.read_csv(study["out"] / "tables" / "tsne" / "tiny" / "embedding.csv")
    # one embedding per variant (its first seed), the 10 memory items embedded with the queries
    assert (embedding[embedding["kind"] == "item"].groupby("variant").size() == 10).all()
    assert (embedding.groupby("variant")["seed"].unique().map(len) == 1).all()
    assert (study["out"] / "figures" / "tsne" / "tiny" / "tsne.png").exists()


def test_silhouette_is_nan_with_one_item_and_high_for_separated_clusters():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(40, 8))
    assert math.isnan(tsne.silhouette(queries, np.zeros(40, dtype=int)))
    centres = np.eye(8)[[0, 4]]
    clustered = np.concatenate([centre + 0.01 * rng.normal(size=(20, 8)) for centre in centres])
    assert tsne.silhouette(clustered, np.repeat([0, 1], 20)) > 0.9


def test_the_tsne_subsample_is_fixed_by_the_seed(study):
    params = study["params"]
    run = Run("tiny", "mnad-pred", 0, run_dir("tiny", "mnad-pred", 0, study["runs"]))
    first = tsne.sample_queries(LoadedRun(run, params, study["data"]), 50, 16)
    again = tsne.sample_queries(LoadedRun(run, params, study["data"]), 50, params.evaluate.batch_size)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])


@pytest.mark.parametrize("variant", ["mnad-pred", "memae"])
def test_encodings_give_the_queries_and_items_of_the_full_forward_pass(study, variant):
    """memory_usage and tsne run only the encoder and the memory read: what they see must be what the whole model
    sees."""
    loaded = LoadedRun(Run("tiny", variant, 0, run_dir("tiny", variant, 0, study["runs"])), study["params"],
                       study["data"])
    dataset, indices = loaded.windows("test"), [0, 3, 4, 9, 10]
    encoded = list(loaded.encodings(dataset, indices, batch_size=2))
    full = list(loaded.batches(dataset, indices, batch_size=2))
    assert [list(chosen) for chosen, _ in encoded] == [[0, 3], [4, 9], [10]]
    for (_, encoding), (_, _, _, result) in zip(encoded, full):
        assert torch.equal(encoding.queries, result.queries) and torch.equal(encoding.nearest, result.nearest)


def test_replacement_table_covers_every_part_and_fill_and_writes_examples(study):
    table = replacement.replacement("tiny", study["params"], **roots(study))
    assert set(table["variant"]) == set(study["params"].analysis.replacement_variants)
    per_run = table.groupby(["variant", "seed"]).size()
    assert (per_run == 1 + 9).all()  # normal + 3 parts x 3 fills
    replaced = table[table["part"] != "none"]
    assert replaced["psnr_to_normal"].notna().all() and table[table["part"] == "none"]["psnr_to_normal"].isna().all()
    assert table["auc_psnr"].between(0, 1).all() and table["auc_score"].between(0, 1).all()
    figures = study["out"] / "figures" / "replacement" / "tiny"
    assert (figures / "psnr_to_normal.png").exists()
    for variant in study["params"].analysis.replacement_variants:
        assert (figures / f"examples_{variant}.png").exists()


def test_replacement_really_reaches_the_decoder_and_changes_a_skipless_output(study):
    run = Run("tiny", "mnad-recon", 0, run_dir("tiny", "mnad-recon", 0, study["runs"]))
    loaded = LoadedRun(run, study["params"], study["data"])
    assert not loaded.variant.skips
    seen = []
    handle = loaded.model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        series, _, _ = replacement.replaced_outputs(loaded, batch_size=80, examples=np.array([0]))
    finally:
        handle.remove()
    channels = loaded.model.encoder.out_channels
    normal, *replaced = seen  # one batch: the normal pass, then the replacements in order
    order = replacement.replacements(has_memory=True)
    by_setting = dict(zip(order, replaced))
    assert torch.all(by_setting["query", "zeros"][:, :channels] == 0)
    assert torch.equal(by_setting["query", "zeros"][:, channels:], normal[:, channels:])  # the read is untouched
    assert torch.all(by_setting["read", "ones"][:, channels:] == 1)
    assert torch.equal(by_setting["read", "ones"][:, :channels], normal[:, :channels])
    assert torch.all(by_setting["both", "zeros"] == 0)
    random = by_setting["both", "random"]
    assert not torch.equal(random, normal) and abs(float(random.std()) - 1.0) < 0.2
    for setting in order:  # without skips, every replacement changes the output (identical outputs give 100 dB)
        assert series[setting]["to_normal"].max() < 100.0, setting


def test_anomaly_types_tabulates_per_type_auc_and_draws_examples(study):
    table = anomaly_types.anomaly_types("tiny", study["params"], **roots(study))
    headline = table[table["headline"]]
    assert set(headline["anomaly_type"]) == {"spatial", "temporal", "spatio_temporal"}
    assert "copy-last" in set(headline["variant"])
    # one headline value per (run, type, normal set); MNAD-memory variants also list the with-update block
    assert (headline.groupby(["variant", "seed", "normal", "anomaly_type"]).size() == 1).all()
    assert set(headline["normal"]) == {"all", "clean"}
    assert set(table[table["variant"] == "mnad-pred"]["scoring"]) == {"without_update", "with_update"}
    # against all normal frames: the values the run recorded in its metrics.json
    for row in table[table["normal"] == "all"].itertuples():
        metrics = json.loads((run_dir("tiny", row.variant, row.seed, study["runs"]) / "metrics.json").read_text())
        assert row.auc == metrics[row.scoring][f"auc_{row.anomaly_type}"]
    figures = study["out"] / "figures" / "anomaly_types" / "tiny"
    assert (figures / "per_type_auc.png").stat().st_size > 1000 and (figures / "examples.png").stat().st_size > 1000


def test_clean_normal_frames_are_those_whose_scoring_window_holds_no_abnormal_frame():
    params = load_params(None)
    # video 00: 40 frames, abnormal (spatial) at 8-10; video 01: 40 normal frames
    labels = pd.DataFrame({"split": "test", "video": ["00"] * 40 + ["01"] * 40, "frame": [*range(40), *range(40)],
                           "label": [1 if 8 <= f <= 10 else 0 for f in range(40)] + [0] * 40})
    labels["anomaly_type"] = np.where(labels["label"] == 1, "spatial", "")
    counts = anomaly_types.abnormal_before(labels)

    def clean_frames(variant, first, last):  # the variant's scored frames: first..last of each video
        scores = labels[(labels["frame"] >= first) & (labels["frame"] <= last)].reset_index(drop=True)
        clean = anomaly_types.clean_normal(scores, counts, params.variant(variant))
        return {video: scores["frame"][clean & (scores["video"] == video)].tolist() for video in ("00", "01")}

    # reconstruction scores the frame alone: every normal frame is clean
    assert clean_frames("mnad-recon", 0, 39) == {"00": [*range(8), *range(11, 40)], "01": list(range(40))}
    # prediction's window is its 4 inputs and its target: frames 11-14 see the event in their inputs
    assert clean_frames("mnad-pred", 4, 39) == {"00": [4, 5, 6, 7, *range(15, 40)], "01": list(range(4, 40))}
    # MemAE's clip spans 8 frames before and 7 after the scored one: frames 1-18 overlap the event
    assert clean_frames("memae", 8, 32) == {"00": list(range(19, 33)), "01": list(range(8, 33))}

    # all normal frames vs clean ones, for prediction on video 00: the abnormal frames score 0.5, the clean normal
    # frames 1 and the four normal frames whose inputs hold the event 0, so against all 33 normal frames the AUC is
    # 29/33, against the 29 clean ones 1
    scores = labels[(labels["video"] == "00") & (labels["frame"] >= 4)].reset_index(drop=True)
    scores["score"] = np.select([scores["label"] == 1, scores["frame"].between(11, 14)], [0.5, 0.0], 1.0)
    clean = anomaly_types.clean_normal(scores, counts, params.variant("mnad-pred"))
    aucs = anomaly_types.aucs_by_normal_set(scores, clean, "score")
    assert aucs == {"all": {"spatial": pytest.approx(29 / 33)}, "clean": {"spatial": 1.0}}
    with pytest.raises(ValueError, match="video '02'"):
        anomaly_types.clean_normal(scores.assign(video="02"), counts, params.variant("mnad-pred"))


def test_event_frames_picks_the_middle_of_the_first_event_of_each_type():
    labels = pd.DataFrame({"split": "test", "video": "00", "frame": range(30),
                           "label": [0] * 5 + [1] * 5 + [0] * 5 + [1] * 4 + [0] * 11,
                           "anomaly_type": [""] * 5 + ["temporal"] * 5 + [""] * 5 + ["spatial"] * 4 + [""] * 11})
    assert anomaly_types.event_frames(labels, skip=4) == {"temporal": ("00", 7), "spatial": ("00", 17)}
    assert anomaly_types.event_frames(labels, skip=16) == {"spatial": ("00", 17)}


def test_timelines_and_roc(study):
    aucs = timelines.timelines("tiny", study["params"], study["runs"], study["out"])
    assert set(aucs["variant"]) == set(VARIANTS) | {"copy-last"}
    videos = pd.read_csv(study["out"] / "tables" / "timelines" / "tiny" / "videos.csv", dtype={"video": str})
    assert videos["shown"].sum() == 2
    for name in ("timelines.png", "roc.png"):
        assert (study["out"] / "figures" / "timelines" / "tiny" / name).stat().st_size > 1000


def test_comparisons_table_and_figure(study):
    table = comparisons.compare("tiny", study["params"], study["runs"], study["out"])
    c1 = table[(table["claim"] == "C1") & (table["comparison"] == "mnad-pred − ae-pred")].iloc[0]
    assert c1["verdict"] == "holds" and c1["low"] > 0 and c1["seeds"] == "2 / 2"
    c2_floor = table[(table["claim"] == "C2") & (table["role"] == "context")].iloc[0]
    assert c2_floor["seeds"] == "2 / 1"  # copy-last has one seed
    c8 = table[table["claim"] == "C8"]
    assert len(c8) == 2  # the one skip variant of this study, against recon and against pred
    assert (study["out"] / "figures" / "comparisons" / "tiny" / "differences.png").exists()


def test_an_analysis_of_a_dataset_without_runs_writes_placeholders(study, tmp_path):
    usage = memory_usage.memory_usage("tiny", study["params"], tmp_path / "no-runs", study["data"], tmp_path)
    assert usage.empty
    assert (tmp_path / "figures" / "memory_usage" / "tiny" / "usage.png").exists()
    assert pd.read_csv(tmp_path / "tables" / "memory_usage" / "tiny" / "usage.csv").empty
    table = comparisons.compare("tiny", study["params"], tmp_path / "no-runs", tmp_path)
    assert (table["verdict"] == "not run here").all()


def test_replacement_on_a_window_sample_uses_exactly_those_windows(study, tmp_path):
    params = write_params(tmp_path / "params.yaml", replacement_windows=12)
    out = tmp_path / "analysis"
    table = replacement.replacement("tiny", params, runs_root=study["runs"], data_root=study["data"], out_root=out)
    run = Run("tiny", "mnad-pred", 1, run_dir("tiny", "mnad-pred", 1, study["runs"]))
    loaded = LoadedRun(run, params, study["data"])
    dataset = loaded.windows("test")
    sample = np.sort(np.random.default_rng(1).choice(len(dataset), size=12, replace=False))  # seeded by the run's seed
    psnrs = np.concatenate([psnr(result.output, target) for _, _, target, result in loaded.batches(dataset, sample, 5)])
    normal = table[(table["variant"] == "mnad-pred") & (table["seed"] == 1) & (table["part"] == "none")]
    assert normal["psnr_to_target"].item() == pytest.approx(psnrs.mean(), rel=1e-6)


def test_the_model_analyses_of_a_dataset_load_each_model_once(study, monkeypatch):
    loads = []
    original = LoadedRun.__init__

    def counted(self, run, *args, **kwargs):
        loads.append((run.variant, run.seed))
        original(self, run, *args, **kwargs)

    monkeypatch.setattr(LoadedRun, "__init__", counted)
    monkeypatch.setattr("analysis.inference._LOADED", {})
    for analyse in (memory_usage.memory_usage, tsne.tsne, replacement.replacement, anomaly_types.anomaly_types):
        analyse("tiny", study["params"], **roots(study))
    assert ("mnad-pred", 0) in loads and len(loads) == len(set(loads))
    run = Run("tiny", "mnad-pred", 0, run_dir("tiny", "mnad-pred", 0, study["runs"]))
    assert loaded_run(run, study["params"], study["data"]) is loaded_run(run, study["params"], study["data"])


def test_the_stages_that_only_read_tables_do_not_import_torch():
    """prepare and the score analyses: torch's import would be most of their start-up. (The report reads where
    each run trained from its checkpoint, so it imports torch.)"""
    code = ("import sys, pipeline.prepare, analysis.score_analyses; "
            "print(sorted(m for m in ('torch', 'sklearn') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
