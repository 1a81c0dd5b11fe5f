"""The modules' former flat paths (before 0.2) still import, as the same module objects, with a FutureWarning."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
from helpers import REPO_ROOT

import modeling_code
from modeling_code import _moved_modules

# Every module that left the flat package, old name -> new name (both relative to the package).
OLD_TO_NEW = {
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


def test_the_alias_table_is_complete():
    assert _moved_modules.MOVED_MODULES == OLD_TO_NEW
    for new in OLD_TO_NEW.values():
        assert (REPO_ROOT / "modeling_code" / (new.replace(".", "/") + ".py")).is_file()
    for old in OLD_TO_NEW:
        assert not (REPO_ROOT / "modeling_code" / f"{old}.py").exists()


@pytest.mark.parametrize("old", sorted(OLD_TO_NEW))
def test_old_path_imports_the_new_module_with_a_future_warning(old, monkeypatch):
    old_name, new_name = f"modeling_code.{old}", f"modeling_code.{OLD_TO_NEW[old]}"
    new_module = importlib.import_module(new_name)
    monkeypatch.delitem(sys.modules, old_name, raising=False)  # as if never imported under the old name
    with pytest.warns(FutureWarning, match=rf"{old_name} is deprecated .* moved to {new_name}$") as caught:
        module = importlib.import_module(old_name)
    assert module is new_module and module.__name__ == new_name
    assert module.__spec__.name == new_name and module.__spec__.origin.endswith(OLD_TO_NEW[old].split(".")[-1] + ".py")
    assert caught[0].filename == __file__  # the warning points at the import, not into importlib
    assert sys.modules[old_name] is new_module
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert importlib.import_module(old_name) is new_module  # once imported, no more warnings


def test_from_imports_of_old_paths(monkeypatch):
    for old in ("segmenter", "trainer", "toy_pipeline"):
        monkeypatch.delitem(sys.modules, f"modeling_code.{old}", raising=False)
        monkeypatch.delattr(modeling_code, old, raising=False)
    with pytest.warns(FutureWarning, match="modeling_code.predict.segmenter"):
        from modeling_code.segmenter import CoDeSegmenter
    with pytest.warns(FutureWarning, match="modeling_code.training.trainer"):
        from modeling_code import trainer
    with pytest.warns(FutureWarning, match="modeling_code.toy.end_to_end"):
        import modeling_code.toy_pipeline as toy_pipeline
    from modeling_code.predict import segmenter
    from modeling_code.toy import end_to_end
    from modeling_code.training import trainer as new_trainer

    assert CoDeSegmenter is segmenter.CoDeSegmenter and trainer is new_trainer and toy_pipeline is end_to_end


def test_the_former_evaluation_module_names_resolve_on_the_package():
    from modeling_code import evaluation
    from modeling_code.evaluation import evaluator

    assert tuple(evaluator.__all__) == evaluation._EVALUATOR_NAMES
    for name in evaluator.__all__:
        with pytest.warns(FutureWarning, match=rf"modeling_code.evaluation.{name} .* modeling_code.evaluation.evaluator"):
            assert getattr(evaluation, name) is getattr(evaluator, name)
    with pytest.warns(FutureWarning, match="evaluate_benchmark"):
        from modeling_code.evaluation import evaluate_benchmark
    assert evaluate_benchmark is evaluator.evaluate_benchmark
    with pytest.raises(AttributeError):
        evaluation.no_such_name  # noqa: B018


def test_code_segmenter_is_a_lazy_attribute_of_the_package():
    script = """
import sys, warnings
warnings.simplefilter("error")
import modeling_code
assert "modeling_code.predict.segmenter" not in sys.modules
assert "CoDeSegmenter" in dir(modeling_code) and "CoDeSegmenter" in modeling_code.__all__
from modeling_code import CoDeSegmenter, SegmentationResult
from modeling_code.predict.segmenter import CoDeSegmenter as direct
assert CoDeSegmenter is direct and SegmentationResult.__module__ == "modeling_code.predict.segmenter"
try:
    modeling_code.NoSuchThing
except AttributeError:
    print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_the_finder_is_installed_once_and_first():
    finder = _moved_modules.install()
    assert _moved_modules.install() is finder
    assert sum(isinstance(f, _moved_modules.MovedModuleFinder) for f in sys.meta_path) == 1
    assert finder.find_spec("modeling_code.modeling_code") is None and finder.find_spec("json") is None
