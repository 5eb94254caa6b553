"""What every benchmark script shares: the machine's description, the in-run fp32 matrix-product rate that speed
ratios are taken against, peak resident memory, and printing a table and writing it as JSON.

Only ratios measured in one run compare across machines (AVX-512 or not, bf16 or not), so each script times the
matrix product itself, in the same process, next to what it measures.
"""
from __future__ import annotations

import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline import allocator, cpu_kernels, cpu_model  # noqa: E402  (first: pins the CPU kernels of numpy and torch)
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from pipeline.io import write_json  # noqa: E402


def machine() -> dict:
    """The facts a speed figure depends on."""
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_model(),
            "cpu_kernels": cpu_kernels(), "allocator": allocator(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """The best rate of a size x size x size matrix product (2 size^3 flops), after one warm-up product."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


def folder_mb(folder: Path, pattern: str = "*") -> float:
    """Size on disk of the files under `folder` matching `pattern`."""
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file()) / 2 ** 20


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(rows: list[dict], json_path: Path | None, **context) -> None:
    """Print `rows` as a table and, with `json_path`, write {machine, context..., rows} there."""
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if json_path is not None:
        write_json(json_path, {"machine": machine(), **context, "rows": rows})
        print(f"wrote {json_path}")
