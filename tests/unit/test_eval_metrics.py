"""pass@k (unbiased, Chen et al. 2021) and mean@k on hand-computed cases."""

from math import comb

import pytest
import torch

from rlalign_ray.algorithms.eval_metrics import pass_at_k, pass_ks, sample_metrics


def test_pass_at_k_matches_the_binomial_formula():
    n = torch.tensor([5, 5, 5, 4, 6])
    c = torch.tensor([2, 0, 5, 3, 1])
    # by hand: 1 - C(n - c, k) / C(n, k)
    assert pass_at_k(n, c, 2).tolist() == pytest.approx([1 - 3 / 10, 0.0, 1.0, 1.0, 1 - 10 / 15])
    assert pass_at_k(n, c, 1).tolist() == pytest.approx([2 / 5, 0, 1, 3 / 4, 1 / 6])
    for k in (1, 2, 3, 4):
        want = [1 - comb(int(a - b), k) / comb(int(a), k) for a, b in zip(n, c)]
        assert pass_at_k(n, c, k).tolist() == pytest.approx(want)


def test_sample_metrics_groups_by_prompt_and_uses_the_threshold():
    # prompt 7: rewards 1, 0, 0, 0.5 ; prompt 3: 0, 0, 0, 0 ; prompt 9: 1, 1, 0, 1
    scores = torch.tensor([1, 0, 0, 0.5, 0, 0, 0, 0, 1, 1, 0, 1.0])
    groups = torch.tensor([7] * 4 + [3] * 4 + [9] * 4)
    m = sample_metrics(scores, groups, 4, threshold=1.0)
    assert pass_ks(4) == [1, 2, 4]
    assert m["pass@1"] == pytest.approx((1 / 4 + 0 + 3 / 4) / 3)
    p2 = [1 - comb(3, 2) / comb(4, 2), 0.0, 1.0]  # c = 1, 0, 3
    assert m["pass@2"] == pytest.approx(sum(p2) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["mean@4"] == pytest.approx((1.5 / 4 + 0 + 3 / 4) / 3)
    # a lower threshold counts the 0.5 as correct
    assert sample_metrics(scores, groups, 4, threshold=0.5)["pass@1"] == pytest.approx(
        (2 / 4 + 0 + 3 / 4) / 3
    )
    # one greedy sample per prompt: pass@1 is the share of correct prompts
    one = sample_metrics(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 1, 2]), 1, 1.0)
    assert one == pytest.approx({"pass@1": 2 / 3, "mean@1": 2 / 3})
    assert pass_ks(6) == [1, 2, 4, 6]
