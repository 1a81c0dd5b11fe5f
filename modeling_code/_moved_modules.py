"""Deprecated aliases of the modules that moved into sub-packages in 0.2 (removed in 0.3).

``import modeling_code.trainer`` (or ``from modeling_code.segmenter import CoDeSegmenter``) still works: a
``sys.meta_path`` finder, installed by the package's ``__init__``, answers an old dotted name with the module of
its new name (the same object, imported under the new name only) and issues a ``FutureWarning`` that names the new
path. ``modeling_code.evaluation`` is the one old name that is now a package itself; that package forwards the old
module's names (see ``evaluation/__init__.py``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

PACKAGE = __name__.rpartition(".")[0]
REMOVED_IN = "0.3"

# old module (relative to the package) -> new module (relative to the package)
MOVED_MODULES = {
    "segmenter": "predict.segmenter",
    "visualization": "predict.visualization",
    "benchmarks": "evaluation.specs",
    "segmentation_metrics": "evaluation.metrics",
    "segmentation_datasets": "evaluation.segmentation_datasets",
    "coco_object": "evaluation.coco_object",
    "run_evaluation": "evaluation.runner",
    "training_config": "training.config",
    "data_sources": "training.data_sources",
    "optimization": "training.optimization",
    "trainer": "training.trainer",
    "toy_world": "toy.world",
    "toy_pipeline": "toy.end_to_end",
    "clip_pretraining": "toy.clip_pretraining",
    "word_tokenizer": "toy.word_tokenizer",
    "highlighting_diagnostics": "toy.diagnostics",
    "cli": "apps.cli",
    "demo": "apps.demo",
    "publishing": "apps.publishing",
    "model_card": "apps.model_card",
    "conversion": "apps.conversion",
    "allocator": "apps.allocator",
}


def _is_bootstrap(filename: str) -> bool:
    """Frames that ``warnings`` itself skips when it counts ``stacklevel`` (``importlib._bootstrap*``)."""
    return "importlib" in filename and "_bootstrap" in filename


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning of ``create_module`` at the import statement: the first frame
    outside this module and the import machinery (``importlib.import_module``; the bootstrap frames, which
    ``warnings`` does not count)."""
    ours = {__file__, importlib.__file__}
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (frame.f_code.co_filename in ours or _is_bootstrap(frame.f_code.co_filename)):
        frame = frame.f_back
        if not _is_bootstrap(frame.f_code.co_filename):
            level += 1
    return level


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name and loads it as the module of its new name, with a ``FutureWarning``."""

    def __init__(self, package: str = PACKAGE, moved: dict[str, str] = MOVED_MODULES) -> None:
        self.aliases = {f"{package}.{old}": f"{package}.{new}" for old, new in moved.items()}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.aliases:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        new_name = self.aliases[spec.name]
        warnings.warn(
            f"{spec.name} is deprecated and will be removed in {REMOVED_IN}: it moved to {new_name}",
            FutureWarning,
            stacklevel=_caller_stacklevel(),
        )
        module = importlib.import_module(new_name)
        # The import system sets ``__spec__`` of what create_module returns to the alias spec: keep the module's
        # own, put back in exec_module.
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        alias_spec = module.__spec__
        module.__spec__ = alias_spec.loader_state


def install() -> MovedModuleFinder:
    """Put the finder first on ``sys.meta_path`` (once): before any path finder that could find a stale old file."""
    for finder in sys.meta_path:
        if isinstance(finder, MovedModuleFinder):
            return finder
    finder = MovedModuleFinder()
    sys.meta_path.insert(0, finder)
    return finder
