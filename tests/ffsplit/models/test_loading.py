"""ffsplit/models/loading.py: the weight check every model load pays."""

import torch


def test_all_finite_checks_every_element_and_survives_an_overflowing_sum() -> None:
    from ffsplit.models.loading import all_finite

    assert all_finite(torch.randn(64, 32))
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(64, 32)
        t[17, 3] = bad
        assert not all_finite(t)
        assert not all_finite(t.to(torch.bfloat16))
    huge = torch.full((4,), 3e38)  # finite, but the sum overflows to inf
    assert all_finite(huge)
