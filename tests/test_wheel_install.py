"""The package as a user gets it: a wheel (not this checkout) installed into a fresh virtual environment and used
from a directory outside the repository. It imports from the wheel, loads the model directory saved by 0.1.0,
segments an image exactly as the checkout does, runs the ``code-seg`` console script, and every file under
``modeling_code/`` in the repository (the YAML specs, the toy config, the Hub metric, the model-card template and
the modules) is in the installed package.

The fresh environment gets no copies of the heavy dependencies: a ``.pth`` file in its site-packages appends the
test environment's site-packages to ``sys.path``. Python does not process ``.pth`` files in a directory added
that way, so the test environment's editable install of the checkout stays inactive there.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "modeling_code"
MODEL_DIR = REPO_ROOT / "tests/data/model_v0_1"
CLASSES = "cat, sofa, tree, background"
# Left out of the copy of the checkout that the wheel is built from (build outputs, environments, caches).
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
    ".ruff_cache", "outputs", "runs", "test-artifacts",
)

# Run by the fresh environment's interpreter (as a script) and by the test's (exec'd), to compare the two.
SEGMENT_SCRIPT = """
import json
import sys

import torch
from PIL import Image

import modeling_code
from modeling_code import CoDeModel, CoDeProcessor


def segment(model_dir, image_path, classes):
    model = CoDeModel.from_pretrained(model_dir).eval()
    processor = CoDeProcessor.from_pretrained(model_dir)
    image = Image.open(image_path).convert("RGB")
    inputs = processor(images=image, text=[name.strip() for name in classes.split(",")], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    labels = processor.post_process_semantic_segmentation(outputs)[0]
    return {"package_file": modeling_code.__file__, "labels": labels.tolist(), "scores": outputs.scores[0].tolist()}

if __name__ == "__main__":
    print(json.dumps(segment(*sys.argv[1:])))
"""


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)


def build_wheel(source: Path, dist: Path) -> Path:
    """``pip wheel`` with the test environment's pip: offline with its setuptools, else with build isolation."""
    attempts = []
    for isolation in (["--no-build-isolation"], []):
        result = run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(dist), str(source)])
        attempts.append(result.stdout + result.stderr)
        if result.returncode == 0:
            (wheel,) = dist.glob("code_seg-*.whl")
            return wheel
    raise AssertionError("pip wheel failed:\n" + "\n----\n".join(attempts))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(the fresh environment's directory, a clean environment for its processes, a working directory)."""
    root = tmp_path_factory.mktemp("wheel_install")
    source = root / "source"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCES)  # a clean tree: no stale build/ from the checkout
    wheel = build_wheel(source, root / "dist")

    environment_dir = root / "venv"
    venv.create(environment_dir, with_pip=False, symlinks=os.name != "nt")
    python = environment_dir / "bin" / "python"
    fresh_site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    fresh_site = Path(fresh_site.stdout.strip())
    # The test environment's packages, after the fresh environment's own (its .pth files stay unprocessed).
    ours = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (fresh_site / "test_environment.pth").write_text("".join(f"{path}\n" for path in ours if Path(path).is_dir()))

    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONNOUSERSITE="1", PIP_NO_INDEX="1",
               PATH=f"{environment_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    # The test environment's pip installs into the fresh one (--python): no ensurepip needed, nothing downloaded.
    installed = run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                     str(wheel)], env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    workdir = root / "elsewhere"
    workdir.mkdir()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 84, 3), dtype=np.uint8))
    image.save(workdir / "photo.png")
    return environment_dir, env, workdir


def run_fresh(fresh, *arguments: str) -> subprocess.CompletedProcess:
    environment_dir, env, workdir = fresh
    return run([str(environment_dir / "bin" / arguments[0]), *arguments[1:]], env=env, cwd=workdir)


def test_the_package_imports_from_the_wheel_with_every_file_of_the_checkout(fresh):
    environment_dir = fresh[0]
    result = run_fresh(fresh, "python", "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)")
    assert result.returncode == 0, result.stderr
    installed_root = Path(result.stdout.strip()).parent
    assert installed_root.is_relative_to(environment_dir), installed_root  # not the checkout
    assert not installed_root.is_relative_to(REPO_ROOT)

    def files(root: Path) -> set[str]:
        return {path.relative_to(root).as_posix() for path in root.rglob("*")
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}

    expected = files(REPO_ROOT / PACKAGE)
    assert {name for name in expected if not name.endswith(".py")}, "no data files found in the checkout"
    missing = sorted(expected - files(installed_root))
    assert not missing, f"files of {PACKAGE}/ missing from the installed wheel (package data?): {missing}"


def test_the_installed_package_segments_as_the_checkout_does(fresh):
    workdir = fresh[2]
    (workdir / "segment.py").write_text(SEGMENT_SCRIPT)
    result = run_fresh(fresh, "python", "segment.py", str(MODEL_DIR), "photo.png", CLASSES)
    assert result.returncode == 0, result.stderr
    installed = json.loads(result.stdout.splitlines()[-1])
    assert Path(installed["package_file"]).is_relative_to(fresh[0])

    namespace = {"__name__": "checkout"}
    exec(SEGMENT_SCRIPT, namespace)
    checkout = namespace["segment"](str(MODEL_DIR), str(workdir / "photo.png"), CLASSES)
    assert not Path(checkout["package_file"]).is_relative_to(fresh[0])
    labels = np.array(installed["labels"])
    assert labels.shape == (60, 84) and labels.max() < 4
    np.testing.assert_array_equal(labels, np.array(checkout["labels"]))
    np.testing.assert_allclose(np.array(installed["scores"]), np.array(checkout["scores"]), rtol=0, atol=1e-6)


def test_the_console_script_runs(fresh):
    workdir = fresh[2]
    help_text = run_fresh(fresh, "code-seg", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert all(command in help_text.stdout for command in ("segment", "evaluate", "toy-world"))

    result = run_fresh(fresh, "code-seg", "segment", "photo.png", "--classes", CLASSES, "--model", str(MODEL_DIR),
                       "--out", "out")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(path.name for path in (workdir / "out").iterdir()) == [
        "photo.json", "photo_labels.png", "photo_overlay.png"
    ]
    assert np.asarray(Image.open(workdir / "out" / "photo_labels.png")).shape == (60, 84)
    summary = json.loads((workdir / "out" / "photo.json").read_text())
    assert [entry["name"] for entry in summary["classes"]] == [name.strip() for name in CLASSES.split(",")]
