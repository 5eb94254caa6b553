"""Stages and shared data/tracking code of the memvad harness.

Importing the package pins the CPU kernels of torch and numpy to AVX2 on x86-64 machines that have it
(`pin_cpu_kernels`), so that a run repeats the committed numbers bit for bit on any of them. Every stage imports this
package before numpy and torch.
"""
from __future__ import annotations

import os
import platform
import sys
import warnings

# torch's CPU libraries (ATen, oneDNN, MKL) each choose their vector instructions by the CPU they find, and their
# AVX-512 kernels sum in another order than their AVX2 ones: unpinned, seed 0 of synthetic mnad-pred ends 124 steps at
# loss 0.12584 on an AVX-512 machine against 0.12463 on an AVX2 one (micro AUC 83.3 against 82.9); pinned, every digit
# agrees. numpy does the same (its means of the frames' PSNRs then differ in the last bit), and so does the OpenBLAS
# that numpy and scipy bring (Haswell is its AVX2 kernel set). Each library reads its variable once, when it loads.
CPU_KERNEL_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                   "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR", "OPENBLAS_CORETYPE": "Haswell"}
# The libraries whose loading reads them: imported before this package, they are not pinned.
PINNED_LIBRARIES = ("torch", "numpy")
CPU_KERNELS_VARIABLE = "MEMVAD_CPU_KERNELS"   # avx2 (the default) | native: each library's own choice
CPU_KERNEL_CHOICES = ("avx2", "native")


def cpuinfo(field: str) -> str | None:
    """The first CPU's `field` in Linux's /proc/cpuinfo ("model name", "flags"); None where there is none."""
    try:
        with open("/proc/cpuinfo") as lines:
            for line in lines:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name, for the records a number depends on."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_has_avx2() -> bool:
    """Whether this is an x86-64 CPU with AVX2 and FMA (/proc/cpuinfo; elsewhere unknown: False)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = (cpuinfo("flags") or "").split()
    return "avx2" in flags and "fma" in flags


def cpu_kernel_choice() -> str:
    """MEMVAD_CPU_KERNELS, checked: avx2 when unset."""
    choice = os.environ.get(CPU_KERNELS_VARIABLE, "avx2").strip().lower() or "avx2"
    if choice not in CPU_KERNEL_CHOICES:
        raise SystemExit(f"{CPU_KERNELS_VARIABLE}={os.environ[CPU_KERNELS_VARIABLE]!r} is not a choice: use avx2 "
                         f"(the default: the same numbers on every x86-64 CPU with AVX2) or native (each library "
                         f"picks its own kernels: faster on AVX-512 CPUs, numbers differ from the committed ones)")
    return choice


def pin_cpu_kernels() -> bool:
    """Set CPU_KERNEL_PINS (a variable the user set is kept) unless MEMVAD_CPU_KERNELS=native or the CPU lacks AVX2.
    Returns whether the pins are in force. Too late once torch or numpy is loaded: then it warns and changes
    nothing."""
    if cpu_kernel_choice() == "native" or not cpu_has_avx2():
        return False
    missing = {name: value for name, value in CPU_KERNEL_PINS.items() if name not in os.environ}
    loaded = [library for library in PINNED_LIBRARIES if library in sys.modules]
    if missing and loaded:
        warnings.warn(f"{' and '.join(loaded)} imported before memvad's pipeline package, so the CPU kernels are not "
                      f"pinned to AVX2 and this process's numbers may differ from the committed ones on an AVX-512 "
                      f"CPU: import pipeline (or analysis) first, or set "
                      + ", ".join(f"{k}={v!r}" for k, v in missing.items()), stacklevel=2)
        return False
    os.environ.update(missing)
    return True


# glibc's malloc settings for training at the papers' size on CPU (README, "Speed, and the GPU"). glibc hands each freed
# block over 32 MiB back to the kernel, and the next step faults its pages in again, zeroed: MemAE at 256x256, batch 4,
# took 1.7 million page faults and 4.3 s of kernel time in an 8.1 s step. These serve large blocks from the heap,
# never trim it, and turn off the per-thread cache, whose hold on the small remainders of torch's 64-byte-aligned
# blocks would pin freed blocks in place and grow the heap: 5.1 s a step, the same numbers, a peak 1.2-1.6x higher.
# glibc reads them once, at process start, so they belong in the environment (GLIBC_TUNABLES), not in code run after.
HEAP_REUSE_TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615:"
                       "glibc.malloc.tcache_count=0")


def allocator() -> str:
    """The glibc malloc tunables this process started with, for the records: "default" when there are none."""
    settings = [item for item in os.environ.get("GLIBC_TUNABLES", "").split(":") if item.startswith("glibc.malloc.")]
    return ":".join(settings) or "default"


def cpu_kernels() -> str:
    """What this process computes with on CPU, for the records: torch's kernel level and whether the pins are in
    force, e.g. "AVX2 (pinned)", "AVX512 (native)"."""
    import torch
    pinned = all(os.environ.get(name) == value for name, value in CPU_KERNEL_PINS.items())
    return f"{torch.backends.cpu.get_cpu_capability()} ({'pinned' if pinned else 'native'})"


pin_cpu_kernels()
