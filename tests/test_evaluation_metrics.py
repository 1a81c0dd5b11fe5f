"""The streaming confusion-matrix mIoU against hand-computed values, mmseg's algorithm and the evaluate module."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_code.evaluation.metrics import IGNORE_INDEX, METRIC_PATH, ConfusionMatrix
from modeling_code.evaluation.specs import get_benchmark, map_labels


def mmseg_reference(predictions, labels, num_classes, ignore_index=IGNORE_INDEX):
    """mmsegmentation 0.27's algorithm: per-image histogram areas (torch.histc bins), summed, then divided."""
    areas = np.zeros((4, num_classes))  # intersect, union, pred_label, label
    for prediction, label in zip(predictions, labels):
        counted = label != ignore_index
        prediction, label = prediction[counted], label[counted]
        intersect = prediction[prediction == label]

        def histogram(values):
            return np.histogram(values, bins=num_classes, range=(0, num_classes - 1))[0]

        area_intersect, area_pred, area_label = histogram(intersect), histogram(prediction), histogram(label)
        areas += [area_intersect, area_pred + area_label - area_intersect, area_pred, area_label]
    intersect, union, _, label_area = areas
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "aAcc": intersect.sum() / label_area.sum(),
            "IoU": intersect / union,
            "Acc": intersect / label_area,
        }


def test_hand_computed_matrix_and_metrics():
    label = np.array([[0, 0, 1], [1, 2, IGNORE_INDEX]])
    prediction = np.array([[0, 1, 1], [1, 0, 2]])  # the 2 at the ignored pixel is not counted
    confusion = ConfusionMatrix(3)
    confusion.update(prediction, label)
    np.testing.assert_array_equal(confusion.matrix, [[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    np.testing.assert_array_equal(confusion.intersection, [1, 2, 0])
    np.testing.assert_array_equal(confusion.union, [3, 3, 1])
    metrics = confusion.compute()
    np.testing.assert_allclose(metrics["IoU"], [1 / 3, 2 / 3, 0.0])
    np.testing.assert_allclose(metrics["Acc"], [0.5, 1.0, 0.0])
    assert metrics["mIoU"] == pytest.approx(1 / 3)
    assert metrics["mAcc"] == pytest.approx(0.5)
    assert metrics["aAcc"] == pytest.approx(3 / 5)


def test_absent_classes_are_nan_and_left_out_of_the_means():
    label = np.array([[0, 0], [1, 1]])
    prediction = np.array([[0, 2], [1, 1]])  # class 2 predicted but never labelled, class 3 absent
    confusion = ConfusionMatrix(4)
    confusion.update(prediction, label)
    metrics = confusion.compute()
    np.testing.assert_allclose(metrics["IoU"], [0.5, 1.0, 0.0, np.nan])
    np.testing.assert_allclose(metrics["Acc"], [0.5, 1.0, np.nan, np.nan])
    assert metrics["mIoU"] == pytest.approx(0.5)
    assert metrics["mAcc"] == pytest.approx(0.75)
    assert metrics["aAcc"] == pytest.approx(0.75)


def test_ignored_pixels_count_nowhere():
    label = np.full((3, 3), IGNORE_INDEX)
    label[0, 0] = 1
    prediction = np.full((3, 3), 7)  # out of range, but only where ignored
    prediction[0, 0] = 1
    confusion = ConfusionMatrix(2)
    confusion.update(prediction, label)
    assert confusion.matrix.sum() == 1
    np.testing.assert_allclose(confusion.compute()["IoU"], [np.nan, 1.0])


def test_background_counts_as_a_class_only_where_the_benchmark_keeps_it():
    raw_label = np.array([[0, 0, 15], [15, 0, IGNORE_INDEX]])  # background and 'person'
    voc, voc20 = get_benchmark("voc"), get_benchmark("voc20")
    with_background = ConfusionMatrix(voc.num_classes)
    with_background.update(np.array([[0, 15, 15], [15, 15, 3]]), map_labels(raw_label, voc))
    metrics = with_background.compute()
    # background: 1 hit, 3 labelled, 1 predicted -> 1/3; person: 2 hits, 2 labelled, 4 predicted -> 2/4
    assert metrics["IoU"][0] == pytest.approx(1 / 3)
    assert metrics["IoU"][15] == pytest.approx(2 / 4)
    assert metrics["mIoU"] == pytest.approx(5 / 12)
    without_background = ConfusionMatrix(voc20.num_classes)
    without_background.update(np.array([[0, 14, 14], [14, 14, 3]]), map_labels(raw_label, voc20))
    assert without_background.matrix.sum() == 2  # background pixels are ignored
    assert without_background.compute()["mIoU"] == pytest.approx(1.0)


def test_streaming_and_merging_equal_one_update():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 5, size=(7, 9)) for _ in range(4)]
    predictions = [rng.integers(0, 5, size=(7, 9)) for _ in range(4)]
    whole = ConfusionMatrix(5)
    whole.update(np.concatenate(predictions), np.concatenate(labels))
    first, second = ConfusionMatrix(5), ConfusionMatrix(5)
    for index, (prediction, label) in enumerate(zip(predictions, labels)):
        (first if index < 2 else second).update(prediction, label)
    np.testing.assert_array_equal((first + second).matrix, whole.matrix)
    np.testing.assert_array_equal(first.merge(second).matrix, whole.matrix)
    np.testing.assert_array_equal(ConfusionMatrix.from_matrix(whole.matrix).matrix, whole.matrix)
    with pytest.raises(ValueError, match="cannot merge"):
        first.merge(ConfusionMatrix(4))


@pytest.mark.parametrize(
    ("prediction", "label", "message"),
    [
        (np.zeros((2, 2), int), np.zeros((2, 3), int), "shape"),
        (np.zeros((2, 2), float), np.zeros((2, 2), int), "integer"),
        (np.zeros((2, 2), int), np.full((2, 2), 3), r"label values \[3\]"),
        (np.full((2, 2), -1), np.zeros((2, 2), int), r"prediction values \[-1\]"),
    ],
)
def test_bad_inputs_are_rejected(prediction, label, message):
    with pytest.raises(ValueError, match=message):
        ConfusionMatrix(3).update(prediction, label)


def test_bad_construction_is_rejected():
    with pytest.raises(ValueError, match="positive"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="ignore_index 2"):
        ConfusionMatrix(3, ignore_index=2)
    with pytest.raises(ValueError, match="square"):
        ConfusionMatrix.from_matrix(np.zeros((2, 3), int))


@pytest.mark.filterwarnings("error")
def test_empty_matrix_gives_nan_without_warnings():
    metrics = ConfusionMatrix(3).compute()
    assert np.isnan(metrics["mIoU"]) and np.isnan(metrics["mAcc"]) and np.isnan(metrics["aAcc"])
    assert np.isnan(metrics["IoU"]).all()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_classes=st.integers(1, 9),
    num_images=st.integers(1, 4),
    ignored_fraction=st.sampled_from([0.0, 0.2, 0.9]),
)
def test_equals_mmseg_algorithm_on_random_maps(seed, num_classes, num_images, ignored_fraction):
    rng = np.random.default_rng(seed)
    labels, predictions = [], []
    for _ in range(num_images):
        shape = tuple(rng.integers(1, 12, size=2))
        # Labels and predictions use random class subsets so that absent classes occur.
        label = rng.choice(rng.choice(num_classes, size=rng.integers(1, num_classes + 1)), size=shape)
        label[rng.random(shape) < ignored_fraction] = IGNORE_INDEX
        labels.append(label)
        predictions.append(
            rng.choice(rng.choice(num_classes, size=rng.integers(1, num_classes + 1)), size=shape)
        )
    confusion = ConfusionMatrix(num_classes)
    for prediction, label in zip(predictions, labels):
        confusion.update(prediction, label)
    ours = confusion.compute()
    reference = mmseg_reference(predictions, labels, num_classes)
    np.testing.assert_allclose(ours["IoU"], reference["IoU"], equal_nan=True)
    np.testing.assert_allclose(ours["Acc"], reference["Acc"], equal_nan=True)
    if np.isnan(reference["IoU"]).all():
        assert np.isnan(ours["mIoU"])
    else:
        assert ours["mIoU"] == pytest.approx(np.nanmean(reference["IoU"]))
    if np.isnan(reference["aAcc"]):
        assert np.isnan(ours["aAcc"])
    else:
        assert ours["aAcc"] == pytest.approx(reference["aAcc"])


