"""benchmarks/onnx_runtime.py runs end to end on a tiny model: the export, both runtimes and the bare pass timed in
fresh processes, and its table printed with figures that agree with each other."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

pytestmark = pytest.mark.slow

SECONDS_AND_RATIO = r"([\d.]+) s \(([\d.]+)x\)"
ROW = re.compile(
    rf"^\| \((a|b)\) [^|]+, (no PAMR|PAMR) \| {SECONDS_AND_RATIO} \| {SECONDS_AND_RATIO} \| {SECONDS_AND_RATIO} "
    r"\| ([\d.]+) \(([\d.]+)\) \|$",
    re.MULTILINE,
)


def rounding(numerator: float, denominator: float) -> float:
    """How far a printed ratio (2 decimals) may be from the ratio of its printed seconds (3 decimals)."""
    return 0.005 + 0.0005 * (1 + numerator / denominator) / (denominator - 0.0005) + 1e-9


def test_the_onnx_benchmark_exports_times_both_runtimes_and_prints_its_table():
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [sys.executable, "benchmarks/onnx_runtime.py", "--quick", "--runs", "1", "--threads", "1"],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    printed = completed.stdout
    assert "1 threads each (onnxruntime intra-op 1, inter-op 1)" in printed
    export = re.search(r"export ([\d.]+) s; image_segmenter\.onnx ([\d.]+) MiB, text_encoder\.onnx ([\d.]+) MiB",
                       printed)
    assert export and all(float(value) > 0 for value in export.groups()), printed
    scenarios = re.findall(r"^\((a|b)\) .*: (\d) window\(s\); .* scores differ by at most (\S+)$", printed, re.MULTILINE)
    assert [(key, windows) for key, windows, _ in scenarios] == [("a", "1"), ("b", "2")], printed
    assert all(float(difference) <= 1e-4 for _, _, difference in scenarios)

    rows = ROW.findall(printed)
    assert [(key, setting) for key, setting, *_ in rows] == [
        ("a", "no PAMR"), ("a", "PAMR"), ("b", "no PAMR"), ("b", "PAMR")
    ], printed
    for _, _, bare, bare_ratio, torch_seconds, torch_ratio, onnx_seconds, onnx_ratio, ratio, cpu_ratio in rows:
        bare, torch_seconds, onnx_seconds = float(bare), float(torch_seconds), float(onnx_seconds)
        assert min(bare, torch_seconds, onnx_seconds, float(cpu_ratio)) > 0 and bare_ratio == "1.00"
        assert float(torch_ratio) == pytest.approx(torch_seconds / bare, abs=rounding(torch_seconds, bare))
        assert float(onnx_ratio) == pytest.approx(onnx_seconds / bare, abs=rounding(onnx_seconds, bare))
        assert float(ratio) == pytest.approx(onnx_seconds / torch_seconds, abs=rounding(onnx_seconds, torch_seconds))
