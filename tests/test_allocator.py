"""retain_freed_memory: a freed block of a few MB is reused without new page faults."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import resource
    import torch
    from modeling_code.apps.allocator import retain_freed_memory

    applied = retain_freed_memory()
    def faults_of_one_round():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        # allocate, touch every page, free: the pattern of a window or a step, 24 MiB blocks
        blocks = [torch.ones(6 * 2**20) for _ in range(3)]
        del blocks
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    for _ in range(3):  # the first rounds take fresh pages and grow the heap
        faults_of_one_round()
    print(applied, faults_of_one_round())
    """
)


def run_in_fresh_process() -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting exists in glibc only")
def test_freed_blocks_are_reused_without_page_faults():
    applied, faults = run_in_fresh_process()
    assert applied == "True"
    assert faults < 100  # 72 MiB of fresh pages would be ~18,000 faults of 4 KiB
    # (glibc's default usually gives ~12,000 here, handing the freed blocks back, but not always: its
    # thresholds adapt to the process's earlier frees, so the default is not asserted.)


def test_it_is_a_no_op_without_glibc(monkeypatch):
    from modeling_code.apps import allocator

    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.retain_freed_memory() is False


class RecordingLibc:
    """Stands in for the C library: records mallopt calls instead of changing this process's allocator."""

    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append((parameter, value))
        return 1


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting exists in glibc only")
def test_only_a_process_computing_on_the_cpu_is_changed(monkeypatch):
    import torch

    from modeling_code.apps import allocator

    libc = RecordingLibc()
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    for device in ("cuda", "cuda:1", torch.device("cuda", 0), "mps"):
        assert allocator.retain_freed_memory(device) is False
    assert libc.calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert allocator.retain_freed_memory("auto") is False and libc.calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert allocator.retain_freed_memory("auto") is True
    assert allocator.retain_freed_memory(torch.device("cpu")) is True
    assert libc.calls == 2 * [(allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD_CEILING),
                              (allocator.M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD)]