@pytest.fixture(scope="module")
def random_batches():
    rng = np.random.default_rng(1)
    labels = [rng.integers(0, 6, size=(5, 8)) for _ in range(6)]
    for label in labels:
        label[rng.random(label.shape) < 0.2] = IGNORE_INDEX
    predictions = [rng.integers(0, 6, size=(5, 8)) for _ in range(6)]
    expected = ConfusionMatrix(6)
    for prediction, label in zip(predictions, labels):
        expected.update(prediction, label)
    return predictions, labels, expected.compute()


def assert_same_metrics(actual, expected):
    for key in ("aAcc", "mIoU", "mAcc"):
        assert actual[key] == pytest.approx(expected[key])
    np.testing.assert_allclose(actual["IoU"], expected["IoU"], equal_nan=True)
    np.testing.assert_allclose(actual["Acc"], expected["Acc"], equal_nan=True)


def test_evaluate_module_streams_into_a_matrix(random_batches):
    predictions, labels, expected = random_batches
    metric = evaluate.load(METRIC_PATH, num_labels=6)
    metric.add_batch(predictions=predictions[:3], references=labels[:3])
    for prediction, label in zip(predictions[3:], labels[3:]):
        metric.add(prediction=prediction, reference=label)
    assert metric.writer is None  # nothing cached besides the matrix
    assert metric.confusion.matrix.shape == (6, 6)
    assert_same_metrics(metric.compute(), expected)
    assert np.isnan(metric.compute()["mIoU"])  # compute resets the counts


def test_evaluate_module_one_shot_compute(random_batches):
    predictions, labels, expected = random_batches
    assert_same_metrics(
        evaluate.load(METRIC_PATH).compute(predictions=predictions, references=labels, num_labels=6), expected
    )
    with pytest.raises(ValueError, match="num_labels is unknown"):
        evaluate.load(METRIC_PATH).add(prediction=predictions[0], reference=labels[0])


def test_evaluate_module_refuses_changing_settings_midway(random_batches):
    predictions, labels, _ = random_batches
    metric = evaluate.load(METRIC_PATH, num_labels=6)
    metric.add(prediction=predictions[0], reference=labels[0])
    with pytest.raises(ValueError, match="already counted"):
        metric.compute(num_labels=7)
