"""mmsegmentation's mIoU as a Hugging Face `evaluate` metric that keeps only a confusion matrix.

Load it with `evaluate.load(modeling_code.evaluation.metrics.METRIC_PATH, num_labels=21)`.
Unlike the Hub's `mean_iou`, which stores every prediction and reference until `compute`, each
`add` / `add_batch` folds its maps into a [num_labels, num_labels] count matrix at once.
"""

import datasets
import evaluate
import numpy as np

from modeling_code.evaluation.metrics import IGNORE_INDEX, ConfusionMatrix

_DESCRIPTION = """
Mean intersection-over-union computed exactly as mmsegmentation 0.27 does: a confusion matrix
accumulated over the whole dataset, IoU = TP / (TP + FP + FN) per class, classes absent from both
predictions and references are NaN and left out of the mean, pixels labelled `ignore_index` are not
counted. Also reports the overall pixel accuracy (aAcc) and the mean per-class accuracy (mAcc).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): [H, W] integer class maps, values in [0, num_labels).
    references (`List[ndarray]`): [H, W] integer label maps of the same shapes.
    num_labels (`int`): number of classes; give it to `evaluate.load` (needed before the first `add`)
        or, for a one-shot `compute(predictions=..., references=...)`, to `compute`.
    ignore_index (`int`, defaults to 255): label value whose pixels are not counted.
Returns:
    `aAcc`, `mIoU`, `mAcc` (floats in [0, 1]) and `IoU`, `Acc` ([num_labels] arrays, NaN where absent).
Examples:
    >>> metric = evaluate.load(METRIC_PATH, num_labels=3)
    >>> metric.add_batch(predictions=[np.array([[0, 1], [2, 2]])], references=[np.array([[0, 1], [2, 255]])])
    >>> metric.compute()["mIoU"]
    1.0
"""


class CodeMeanIou(evaluate.Metric):
    """`evaluate` wrapper around `ConfusionMatrix`: same numbers, constant memory."""

    def __init__(self, *args, num_labels=None, ignore_index=IGNORE_INDEX, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.confusion = None

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
        )

    def _configure(self, num_labels, ignore_index):
        """Set the class count / ignore label, which cannot change once pixels are counted."""
        num_labels = self.num_labels if num_labels is None else num_labels
        ignore_index = self.ignore_index if ignore_index is None else ignore_index
        if self.confusion is not None and (num_labels, ignore_index) != (self.num_labels, self.ignore_index):
            raise ValueError(
                f"num_labels={num_labels}, ignore_index={ignore_index} differ from the "
                f"num_labels={self.num_labels}, ignore_index={self.ignore_index} already counted with"
            )
        self.num_labels, self.ignore_index = num_labels, ignore_index

    def _matrix(self):
        if self.confusion is None:
            if self.num_labels is None:
                raise ValueError("num_labels is unknown: pass it to evaluate.load(..., num_labels=N)")
            self.confusion = ConfusionMatrix(self.num_labels, self.ignore_index)
        return self.confusion

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Count a batch: `predictions` and `references` are sequences of equally shaped [H, W] int maps."""
        if kwargs:
            raise ValueError(f"unexpected inputs {sorted(kwargs)}; expected predictions and references")
        if predictions is None or references is None or len(predictions) != len(references):
            raise ValueError("add_batch needs as many predictions as references")
        confusion = self._matrix()
        for prediction, reference in zip(predictions, references):
            confusion.update(np.asarray(prediction), np.asarray(reference))

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Count one [H, W] prediction against its [H, W] reference."""
        self.add_batch(predictions=[prediction], references=[reference], **kwargs)

    def compute(self, *, predictions=None, references=None, num_labels=None, ignore_index=None, **kwargs):
        """Metrics over everything added so far (plus the given batch); the counts are then reset."""
        self._configure(num_labels, ignore_index)
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references, **kwargs)
        results = self._matrix().compute()
        self.confusion = None
        return results
