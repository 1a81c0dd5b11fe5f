"""benchmarks/stages.py times every stage of a request, on a tiny model: each stage with work gets a time of its
own (the masker's last decoder block too, which inference runs band by band), and the stages and the rest add up
to the whole request."""

from __future__ import annotations

import pytest
from helpers import REPO_ROOT, TINY_CODE_OVERRIDES, make_tiny_clip_config

pytestmark = pytest.mark.slow


def test_every_stage_of_a_voc_size_request_is_timed(tiny_tokenizer, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import inference
    import stages

    overrides = {"clip_config": make_tiny_clip_config(tiny_tokenizer).to_dict(), **TINY_CODE_OVERRIDES}
    seconds, macs, windows = inference._in_fresh_process(stages.profile, "b", 2, 1, overrides)
    assert windows == 2  # 500x375 -> 448x597 -> two 448x448 windows
    timed_without_work = ["PAMR affinity", "to window size", "preprocess", "post-process"]
    for name in [*macs, *timed_without_work]:
        assert seconds.get(name, 0) > 0, f"{name} was not timed: {sorted(seconds)}"
    assert macs["decoder block 2"] == 4 * macs["decoder block 1"]
    bare_and_whole = ("bare pass", "bare blocks", "whole request")
    parts = sum(value for name, value in seconds.items() if name not in bare_and_whole)
    assert seconds["rest"] >= 0 and parts == pytest.approx(seconds["whole request"], rel=1e-9)
    assert seconds["bare blocks"] < seconds["bare pass"]

