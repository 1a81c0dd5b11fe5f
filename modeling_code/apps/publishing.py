"""Publish a saved CoDe model to the Hugging Face Hub: weights, configs, remote code, processor and card.

``publish`` stages exactly the files a Hub repository needs into one folder and uploads that folder, so a
dry run (``dry_run_dir``) is a byte-for-byte preview of the upload. The staged set:

- the weights: ``*.safetensors`` (and the shard index when sharded);
- ``config.json`` (whose ``auto_map`` points at the remote code) and the processor and tokenizer files;
- the remote-code modules named by the ``auto_map`` entries and by the ``zero-shot-image-segmentation`` entry of
  ``custom_pipelines``, with every module they import relatively;
- ``README.md``: the model card rendered by ``model_card.model_card_for_directory``.

A folder saved before the pipeline existed (its ``config.json`` has no such entry) is staged with this package's
remote code instead of its own, and the entry is written into the staged ``config.json``: the pipeline needs the
code of its own release. Nothing else from the folder (checkpoints, logs, training summaries) is uploaded.
"""

from __future__ import annotations

import ast
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..pipeline_code import CUSTOM_PIPELINES, PIPELINE_TASK
from .model_card import DEFAULT_LICENSE, model_card_for_directory

CARD_FILE = "README.md"
MODEL_CONFIG_FILE = "config.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
# Processor and tokenizer files, as transformers may write them; those present are uploaded.
PROCESSOR_FILES = (
    PROCESSOR_CONFIG_FILE,
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
# Classes the Hub loads through remote code, per config file.
REQUIRED_AUTO_MAP = {
    MODEL_CONFIG_FILE: ("AutoConfig", "AutoModel"),
    PROCESSOR_CONFIG_FILE: ("AutoProcessor",),
}
# The package's own remote code: the modules of the classes above and of the pipeline (and what they import).
PACKAGE_DIR = Path(__file__).resolve().parent.parent
PACKAGE_REMOTE_MODULES = ("configuration_code", "modeling_code", "image_processing_code", "processing_code",
                          "pipeline_code")
# Remote weight files not in a new upload are deleted, so a change of sharding leaves no stale shards.
STALE_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]


@dataclass
class PublishResult:
    """What ``publish`` did.

    Attributes:
        files: the staged files, relative to the repository root, sorted.
        folder: the dry-run folder, or None after an upload.
        commit_url: the Hub commit of the upload, or None for a dry run.
        package_code: the folder predated the pipeline, so this package's remote code was staged instead of its
            own.
    """

    files: list[str]
    folder: Path | None
    commit_url: str | None
    package_code: bool = False


def _auto_map_modules(auto_map: Any, required: tuple[str, ...], where: Path) -> set[str]:
    """Module names (``configuration_code``) referenced by an ``auto_map``; checks the required classes."""
    if not isinstance(auto_map, dict):
        raise ValueError(
            f"{where} has no auto_map: save the model and processor with the code-seg package imported "
            "(it registers them for remote code)"
        )
    missing = [name for name in required if name not in auto_map]
    if missing:
        raise ValueError(f"{where}: auto_map lacks {missing}; remote-code loading would fail")
    references = []
    for value in auto_map.values():
        references.extend(value if isinstance(value, (list, tuple)) else [value])
    # "module.Class", or "repo--module.Class" for code hosted in another repository (not ours to upload).
    return {ref.rsplit(".", 1)[0] for ref in references if isinstance(ref, str) and "--" not in ref}


def _relative_imports(source: Path) -> set[str]:
    """Modules a file imports relatively (``from .templates import x``, ``from . import pamr``)."""
    modules = set()
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                modules.add(node.module.split(".")[0])
            else:
                modules.update(alias.name for alias in node.names)
    return modules


def _has_pipeline(model_dir: Path) -> bool:
    config = json.loads((model_dir / MODEL_CONFIG_FILE).read_text())
    return PIPELINE_TASK in (config.get("custom_pipelines") or {})


def _remote_code_roots(model_dir: Path) -> list[tuple[str, str]]:
    """``(module, needed_by)`` for the ``auto_map`` classes of both config files and the ``custom_pipelines``
    modules; checks that the files exist and name the required classes."""
    roots: list[tuple[str, str]] = []
    for config_file, required in REQUIRED_AUTO_MAP.items():
        path = model_dir / config_file
        if not path.is_file():
            raise ValueError(f"{model_dir} has no {config_file}; save the model and its processor there first")
        config = json.loads(path.read_text())
        modules = _auto_map_modules(config.get("auto_map"), required, path)
        modules.update(entry["impl"].rsplit(".", 1)[0] for entry in (config.get("custom_pipelines") or {}).values())
        roots.extend((module, config_file) for module in sorted(modules))
    return roots


def remote_code_files(model_dir: str | Path) -> list[str]:
    """The ``.py`` files of ``model_dir`` that remote-code loading needs: the ``auto_map`` modules of
    ``config.json`` and ``processor_config.json``, the pipeline's module named in ``custom_pipelines`` and,
    recursively, what they import relatively.

    Raises:
        ValueError: a config file is missing, has no (complete) ``auto_map``, or a needed module is absent.
    """
    model_dir = Path(model_dir)
    return _with_relative_imports(model_dir, _remote_code_roots(model_dir))


