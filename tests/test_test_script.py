"""scripts/test.sh deselects the tests marked cuda, also when its caller selects tests with -m."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from helpers import REPO_ROOT


@pytest.fixture(scope="module")
def run_test_script(tmp_path_factory):
    """Runs a copy of scripts/test.sh whose setup does nothing and whose python prints its arguments."""
    root = tmp_path_factory.mktemp("checkout")
    (root / "scripts").mkdir()
    shutil.copy(REPO_ROOT / "scripts" / "test.sh", root / "scripts" / "test.sh")
    (root / "scripts" / "setup.sh").write_text("exit 0\n")
    python = root / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    python.chmod(0o755)

    def run(*arguments: str) -> list[str]:
        completed = subprocess.run(["bash", str(root / "scripts" / "test.sh"), *arguments], capture_output=True,
                                   text=True, env={**os.environ, "VIRTUAL_ENV": str(root / "venv")}, check=True)
        return completed.stdout.splitlines()

    return run


@pytest.mark.parametrize(
    ("arguments", "pytest_arguments"),
    [
        ((), ["-m", "not cuda"]),
        (("-m", "not slow"), ["-m", "(not slow) and not cuda"]),
        (("-x", "-mslow", "tests/test_pamr.py"), ["-x", "-m", "(slow) and not cuda", "tests/test_pamr.py"]),
        (("-m", "slow or fast", "-m", "fast"), ["-m", "(slow or fast) and not cuda", "-m", "(fast) and not cuda"]),
        (("-m", "cuda", "-k", "pamr"), ["-m", "cuda", "-k", "pamr"]),
        (("-k", "not slow"), ["-k", "not slow", "-m", "not cuda"]),
    ],
)
def test_cuda_tests_are_deselected_unless_the_caller_names_them(run_test_script, arguments, pytest_arguments):
    assert run_test_script(*arguments) == ["-m", "pytest", "-q", *pytest_arguments]
