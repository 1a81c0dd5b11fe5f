"""Streaming mIoU: a confusion matrix accumulated over a dataset, with mmsegmentation's numbers.

mmsegmentation 0.27 sums per-image intersection / union / label / prediction areas over the whole set
and reports ``IoU = intersection / union`` and ``Acc = intersection / label area`` per class (NaN where
the denominator is 0), their NaN-ignoring means (mIoU, mAcc) and the overall pixel accuracy (aAcc).
All four areas are sums over a [label, prediction] confusion matrix, which is all this module keeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

IGNORE_INDEX = 255

# Pass to ``evaluate.load`` to get the same metric as a Hugging Face ``evaluate`` module.
METRIC_PATH = str(Path(__file__).parent / "hub_metric" / "code_mean_iou")


def _nan_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ``numerator / denominator`` as float64, NaN where the denominator is 0."""
    result = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=result, where=denominator > 0)
    return result


def _nan_mean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without a warning) when every entry is NaN."""
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else float("nan")


class ConfusionMatrix:
    """A [num_classes, num_classes] count matrix: rows are ground-truth classes, columns predictions.

    Args:
        num_classes: number of classes; valid labels and predictions are ``0 .. num_classes - 1``.
        ignore_index: label value whose pixels are not counted (255 in every benchmark).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is one of the {num_classes} class indices")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, ignore_index: int = IGNORE_INDEX) -> ConfusionMatrix:
        """Wrap existing counts (e.g. a matrix summed across processes). ``matrix``: [C, C] integers."""
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a confusion matrix must be square, got shape {matrix.shape}")
        confusion = cls(matrix.shape[0], ignore_index)
        confusion.matrix += matrix.astype(np.int64)
        return confusion

    def update(self, prediction: np.ndarray, label: np.ndarray) -> None:
        """Count one prediction against its label.

        Args:
            prediction: [...] integer class indices in ``[0, num_classes)`` (any value where ignored).
            label: integer labels of the same shape; ``ignore_index`` marks pixels not counted.
        """
        prediction = np.asarray(prediction)
        label = np.asarray(label)
        if prediction.shape != label.shape:
            raise ValueError(f"prediction shape {prediction.shape} differs from label shape {label.shape}")
        for name, values in (("prediction", prediction), ("label", label)):
            if not np.issubdtype(values.dtype, np.integer):
                raise ValueError(f"{name} must hold integer class indices, got dtype {values.dtype}")
        counted = label != self.ignore_index
        label = label[counted].astype(np.int64)
        prediction = prediction[counted].astype(np.int64)
        for name, values in (("label", label), ("prediction", prediction)):
            outside = (values < 0) | (values >= self.num_classes)
            if outside.any():
                raise ValueError(
                    f"{name} values {np.unique(values[outside]).tolist()[:10]} are outside the "
                    f"{self.num_classes} classes (ignore label: {self.ignore_index})"
                )
        pairs = label * self.num_classes + prediction
        self.matrix += np.bincount(pairs, minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """A new matrix holding the counts of both (e.g. two shards of one dataset)."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) into a "
                f"{self.num_classes}-class one (ignore {self.ignore_index})"
            )
        return ConfusionMatrix.from_matrix(self.matrix + other.matrix, self.ignore_index)

    __add__ = merge

    @property
    def intersection(self) -> np.ndarray:
        """[C] pixels predicted as their true class."""
        return np.diagonal(self.matrix).copy()

    @property
    def label_area(self) -> np.ndarray:
        """[C] pixels labelled with each class."""
        return self.matrix.sum(axis=1)

    @property
    def prediction_area(self) -> np.ndarray:
        """[C] counted pixels predicted as each class."""
        return self.matrix.sum(axis=0)

    @property
    def union(self) -> np.ndarray:
        """[C] pixels labelled or predicted as each class."""
        return self.label_area + self.prediction_area - self.intersection

    def compute(self) -> dict[str, Any]:
        """mmsegmentation's metrics, as fractions in [0, 1].

        Returns:
            ``aAcc`` (float): correctly predicted pixels / counted pixels.
            ``mIoU`` (float), ``mAcc`` (float): means of ``IoU`` / ``Acc`` over the non-NaN classes.
            ``IoU`` ([C] float64): intersection / union, NaN for classes neither labelled nor predicted.
            ``Acc`` ([C] float64): intersection / label area, NaN for classes never labelled.
        """
        iou = _nan_divide(self.intersection, self.union)
        accuracy = _nan_divide(self.intersection, self.label_area)
        total = self.matrix.sum()
        return {
            "aAcc": float(self.intersection.sum() / total) if total else float("nan"),
            "mIoU": _nan_mean(iou),
            "mAcc": _nan_mean(accuracy),
            "IoU": iou,
            "Acc": accuracy,
        }
