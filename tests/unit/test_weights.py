"""Weight transport pieces that need no Ray: numpy views and in-place loading."""

from __future__ import annotations

import pytest
import torch

from rlalign_ray.sync.weights import load_arrays, to_numpy


def test_round_trip_including_bfloat16():
    src = torch.nn.Linear(3, 2).to(torch.bfloat16)
    dst = torch.nn.Linear(3, 2).to(torch.bfloat16)
    arrays, dtypes = {}, {}
    for name, p in src.named_parameters():
        arrays[name], dtypes[name] = to_numpy(p)
    assert dtypes == {"weight": "bfloat16", "bias": "bfloat16"}
    before = dst.weight.data_ptr()
    load_arrays(dst, arrays, dtypes)
    assert dst.weight.data_ptr() == before  # copied in place, no new allocation
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)


def test_mismatched_names_and_shapes_are_refused():
    dst = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="missing \\['bias'\\]"):
        load_arrays(dst, {"weight": to_numpy(dst.weight)[0]}, {})
    bad = {"weight": torch.zeros(2, 4).numpy(), "bias": torch.zeros(2).numpy()}
    with pytest.raises(ValueError, match="weight: shape"):
        load_arrays(dst, bad, {})
