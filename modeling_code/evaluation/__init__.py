"""Zero-shot segmentation benchmarks: their data (``specs`` with ``specs.yaml``: class names, background flag,
label mappings), their datasets on disk or on the Hub (``segmentation_datasets``, ``coco_object``), mmsegmentation's
mIoU (``metrics``; ``hub_metric/code_mean_iou`` wraps it as an ``evaluate`` metric), the evaluation loop and its
outputs (``evaluator``) and the command line behind ``code-seg evaluate`` (``runner``). It builds on the root and
``predict`` layers; training evaluates with it.

``modeling_code.evaluation`` was the evaluation-loop module before 0.2; its names (``evaluate_benchmark``,
``write_outputs``, ...) still resolve here, with a ``FutureWarning``, for one release: import them from
``modeling_code.evaluation.evaluator``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# The public names of the former ``modeling_code.evaluation`` module, now ``evaluator``'s ``__all__``.
_EVALUATOR_NAMES = (
    "MARKDOWN_FILE",
    "MODEL_INDEX_FILE",
    "MODEL_INDEX_TASK",
    "OVERLAY_DIR",
    "RESULTS_FILE",
    "BenchmarkResult",
    "OverlayRow",
    "evaluate_benchmark",
    "markdown_table",
    "model_index_entries",
    "save_overlay_grid",
    "write_outputs",
    "write_results_json",
)


def __getattr__(name: str) -> Any:
    if name in _EVALUATOR_NAMES:
        warnings.warn(
            f"modeling_code.evaluation.{name} is deprecated and will be removed in 0.3: the module moved to "
            f"modeling_code.evaluation.evaluator; import {name} from there",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f"{__name__}.evaluator"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
