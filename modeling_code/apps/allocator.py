"""Keep freed memory in the process for reuse (glibc), so large tensors stop costing fresh pages.

Inference allocates and frees the same tensors for every window, training for every step. glibc's malloc hands
blocks above its adaptive ``mmap`` threshold, and free space at the top of the heap, back to the operating
system. The next allocation of the same size then takes fresh pages: a page fault and a zero-fill per 4 KB,
which on this project's 2-core CPU cost 0.2–0.4 s of a 0.9–2 s image (measured with ``getrusage`` minor
faults). Fixing the ``mmap`` threshold at its ceiling and raising the trim threshold keeps those blocks in
the heap. Results do not change; only where the memory comes from. The process keeps its peak memory reserved.

The entry points that run whole jobs call ``retain_freed_memory`` once with the device they compute on: the
``code-seg`` command, ``training/train.py``, ``training/evaluate.py``, the Space and the benchmarks. On an
accelerator nothing is changed: the tensors freed and allocated again for every window or step live in its own
caching allocator, which keeps freed blocks already, and on the host the setting would only keep the peak of
loading (weights staged in CPU memory) reserved. Library functions leave the process's allocator alone; a
library user may call it too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_CEILING = 32 * 2**20  # the largest value glibc accepts on 64-bit systems
TRIM_THRESHOLD = 2**30  # hand memory back only when a whole GiB at the top of the heap is free


def retain_freed_memory(device: object = "cpu") -> bool:
    """Ask glibc to serve blocks up to 32 MiB from the heap and to keep freed heap memory, for a process that
    computes on ``device``.

    Args:
        device: where the process's tensors live (a ``torch.device`` or its name); ``"auto"``: CUDA when
            present, else the CPU, as ``--device auto`` and accelerate choose. Only the CPU's are helped.

    Returns True when both settings were applied; False on an accelerator or where the C library is not glibc
    (nothing changes).
    """
    if str(device) == "auto":
        import torch  # only here: the command line imports this module before it needs torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).split(":")[0] != "cpu":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
