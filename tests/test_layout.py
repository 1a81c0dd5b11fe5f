"""The package's layering, read from the source with ``ast`` so that it stays true.

Layers from low to high: the root modules (what a Hub model repository holds as remote code) < predict <
evaluation < training < toy < apps. A module imports only from its own layer or lower ones; root modules import
each other only as ``from .name import ...``; third-party imports are declared in the pyproject extra of their
layer; optional packages stay out of ``import modeling_code``; only the command line sets torch's threads.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT
from transformers.dynamic_module_utils import get_imports

PACKAGE = "modeling_code"
PACKAGE_DIR = REPO_ROOT / PACKAGE
LAYERS = ("root", "predict", "evaluation", "training", "toy", "apps")
RANK = {layer: rank for rank, layer in enumerate(LAYERS)}
ROOT_MODULES = sorted(path.stem for path in PACKAGE_DIR.glob("*.py"))
MODULE_FILES = sorted(PACKAGE_DIR.rglob("*.py"))
# What transformers' import check may demand of a remote-code module: the core dependencies a model needs.
REMOTE_CODE_IMPORTS = {"torch", "transformers", "numpy", "PIL", "safetensors", "huggingface_hub"}
# Import name -> distribution, where they differ.
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml"}
# The extras a layer may use besides the core dependencies.
LAYER_EXTRAS = {
    "root": (),
    "predict": ("export",),
    "evaluation": ("train",),
    "training": ("train",),
    "toy": ("train",),
    "apps": ("train", "demo", "export"),
}
OPTIONAL_PACKAGES = ("gradio", "pandas", "datasets", "accelerate", "spacy", "evaluate", "onnx", "onnxruntime",
                     "onnxscript")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> str:
    """The layer of a dotted module name inside the package (``modeling_code.toy.world`` -> ``toy``)."""
    parts = name.split(".")
    assert parts[0] == PACKAGE, name
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "root"


def imported_modules(path: Path) -> list[tuple[int, str, ast.AST]]:
    """(line, absolute dotted name, node) of every package-internal import of a file, in functions too."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, node) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module
            else:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            if node.module is None:  # from . import name: the names are modules
                found.extend((node.lineno, f"{base}.{alias.name}", node) for alias in node.names)
            else:
                found.append((node.lineno, base, node))
    return [(line, target, node) for line, target, node in found if target.split(".")[0] == PACKAGE]


def third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in ("__future__", PACKAGE)}


def declared_distributions() -> dict[str, set[str]]:
    """``{"": core dependencies, extra: its dependencies}`` as normalised distribution names."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
                for requirement in requirements}

    return {"": names(project["dependencies"]),
            **{extra: names(values) for extra, values in project["optional-dependencies"].items()}}


def test_the_walk_sees_every_layer_and_module():
    layers = {layer_of(module_name(path)) for path in MODULE_FILES}
    assert layers == set(LAYERS)
    assert len(MODULE_FILES) > 30 and "modeling_code" in ROOT_MODULES and "inference" in ROOT_MODULES
    for layer in LAYERS[1:]:
        init = PACKAGE_DIR / layer / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} needs a docstring saying its role"


def test_no_module_imports_from_a_higher_layer():
    violations = []
    for path in MODULE_FILES:
        source = module_name(path)
        for line, target, _ in imported_modules(path):
            if RANK[layer_of(target)] > RANK[layer_of(source)]:
                violations.append(f"{path.relative_to(REPO_ROOT)}:{line}: {layer_of(source)} imports {target}")
    assert not violations, "\n".join(violations)


def test_root_modules_import_each_other_only_as_from_dot_name():
    violations = []
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        for line, target, node in imported_modules(path):
            where = f"{path.relative_to(REPO_ROOT)}:{line}"
            relative_root_import = (
                isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is not None
                and "." not in node.module and node.module in ROOT_MODULES
            )
            if not relative_root_import:
                violations.append(f"{where}: imports {target} otherwise than 'from .<root module> import ...'")
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize("path", sorted(PACKAGE_DIR.glob("*.py")), ids=lambda path: path.name)
def test_root_modules_demand_only_core_packages_of_remote_code(path):
    # transformers checks these imports (function bodies included, try blocks not) before running remote code
    demanded = {name for name in get_imports(path) if name not in sys.stdlib_module_names}
    assert demanded <= REMOTE_CODE_IMPORTS, f"{path.name} makes remote code demand {demanded - REMOTE_CODE_IMPORTS}"


def test_third_party_imports_are_declared_in_their_layers_extras():
    declared = declared_distributions()
    undeclared = []
    for path in MODULE_FILES:
        layer = layer_of(module_name(path))
        allowed = declared[""].union(*(declared[extra] for extra in LAYER_EXTRAS[layer]))
        for name in sorted(third_party_imports(path)):
            distribution = DISTRIBUTIONS.get(name, name).lower().replace("_", "-")
            if distribution not in allowed:
                undeclared.append(f"{path.relative_to(REPO_ROOT)} ({layer}): {name}")
    assert not undeclared, "\n".join(undeclared)
    assert "pandas" in declared["demo"] and "gradio" in declared["demo"]


def test_only_the_command_line_sets_torch_threads():
    callers = []
    for path in MODULE_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "set_num_threads", "set_num_interop_threads"
            ):
                callers.append(str(path.relative_to(PACKAGE_DIR)))
    assert set(callers) <= {"apps/cli.py"}, callers


def test_importing_the_package_and_its_layers_imports_no_optional_package():
    script = f"""
import sys
import transformers
from transformers import AutoModel, CLIPModel, PreTrainedModel  # what transformers itself imports is not ours
before = {{name for name in {OPTIONAL_PACKAGES!r} if name in sys.modules}}
import modeling_code
assert "modeling_code.predict.segmenter" not in sys.modules, "import modeling_code imported the segmenter"
import modeling_code.predict, modeling_code.evaluation, modeling_code.training, modeling_code.toy, modeling_code.apps
after = {{name for name in {OPTIONAL_PACKAGES!r} if name in sys.modules}}
print(sorted(after - before))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_tests_share_code_through_helpers_only():
    offenders = []
    for path in sorted((REPO_ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            offenders.extend(f"{path.name}: {name}" for name in names
                             if name == "conftest" or name.startswith("test_"))
    assert not offenders, offenders
