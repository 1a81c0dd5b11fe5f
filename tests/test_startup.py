"""Start-up: ``code-seg --help`` and argument errors answer before torch is imported; ``import modeling_code``
still registers the Auto classes (``AutoModel.from_pretrained(dir)`` right after it works) and imports no more."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO_ROOT, code_seg_environment

# Run in a fresh interpreter: (what it runs, modules that must not be imported).
HEAVY = ("torch", "transformers", "numpy", "PIL")


def run_python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=code_seg_environment(), timeout=180)


def launcher_script(*argv: str) -> str:
    return f"""
import sys
import code_seg_cli
try:
    code = code_seg_cli.main({list(argv)!r})
except SystemExit as exit:
    code = exit.code
heavy = [name for name in {HEAVY!r} if name in sys.modules]
print("EXIT", code, "HEAVY", heavy)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["segment", "--help"],
        ["evaluate", "--help"],
        ["toy-world", "--help"],
        ["segment", "x.png"],  # --classes, --model and --output_dir missing
        ["segment", "x.png", "--classes", "cat", "--model", "m", "--output_dir", "o", "--bg_thresh", "7"],
        ["segment", "x.png", "--classes", "cat", "--model", "m", "--output_dir", "o", "--dtype", "int3"],
        ["nonsense"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_help_and_argument_errors_import_neither_torch_nor_transformers(argv):
    result = run_python(launcher_script(*argv))
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.endswith("HEAVY []"), f"{argv}: {line}"
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_import_modeling_code_then_automodel_from_a_folder_works(tiny_model_dir):
    result = run_python(f"""
import sys
import modeling_code
assert "modeling_code.predict.segmenter" not in sys.modules
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor
model = AutoModel.from_pretrained({str(tiny_model_dir)!r})
processor = AutoProcessor.from_pretrained({str(tiny_model_dir)!r})
print(type(model).__name__, type(processor).__name__, type(AutoConfig.from_pretrained({str(tiny_model_dir)!r})).__name__)
""")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["CoDeModel", "CoDeProcessor", "CoDeConfig"]


@pytest.mark.slow
def test_the_console_script_entry_point_is_the_launcher():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["code-seg"] == "code_seg_cli:main"
    assert "code_seg_cli" in project["tool"]["setuptools"]["py-modules"]
