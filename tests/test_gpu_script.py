"""benchmarks/gpu.py runs with only what the GPU machines hold: checked here as a dry run on the CPU (tiny model,
the cuda tests' code on the CPU) in processes where spaCy, datasets, evaluate and gradio cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

pytestmark = pytest.mark.slow
ABSENT = ("spacy", "datasets", "evaluate", "gradio")


def test_the_gpu_script_runs_without_the_optional_packages(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    # Python imports sitecustomize at start-up from its path: every process of the run (pytest, measurements)
    # then finds these packages unimportable.
    (blocker / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({ABSENT!r}))\n")
    out = tmp_path / "out"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO_ROOT)])}
    completed = subprocess.run([sys.executable, "benchmarks/gpu.py", "--out", str(out), "--device", "cpu", "--quick"],
                               cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert sorted(path.name for path in out.iterdir()) == ["cuda_tests.log", "cuda_tests.xml", "gpu_figures.json",
                                                           "gpu_figures.md"]
    figures = json.loads((out / "gpu_figures.json").read_text())
    assert set(figures["environment"]["absent_optional_packages"]) == {"spacy", "datasets"}
    tests = figures["tests"]
    assert tests["status"] == "passed" and tests["passed"] >= 15 and not tests["skipped"]
    assert len(figures["inference"]) == 4 and len(figures["training"]) == 2
    assert all(row["images_per_second"] > 0 for row in figures["inference"])
    assert all(row["samples_per_second"] > 0 for row in figures["training"])
    assert "| bf16 mixed precision, batch" in (out / "gpu_figures.md").read_text()
