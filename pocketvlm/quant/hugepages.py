"""Weights that decode streams every token, moved into one arena of transparent huge pages (Linux).

Why: decode reads every weight once per token (hundreds of MB), and with 4 KB pages that is a TLB miss per
4 KB and a hardware prefetcher that stops at every page boundary. Where the kernel's transparent huge pages
are set to ``madvise`` (a common default, and this VM's), PyTorch's allocations never get 2 MB pages; an
anonymous ``mmap`` with ``MADV_HUGEPAGE`` does. Measured on the 2-core Zen 4 VM: 48 q4 matrices of
4864 x 896 (~100 MB) streamed at ~30 GB/s from huge pages vs ~25 GB/s from ordinary ones (q4_linear, M = 1,
interleaved rounds).

:func:`move_to_hugepages` copies tensors into the arena in the order given (decode order, so the stream is
also contiguous) and re-points each tensor at its copy with ``Tensor.set_``: the tensor objects (module
buffers, the fused plan's references) stay the same, their old storage is freed (and given back to the OS
with glibc's ``malloc_trim``). Elsewhere (no
``MADV_HUGEPAGE``, THP off, not Linux) it does nothing: the weights stay where they are.
"""
from __future__ import annotations

import mmap
import os

import torch

HUGE = 2 << 20
ALIGN = 64  # every tensor starts on a cache line (and any dtype's alignment)
TRIM_EVERY = 64 << 20


def hugepages_possible() -> bool:
    if not hasattr(mmap, "MADV_HUGEPAGE") or os.environ.get("POCKETVLM_NO_HUGEPAGES") == "1":
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return False
    return "[never]" not in mode


def move_to_hugepages(tensors: list[torch.Tensor]) -> int:
    """Copy the distinct contiguous CPU tensors of ``tensors`` into one huge-page arena, in order; returns
    the bytes moved (0 when huge pages are not possible here)."""
    seen, todo = set(), []
    for t in tensors:
        if t is None or id(t) in seen or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            continue
        seen.add(id(t))
        todo.append(t)
    if not todo or not hugepages_possible():
        return 0
    offsets, total = [], 0
    for t in todo:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    size = -(-(total + HUGE) // HUGE) * HUGE
    release_freed_heap()  # what loading freed (codes repacked into the kernel layouts) goes back first
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, so the pages are faulted in as 2 MB ones
    buf = torch.frombuffer(mm, dtype=torch.uint8)  # the storage keeps mm alive
    base = (-buf.data_ptr()) % HUGE
    freed = 0
    for t, off in zip(todo, offsets):
        n = t.numel() * t.element_size()
        dst = buf[base + off: base + off + n].view(t.dtype).view(t.shape)
        # tensors made under inference_mode (a layer packed lazily by an earlier forward) may only be
        # changed in place inside it
        with torch.inference_mode() if t.is_inference() else torch.no_grad():
            dst.copy_(t)
            t.set_(dst)
        freed += n
        if freed >= TRIM_EVERY:  # give the old copies back as we go: else the peak holds the weights twice
            release_freed_heap()
            freed = 0
    release_freed_heap()
    return total


def release_freed_heap() -> None:
    """glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in the heap: the weights'
    old copies would stay resident. ``malloc_trim(0)`` gives their pages back."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