def package_remote_code_files() -> list[str]:
    """This package's remote-code files (``PACKAGE_REMOTE_MODULES`` and what they import), as a model saves them."""
    return _with_relative_imports(PACKAGE_DIR, [(module, "code-seg") for module in PACKAGE_REMOTE_MODULES])


def _with_relative_imports(model_dir: Path, pending: list[tuple[str, str]]) -> list[str]:
    """``{module}.py`` of each ``(module, needed_by)`` in ``pending`` and of every module they import
    relatively, recursively; a missing file raises ValueError naming what needs it."""
    found: set[str] = set()
    while pending:
        module, needed_by = pending.pop()
        if module in found:
            continue
        source = model_dir / f"{module}.py"
        if not source.is_file():
            raise ValueError(
                f"{model_dir} lacks {module}.py, which {needed_by} needs for remote code; re-save the model and "
                "processor with save_pretrained"
            )
        found.add(module)
        pending.extend((name, source.name) for name in _relative_imports(source))
    return sorted(f"{module}.py" for module in found)


def upload_file_list(model_dir: str | Path) -> list[str]:
    """Every file to upload for ``model_dir`` (the card, written at staging, excluded), sorted; the ``.py``
    files are this package's when the folder predates the pipeline (``package_remote_code_files``).

    Raises:
        ValueError: no safetensors weights, or incomplete remote code (see ``remote_code_files``).
    """
    model_dir = Path(model_dir)
    weights = sorted({path.name for pattern in WEIGHT_PATTERNS for path in model_dir.glob(pattern)})
    if not any(name.endswith(".safetensors") for name in weights):
        raise ValueError(f"{model_dir} has no .safetensors weights; save the model with save_pretrained first")
    processor_files = [name for name in PROCESSOR_FILES if (model_dir / name).is_file()]
    roots = _remote_code_roots(model_dir)  # both configs must name their classes, whichever code is staged
    code = _with_relative_imports(model_dir, roots) if _has_pipeline(model_dir) else package_remote_code_files()
    return sorted({*weights, MODEL_CONFIG_FILE, *processor_files, *code})


def stage_upload(
    model_dir: str | Path,
    destination: str | Path,
    repo_id: str,
    results_json: str | Path | None = None,
    license: str = DEFAULT_LICENSE,
) -> list[str]:
    """Copy the upload set of ``model_dir`` and the rendered card into ``destination`` (created; must be
    empty). Returns the staged files, relative to ``destination``, sorted."""
    model_dir, destination = Path(model_dir), Path(destination)
    if not model_dir.is_dir():
        raise ValueError(f"model folder {model_dir} does not exist")
    if destination.exists() and any(destination.iterdir()):
        raise ValueError(f"{destination} is not empty; the staging folder must hold exactly the upload")
    files = upload_file_list(model_dir)
    card = model_card_for_directory(model_dir, repo_id, results_json, license)
    destination.mkdir(parents=True, exist_ok=True)
    package_code = not _has_pipeline(model_dir)
    for name in files:
        source = PACKAGE_DIR / name if package_code and name.endswith(".py") else model_dir / name
        shutil.copy2(source, destination / name)
    if package_code:
        config = json.loads((model_dir / MODEL_CONFIG_FILE).read_text())
        config["custom_pipelines"] = {**(config.get("custom_pipelines") or {}), **CUSTOM_PIPELINES}
        (destination / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card.save(destination / CARD_FILE)
    return sorted([*files, CARD_FILE])


def publish(
    model_dir: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    dry_run_dir: str | Path | None = None,
    results_json: str | Path | None = None,
    license: str = DEFAULT_LICENSE,
    token: str | None = None,
    commit_message: str = "Upload CoDe model with code-seg",
    api: Any = None,
) -> PublishResult:
    """Upload a saved model folder (model + processor, as ``save_pretrained`` writes them) to ``repo_id``.

    Args:
        model_dir: the saved folder (e.g. the trainer's output directory).
        repo_id: the Hub model repository, created if missing (``private`` applies only then).
        private: create the repository private.
        revision: a branch to commit to (created from the default branch if missing); default: main.
        dry_run_dir: upload nothing; stage the exact upload in this folder instead (created; must be empty).
        results_json: an evaluation ``results.json`` for the card's results and ``model-index``.
        license: the weights' licence identifier for the card.
        token: a Hub token (default: the logged-in one).
        commit_message: the Hub commit message.
        api: an ``HfApi``-like client (default ``HfApi(token=token)``).
    """
    if dry_run_dir is not None:
        files = stage_upload(model_dir, dry_run_dir, repo_id, results_json, license)
        folder, commit_url = Path(dry_run_dir), None
    else:
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        with tempfile.TemporaryDirectory(prefix="code-seg-publish-") as staging:
            files = stage_upload(model_dir, staging, repo_id, results_json, license)
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                repo_type="model",
                revision=revision,
                commit_message=commit_message,
                delete_patterns=STALE_WEIGHT_PATTERNS,
            )
        folder, commit_url = None, getattr(commit, "commit_url", None) or str(commit)
    return PublishResult(files, folder, commit_url, package_code=not _has_pipeline(Path(model_dir)))


__all__ = ["PublishResult", "publish", "remote_code_files", "stage_upload", "upload_file_list"]
