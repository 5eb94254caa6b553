"""The stage of the analyses that run trained models: `python -m analysis.model_analyses --dataset D`
(`model_analyses@<dataset>`).

Memory usage (claims C5, C6), t-SNE of the queries (C9), feature replacement (C4) and the per-anomaly-type results
with their example events (C7), one after the other in one process: each run's model is loaded once for all of
them (analysis.inference.loaded_run).
"""
from __future__ import annotations

from analysis.anomaly_types import anomaly_types
from analysis.common import stage_main
from analysis.memory_usage import memory_usage
from analysis.replacement import replacement
from analysis.tsne import tsne

main = stage_main("analyses that run the trained models (C4, C5, C6, C7, C9)",
                  {"memory_usage": memory_usage, "tsne": tsne, "replacement": replacement,
                   "anomaly_types": anomaly_types})

if __name__ == "__main__":
    raise SystemExit(main())
