"""glibc's heap-reuse settings (pipeline.HEAP_REUSE_TUNABLES), which the README gives for training at the papers' size
on CPU. glibc reads them at process start, so each case runs in a fresh interpreter."""
import platform

import pytest

import pipeline
from local_processes import reported
from pipeline import tracking

on_glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                              reason="the tunables are glibc's")

# Page faults of each allocation of a 256 MiB tensor, written and freed ten times over, and the resident memory after.
REFAULTS = """
import json, resource, pipeline, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
refaults = []
for _ in range(10):
    before = faults()
    torch.empty(64 * 2**20).fill_(1.0)
    refaults.append(faults() - before)
resident_mib = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
print(json.dumps({"allocator": pipeline.allocator(), "refaults": refaults, "resident_mib": resident_mib}))
"""

# A few MemAE and MNAD training steps whose activations exceed glibc's mmap threshold; the weights' digest.
TRAINED_WEIGHTS = """
import hashlib, json, pipeline, torch
from models.build import build_model, image_channels
from models.clips import split_clip
from pipeline.config import load_params
from pipeline.train import training_step
params = load_params(None)
digests = {}
for name, frame in (("memae", 64), ("mnad-pred", 64)):
    variant = params.variant(name)
    profile = params.dataset("synthetic").training_profile(variant).model_copy(update={"frame_size": frame})
    torch.manual_seed(0)
    model = build_model(variant, profile)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    for _ in range(3):
        clip = torch.rand(2, variant.window, image_channels(variant, profile), frame, frame) * 2 - 1
        training_step(model, optimizer, *split_clip(clip, variant), variant)
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    digests[name] = digest.hexdigest()
print(json.dumps(digests))
"""


@on_glibc
def test_with_the_tunables_a_freed_large_tensor_is_reused_without_faulting_its_pages_in_again():
    reuse = reported(REFAULTS, GLIBC_TUNABLES=pipeline.HEAP_REUSE_TUNABLES)
    default = reported(REFAULTS)
    assert reuse["allocator"] == pipeline.HEAP_REUSE_TUNABLES and default["allocator"] == "default"
    # 256 MiB is 65,536 pages of 4 KiB (128 huge pages where THP backs it): the first allocation faults them in,
    # and reused memory none of them again
    assert reuse["refaults"][0] >= 65536 // 512 and max(reuse["refaults"][1:]) < 50
    # nor does the heap grow: one block's worth stays resident, beside the interpreter and torch
    assert reuse["resident_mib"] - default["resident_mib"] == pytest.approx(256, abs=64)
    # glibc's defaults give each freed block back, so every allocation faults its pages in again
    assert min(default["refaults"]) >= 65536 // 512


@on_glibc
def test_training_gives_the_same_weights_bit_for_bit_with_the_tunables_or_without():
    assert reported(TRAINED_WEIGHTS, GLIBC_TUNABLES=pipeline.HEAP_REUSE_TUNABLES) == reported(TRAINED_WEIGHTS)


def test_the_record_names_only_the_malloc_tunables(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F:glibc.malloc.tcache_count=0")
    assert pipeline.allocator() == "glibc.malloc.tcache_count=0"
    assert tracking.environment_tags("cpu")["allocator"] == "glibc.malloc.tcache_count=0"
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert pipeline.allocator() == "default"
