"""The stage of the analyses that read only the runs' scores: `python -m analysis.score_analyses --dataset D`
(`score_analyses@<dataset>`).

Score timelines and ROC curves (evidence for C1, C2, C10) and the paired-bootstrap comparisons behind the claims'
verdicts. No model is loaded, so a change to the bootstrap's settings reruns only this.
"""
from __future__ import annotations

from analysis.common import stage_main
from analysis.comparisons import compare
from analysis.timelines import timelines

main = stage_main("analyses of the runs' scores (timelines, ROC, comparisons)",
                  {"timelines": timelines, "comparisons": compare})

if __name__ == "__main__":
    raise SystemExit(main())
