"""dvc.yaml lists exactly the repository code each stage runs: every repository module a stage's command imports
(found by modulefinder, transitively) is one of its deps, and every code dep is imported."""
import modulefinder
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import REPO_ROOT

CODE_PACKAGES = ("pipeline", "models", "analysis")


def stage_definitions() -> dict[str, dict]:
    """Stage name -> its definition (the body of a foreach's `do`), with YAML merges applied."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def imported_files(module: str) -> set[Path]:
    """The repository files that running `python -m <module>` imports, itself included. The search path holds only
    the repository, so libraries are not followed."""
    finder = modulefinder.ModuleFinder(path=[str(REPO_ROOT)])
    finder.run_script(str(REPO_ROOT / (module.replace(".", "/") + ".py")))
    files = {Path(m.__file__).resolve() for m in finder.modules.values() if m.__file__}
    return {f for f in files if REPO_ROOT in f.parents}


def code_deps(stage: dict) -> list[Path]:
    """The deps that are code: .py files, and folders of them (analysis/tables is data)."""
    paths = [REPO_ROOT / dep for dep in stage.get("deps", []) if dep.split("/")[0] in CODE_PACKAGES]
    return [p for p in paths if p.suffix == ".py" or (p.is_dir() and any(p.rglob("*.py")))]


def covers(dep: Path, file: Path) -> bool:
    return dep == file or dep in file.parents


STAGES = stage_definitions()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_are_exactly_the_code_it_imports(name):
    stage = STAGES[name]
    module = re.match(r"python -m ([\w.]+)", stage["cmd"]).group(1)
    imported = imported_files(module)
    deps = code_deps(stage)
    missing = sorted(str(f.relative_to(REPO_ROOT)) for f in imported if not any(covers(d, f) for d in deps))
    assert not missing, f"stage {name!r} imports these files but dvc.yaml does not list them as deps: {missing}"
    unused = [str(d.relative_to(REPO_ROOT)) for d in deps
              if not any(covers(d, f) for f in imported)
              or (d.is_dir() and any(f not in imported for f in d.rglob("*.py")))]
    assert not unused, f"stage {name!r} lists code deps it does not import (wholly): {unused}"


def test_the_checker_finds_a_missing_dependency(tmp_path):
    """The finder sees submodule imports (`from pipeline import tracking`) and function-level imports."""
    files = {str(f.relative_to(REPO_ROOT)) for f in imported_files("pipeline.run")}
    assert {"pipeline/run.py", "pipeline/tracking.py", "pipeline/train.py", "models/memory.py"} <= files
    assert "analysis/report.py" not in files
    stage = dict(STAGES["run"])
    stage["deps"] = [d for d in stage["deps"] if d != "pipeline/tracking.py"]
    deps = code_deps(stage)
    assert [f for f in imported_files("pipeline.run") if not any(covers(d, f) for d in deps)] == \
        [REPO_ROOT / "pipeline" / "tracking.py"]
