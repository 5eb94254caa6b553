"""Analysis stages that rebuild the RC2020 findings from the runs of the study, and the report written from them.

Each module is a DVC stage run as `python -m analysis.<module> [--dataset D]`; it reads runs/ (and, for the
model-based analyses, data/frames/), and writes figures under analysis/figures/<topic>/<dataset>/ and the tables
behind them under analysis/tables/<topic>/<dataset>/. analysis.report turns the tables and the runs' metrics.json
into REPORT.md.
"""

import pipeline  # noqa: F401,E402  (before anything loads numpy or torch: pins their CPU kernels, pipeline/__init__.py)
