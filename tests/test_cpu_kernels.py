"""torch's CPU kernels pinned to AVX2 by importing the pipeline package (pipeline/__init__.py): each case runs in a
fresh interpreter, since the libraries read their variables once, when torch loads."""
import pytest

import pipeline
from local_processes import fresh_python, reported
from pipeline import tracking

REPORT = "import json, os, torch; print(json.dumps({'capability': torch.backends.cpu.get_cpu_capability(), " \
         "'kernels': pipeline.cpu_kernels(), 'env': {k: os.environ.get(k) for k in pipeline.CPU_KERNEL_PINS}}))"

needs_avx2 = pytest.mark.skipif(not pipeline.cpu_has_avx2(), reason="the pin applies to x86-64 CPUs with AVX2")


@needs_avx2
def test_importing_pipeline_before_torch_pins_every_library_to_avx2():
    seen = reported("import pipeline; " + REPORT)
    assert seen["capability"] == "AVX2"
    assert seen["env"] == pipeline.CPU_KERNEL_PINS
    assert seen["kernels"] == "AVX2 (pinned)"


@needs_avx2
def test_numpy_is_held_to_avx2_too():
    features = reported("import pipeline, json, numpy; from numpy._core._multiarray_umath import __cpu_features__ "
                        "as found; print(json.dumps({k: found[k] for k in ('X86_V3', 'X86_V4')}))")
    assert features == {"X86_V3": True, "X86_V4": False}


@needs_avx2
def test_the_analysis_package_pins_too():
    assert reported("import analysis, pipeline; " + REPORT)["kernels"] == "AVX2 (pinned)"


@needs_avx2
def test_native_leaves_the_choice_to_the_libraries():
    seen = reported("import pipeline; " + REPORT, MEMVAD_CPU_KERNELS="native")
    unpinned = reported("import json, torch; print(json.dumps({'capability': torch.backends.cpu.get_cpu_capability()}))")
    assert seen["env"] == {name: None for name in pipeline.CPU_KERNEL_PINS}
    assert seen["capability"] == unpinned["capability"]
    assert seen["kernels"] == f"{unpinned['capability']} (native)"


@needs_avx2
def test_a_variable_the_user_set_is_kept_and_the_record_says_native():
    seen = reported("import pipeline; " + REPORT, ONEDNN_MAX_CPU_ISA="AVX")
    assert seen["env"] == {**pipeline.CPU_KERNEL_PINS, "ONEDNN_MAX_CPU_ISA": "AVX"}
    assert seen["kernels"].endswith("(native)")


@needs_avx2
@pytest.mark.parametrize("library", ["torch", "numpy"])
def test_a_library_loaded_first_warns_and_pins_nothing(library):
    done = fresh_python(f"import {library}, pipeline, os; "
                        "print(sorted(k for k in pipeline.CPU_KERNEL_PINS if k in os.environ))")
    assert done.returncode == 0, done.stderr
    loaded, _, rest = done.stderr.partition(" imported before memvad's pipeline package")
    assert rest and library in loaded.rsplit("UserWarning: ", 1)[-1]
    assert "import pipeline (or analysis) first" in done.stderr
    assert done.stdout.strip() == "[]"


def test_an_unknown_choice_is_one_clear_error():
    done = fresh_python("import pipeline", MEMVAD_CPU_KERNELS="avx512")
    assert done.returncode != 0
    assert "MEMVAD_CPU_KERNELS='avx512' is not a choice: use avx2" in done.stderr
    assert "Traceback" not in done.stderr


def test_every_run_records_its_cpu_kernels():
    assert tracking.environment_tags("cpu")["cpu_kernels"] == pipeline.cpu_kernels()
