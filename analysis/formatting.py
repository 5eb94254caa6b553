"""How the report writes numbers and figure links, shared by the claims' evidence lines and the report's tables."""
from __future__ import annotations

import math

from analysis.common import mean_std


def percent(values) -> str:
    """AUCs as 'mean ± std' in percent over seeds."""
    return mean_std(values, digits=1, scale=100)


def points(value: float) -> str:
    """A difference of AUCs in points (x100), signed; a rounded zero is +0.0, never -0.0."""
    if value is None or math.isnan(value):
        return "NaN"
    return f"{round(100 * value, 1) + 0.0:+.1f}"


def seeds(count: int) -> str:
    return f"{count} seed" + ("" if count == 1 else "s")


def figure_links(links: list[str]) -> list[str]:
    """One 'figures: ...' line of the links that were made (a figure not made links as ''); none if none was."""
    present = [link for link in links if link]
    return ["figures: " + ", ".join(present)] if present else []
