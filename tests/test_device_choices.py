"""What inference and evaluation choose per device, tested on the CPU: the CUDA choices (the masker's whole batch
in large bands, window batches under a memory budget) give the CPU's results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference_implementations import segment_window_reference

import modeling_code.modeling_code
from modeling_code.masker import ACCELERATOR_BAND_TAP_BYTES, BAND_TAP_BYTES, inference_band_plan


@pytest.fixture
def open_gates_model(tiny_code_model):
    """The tiny model with its decoder gates open (0 at initialisation, where the decoder only upsamples)."""
    with torch.no_grad():
        for block in tiny_code_model.masker.decoder.blocks:
            block.gate.fill_(0.6)
    return tiny_code_model.eval()


def test_the_cpu_bands_window_by_window_and_accelerators_take_the_whole_batch():
    assert inference_band_plan("cpu") == (True, BAND_TAP_BYTES)
    assert inference_band_plan("cuda") == inference_band_plan("mps") == (False, ACCELERATOR_BAND_TAP_BYTES)


@pytest.mark.parametrize("max_tap_bytes", [ACCELERATOR_BAND_TAP_BYTES, 3 * 9 * 48 * 4 * 6])  # one band; 1-row bands
def test_window_masks_of_the_whole_batch_in_bands_equal_the_reference(open_gates_model, max_tap_bytes, monkeypatch):
    model = open_gates_model
    monkeypatch.setattr(modeling_code.modeling_code, "inference_band_plan", lambda device_type: (False, max_tap_bytes))
    seen = []
    bands = model.masker.bands
    monkeypatch.setattr(model.masker, "bands", lambda hidden, *args: seen.append(hidden.shape[0]) or bands(hidden, *args))
    pixels = torch.randn(3, 3, 40, 24)
    prompted = F.normalize(torch.randn(4, 32), dim=-1)
    masks = model.segment_window(pixels, prompted).masks
    assert seen == [3]  # one pass over all windows
    torch.testing.assert_close(masks, segment_window_reference(model, pixels, prompted).masks, rtol=1e-5, atol=1e-5)
