"""ZeRO-3 keeps its parameter prefetching when the output head runs outside the model's
forward (the learner's chunked log-probs): DeepSpeed on CPU, one rank, in a subprocess
(``tests/helpers/zero3.py``), on micro-batches whose chunk counts differ."""

from __future__ import annotations

import pytest

from tests.helpers.subproc import run_helper

pytestmark = pytest.mark.integration


def _run(model: str, wrap: bool) -> dict:
    return run_helper("zero3", model, str(int(wrap)))


def test_zero3_keeps_its_trace_with_a_chunked_head(tiny_model):
    got = _run(tiny_model, wrap=True)
    print(got["log"])
    assert got["wrapped"] and got["complete"]
    assert got["invalidated_after_step_1"] == 0, got["log"]


@pytest.mark.full
def test_zero3_one_call_head_trains_as_the_head_per_chunk(tiny_model):
    """The same statistics and weights as the head called per chunk (which DeepSpeed's
    trace cannot follow: it drops it on most micro-batches)."""
    wrapped, per_chunk = _run(tiny_model, wrap=True), _run(tiny_model, wrap=False)
    assert per_chunk["invalidated_after_step_1"] > 0 and not per_chunk["wrapped"]
    for a, b in zip(wrapped["stats"], per_chunk["stats"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    for name, total in wrapped["weights"].items():
        assert total == pytest.approx(per_chunk["weights"][name], rel=1e-5, abs=1e-6), name
