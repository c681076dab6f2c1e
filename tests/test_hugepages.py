"""pocketvlm.quant.hugepages: weights moved into one huge-page arena keep their values and identity."""
from __future__ import annotations

import pytest
import torch

from pocketvlm.quant import hugepages

needs_thp = pytest.mark.skipif(not hugepages.hugepages_possible(), reason="no transparent huge pages here")


def _tensors():
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        made_in_inference = torch.randint(0, 255, (300,), generator=g, dtype=torch.uint8)
    return [torch.randint(0, 255, (1000, 7), generator=g, dtype=torch.uint8), torch.randn(33, 5, generator=g).half(),
            made_in_inference, torch.randn(17, generator=g)]


@needs_thp
def test_move_keeps_values_and_identity_in_order():
    ts = _tensors()
    before = [t.clone() for t in ts]
    ids = [id(t) for t in ts]
    moved = hugepages.move_to_hugepages(ts + [ts[0]])  # a repeated tensor is moved once
    assert moved >= sum(t.numel() * t.element_size() for t in ts)
    assert [id(t) for t in ts] == ids
    for t, b in zip(ts, before):
        assert torch.equal(t, b) and t.data_ptr() % hugepages.ALIGN == 0
    ptrs = [t.data_ptr() for t in ts]
    assert ptrs == sorted(ptrs) and ptrs[-1] - ptrs[0] < moved  # one arena, in the order given
    ts[1].add_(1)  # still ordinary, writable tensors
    assert torch.equal(ts[1], before[1] + 1)


def test_switched_off_or_nothing_to_move(monkeypatch):
    ts = _tensors()
    ptrs = [t.data_ptr() for t in ts]
    monkeypatch.setenv("POCKETVLM_NO_HUGEPAGES", "1")
    assert hugepages.move_to_hugepages(ts) == 0
    assert [t.data_ptr() for t in ts] == ptrs
    monkeypatch.delenv("POCKETVLM_NO_HUGEPAGES")
    assert hugepages.move_to_hugepages([None, torch.empty(0), torch.randn(4, 4).t()]) == 0  # nothing movable
