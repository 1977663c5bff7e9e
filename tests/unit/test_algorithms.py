"""Hand-derived checks of the pure-tensor RL math in ``rlalign_ray.algorithms``.

Every expected number has its derivation in the comment above it. Tensors are float64 so
the comparisons can be tight.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rlalign_ray.algorithms import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATION_MODES,
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    check_algorithm_name,
    compute_token_rewards,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    outcome_advantages,
    overlong_penalty,
    policy_loss,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    value_loss,
)

D = torch.float64


def t(data, dtype=D, **kw):
    return torch.tensor(data, dtype=dtype, **kw)


def close(actual, expected, atol=1e-9):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---------------------------------------------------------------------------- utils


def test_masked_mean_scalar_dim_and_empty_rows():
    x = t([[1.0, float("inf"), 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    # masked elements 1 and 3 -> (1 + 3) / 2 = 2; the inf sits on a masked slot
    close(masked_mean(x, mask), 2.0)
    # row 0: (1 + 3) / 2 = 2; row 1 has no masked element -> 0 (not NaN)
    close(masked_mean(x, mask, dim=1), [2.0, 0.0])
    # nothing masked at all -> 0
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)


def test_masked_whiten_unbiased_and_single_element():
    x = t([[1.0, 100.0, 3.0], [5.0, 0.0, 0.0]])
    mask = t([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    # masked elements [1, 3, 5]: mean 3, unbiased var (4 + 0 + 4) / 2 = 4
    # -> (x - 3) / sqrt(4 + 1e-8) = [-1, 0, 1] up to the 1e-8
    s = 1.0 / math.sqrt(4.0 + 1e-8)
    close(masked_whiten(x, mask) * mask, [[-2 * s, 0.0, 0.0], [2 * s, 0.0, 0.0]])
    # one masked element: var treated as 0, (7 - 7) * rsqrt(1e-8) = 0, no NaN
    one = masked_whiten(t([[7.0, 2.0]]), t([[1.0, 0.0]]))
    assert torch.isfinite(one).all()
    close(one[0, 0], 0.0)


LOSS = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]]
MASK = [[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
# row sums S0 = 1 + 3 + 4 = 8 (n0 = 3), S1 = 5 + 6 = 11 (n1 = 2), row 2 all masked (left out)
AGG_CASES = [
    # 19 / 5 tokens; d/dl = 1/5 on every masked token
    ("token-mean", None, 19 / 5, [1 / 5, 1 / 5]),
    # 8 + 11; d/dl = 1 on masked tokens
    ("token-sum", None, 19.0, [1.0, 1.0]),
    # (8 + 11) / 2 sequences; d/dl = 1/2
    ("seq-mean-token-sum", None, 9.5, [1 / 2, 1 / 2]),
    # (8/3 + 11/2) / 2 = 49/12; d/dl = 1/(3*2) in row 0, 1/(2*2) in row 1
    ("seq-mean-token-mean", None, 49 / 12, [1 / 6, 1 / 4]),
    # (8/4 + 11/4) / 2 = 19/8 with norm_len = T = 4; d/dl = 1/(4*2)
    ("seq-mean-token-sum-norm", None, 19 / 8, [1 / 8, 1 / 8]),
    # (8/2 + 11/2) / 2 = 4.75 with norm_len = 2; d/dl = 1/(2*2)
    ("seq-mean-token-sum-norm", 2, 4.75, [1 / 4, 1 / 4]),
]


@pytest.mark.parametrize("mode,norm_len,expected,row_grads", AGG_CASES)
def test_aggregate_loss_modes_values_and_grads(mode, norm_len, expected, row_grads):
    loss_mat = t(LOSS, requires_grad=True)
    mask = t(MASK)
    out = aggregate_loss(loss_mat, mask, mode, norm_len=norm_len)
    close(out, expected)
    out.backward()
    g0, g1 = row_grads
    expected_grad = t([[g0, 0, g0, g0], [g1, g1, 0, 0], [0, 0, 0, 0]])
    close(loss_mat.grad, expected_grad)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_loss_all_masked_is_zero_with_graph(mode):
    loss_mat = t([[float("inf"), 2.0], [3.0, float("nan")]], requires_grad=True)
    out = aggregate_loss(loss_mat, torch.zeros(2, 2, dtype=D), mode)
    # nothing counts -> 0, still differentiable, zero (not NaN) gradient
    close(out.detach(), 0.0)
    assert out.requires_grad
    out.backward()
    close(loss_mat.grad, torch.zeros(2, 2, dtype=D))


def test_aggregate_loss_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        aggregate_loss(t([[1.0]]), t([[1.0]]), "mean")


@pytest.mark.parametrize("n_micro", [1, 2, 4])
def test_token_sum_micro_batches_match_full_token_mean(n_micro):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 6, generator=gen)
    mask = (torch.rand(8, 6, generator=gen) > 0.4).float()
    mask[3] = 0.0  # a fully masked row
    weight = torch.randn(8, 6, generator=gen)

    full_param = base.clone().requires_grad_(True)
    full = aggregate_loss(full_param * weight, mask, "token-mean")
    full.backward()

    mb_param = base.clone().requires_grad_(True)
    total_tokens = mask.sum()
    accumulated = torch.zeros(())
    rows = 8 // n_micro
    for i in range(n_micro):
        sl = slice(i * rows, (i + 1) * rows)
        # each micro-batch divides by the GLOBAL token count, then gradients accumulate
        mb = aggregate_loss(mb_param[sl] * weight[sl], mask[sl], "token-sum") / total_tokens
        mb.backward()
        accumulated = accumulated + mb.detach()
    torch.testing.assert_close(accumulated, full.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(mb_param.grad, full_param.grad, atol=1e-6, rtol=0)


def test_entropy_from_logits():
    logits = t(
        [
            [0.0, 0.0, 0.0, 0.0],
            [math.log(3.0), 0.0, float("-inf"), float("-inf")],
            [1000.0, 1000.0, float("-inf"), -1000.0],
        ]
    )
    # uniform over 4 -> log 4
    # p = [3/4, 1/4] -> -(3/4 ln 3/4 + 1/4 ln 1/4); -inf logits contribute 0
    # two equal huge logits, the rest ~0 probability -> log 2 (logsumexp keeps it finite)
    expected = [
        math.log(4.0),
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)),
        math.log(2.0),
    ]
    close(entropy_from_logits(logits), expected)


# ---------------------------------------------------------------------------- KL


def test_kl_penalty_all_kinds_and_clamps():
    d = [0.5, -0.5, -2.0, 50.0, -50.0, 0.0]
    logp = t(d, requires_grad=True)
    ref = torch.zeros(6, dtype=D)
    # k1 = d
    close(kl_penalty(logp, ref, "k1"), d)
    # k2 = d^2 / 2 -> [0.125, 0.125, 2, 1250, 1250, 0] (no clamp)
    close(kl_penalty(logp, ref, "k2"), [0.125, 0.125, 2.0, 1250.0, 1250.0, 0.0])
    # abs = |d| (no clamp)
    close(kl_penalty(logp, ref, "abs"), [0.5, 0.5, 2.0, 50.0, 50.0, 0.0])
    k3 = kl_penalty(logp, ref, "k3")
    expected_k3 = [
        math.exp(-0.5) + 0.5 - 1,  # d = 0.5
        math.exp(0.5) - 0.5 - 1,  # d = -0.5
        math.exp(2.0) - 2.0 - 1,  # d = -2: 4.389, inside [-10, 10]
        10.0,  # d = 50: exponent -50 -> -20, exp(-20) + 20 - 1 = 19 -> clamped to 10
        10.0,  # d = -50: exponent 50 -> 20, exp(20) - 20 - 1 ~ 4.9e8 -> clamped to 10
        0.0,  # d = 0: 1 + 0 - 1
    ]
    close(k3, expected_k3)
    k3.sum().backward()
    # d k3 / d logp = 1 - exp(-d) where unclamped; 0 where the output clamp is active
    close(logp.grad, [1 - math.exp(-0.5), 1 - math.exp(0.5), 1 - math.exp(2.0), 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(logp, ref, "k4")


def test_kl_controllers():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # error = clip(9/6 - 1 = 0.5, -0.2, 0.2) = 0.2 -> 0.1 * (1 + 0.2 * 1000/10000) = 0.102
    ctl.update(9.0, 1000)
    assert ctl.value == pytest.approx(0.102, abs=1e-12)
    # error = clip(3/6 - 1 = -0.5) = -0.2 -> 0.102 * (1 - 0.2 * 500/10000) = 0.102 * 0.99
    ctl.update(3.0, 500)
    assert ctl.value == pytest.approx(0.10098, abs=1e-12)
    # error = 6.6/6 - 1 = 0.1 (unclipped) -> times 1 + 0.1 * 10000/10000 = 1.1
    ctl.update(6.6, 10000)
    assert ctl.value == pytest.approx(0.111078, abs=1e-12)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05


# ---------------------------------------------------------------------------- advantages


def test_gae_plain_trajectory():
    # gamma = lam = 1: A_t = (sum of rewards from t) - V_t; returns = [1, 1, 1]
    # A = [1 - 0.5, 1 - 0.2, 1 - 0.4]
    adv, ret = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.2, 0.4]]), t([[1.0, 1.0, 1.0]]), 1.0, 1.0)
    close(adv, [[0.5, 0.8, 0.6]])
    close(ret, [[1.0, 1.0, 1.0]])


def test_gae_masked_tokens_padding_and_empty_row():
    rewards = t([[0.1, 5.0, 0.0, 1.0], [0.0, 2.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]])
    values = t([[0.5, 9.0, 0.3, 0.4], [1.0, 1.0, 7.0, 7.0], [1.0, 2.0, 3.0, 4.0]])
    mask = t([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)  # gamma * lam = 0.72
    # row 0, chain t0 -> t2 -> t3 (t1 skipped, its reward 5 and value 9 ignored):
    #   t3: delta = 1 + 0.9*0 - 0.4 = 0.6                 -> A3 = 0.6
    #   t2: delta = 0 + 0.9*0.4 - 0.3 = 0.06              -> A2 = 0.06 + 0.72*0.6 = 0.492
    #   t0: delta = 0.1 + 0.9*0.3 - 0.5 = -0.13           -> A0 = -0.13 + 0.72*0.492 = 0.22424
    # row 1, trailing padding (value after the last valid token is 0, not 7):
    #   t1: delta = 2 + 0 - 1 = 1 -> A1 = 1; t0: delta = 0.9*1 - 1 = -0.1 -> A0 = -0.1 + 0.72
    # row 2: fully masked -> all 0
    expected = [[0.22424, 0.0, 0.492, 0.6], [0.62, 1.0, 0.0, 0.0], [0.0] * 4]
    close(adv, expected)
    # returns = advantages + values
    close(ret, t(expected) + values)


SCORES = [1.0, 2.0, 3.0, 4.0, 6.0, 10.0]
LABELS = [5, 2, 5, 2, 2, 9]  # shuffled labels, groups of size 2, 3 and 1


def test_group_advantages_grpo_shuffled_groups():
    adv = group_advantages(t(SCORES), torch.tensor(LABELS))
    # group 5 = [1, 3] (idx 0, 2): mean 2, unbiased std sqrt(2) -> (r - 2)/(sqrt(2) + 1e-6)
    a = 1.0 / (math.sqrt(2.0) + 1e-6)
    # group 2 = [2, 4, 6] (idx 1, 3, 4): mean 4, unbiased var (4+0+4)/2 = 4 -> std 2
    b = 2.0 / (2.0 + 1e-6)
    # group 9 = [10]: a single sample -> 0
    close(adv, [-a, -b, a, 0.0, b, 0.0])


def test_group_advantages_dr_grpo_and_constant_group():
    adv = group_advantages(t(SCORES), torch.tensor(LABELS), scale_by_std=False)
    # r - group mean: group 5 mean 2, group 2 mean 4, group 9 single -> 0
    close(adv, [-1.0, -2.0, 1.0, 0.0, 2.0, 0.0])
    # all-equal group [3, 3]: (3 - 3) / (0 + eps) = 0, no NaN; integer scores accepted
    close(group_advantages(torch.tensor([3, 3]), torch.tensor([0, 0])), [0.0, 0.0], atol=0)


def test_rloo_advantages_shuffled_groups():
    adv = rloo_advantages(t(SCORES), torch.tensor(LABELS))
    # group 5 = [1, 3]: 1 - 3 = -2, 3 - 1 = 2
    # group 2 = [2, 4, 6]: 2 - (4+6)/2 = -3, 4 - (2+6)/2 = 0, 6 - (2+4)/2 = 3
    # group 9 = [10]: single -> 0
    close(adv, [-2.0, -3.0, 2.0, 0.0, 3.0, 0.0])


def test_reinforce_pp_advantages_masked_inside_response():
    rewards = t([[0.0, 7.0, 0.0, 1.0], [0.0, 0.0, 2.0, 0.0]])
    mask = t([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    adv = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    # row 0 (t1 skipped, its reward ignored, no discount across it):
    #   G3 = 1, G2 = 0 + 0.5*1 = 0.5, G0 = 0 + 0.5*0.5 = 0.25
    # row 1: G2 = 2, G1 = 0.5*2 = 1, G0 = 0.5*1 = 0.5
    # valid returns [0.25, 0.5, 1, 0.5, 1, 2]: mean 5.25/6 = 0.875
    # deviations [-0.625, -0.375, 0.125, -0.375, 0.125, 1.125], squares sum 1.96875
    # unbiased var 1.96875/5 = 0.39375
    s = 1.0 / math.sqrt(0.39375 + 1e-8)
    expected = [[-0.625 * s, 0.0, -0.375 * s, 0.125 * s], [-0.375 * s, 0.125 * s, 1.125 * s, 0.0]]
    close(adv, expected)


def test_reinforce_pp_baseline_advantages():
    scores = t([1.0, 5.0, 3.0, 2.0])
    labels = torch.tensor([7, 4, 7, 7])
    mask = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    adv = reinforce_pp_baseline_advantages(scores, labels, mask)
    # group 7 = [1, 3, 2]: mean 2 -> centred [-1, ., 1, 0]; group 4 = [5] alone -> 0
    # broadcast on valid tokens: [-1, -1], [0], [1, 1], [] -> mean 0, unbiased var 4/4 = 1
    s = 1.0 / math.sqrt(1.0 + 1e-8)
    close(adv, [[-s, -s, 0.0], [0.0, 0.0, 0.0], [s, 0.0, s], [0.0, 0.0, 0.0]])


def test_compute_token_rewards_last_token_and_kl():
    scores = t([2.0, -1.0, 5.0])
    mask = t([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # score on the last masked token: row 0 -> t1, row 1 -> t2, row 2 (empty) -> nowhere
    close(
        compute_token_rewards(scores, mask),
        [[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0] * 4],
    )
    kl = t([[0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # minus 0.5 * kl on masked tokens only:
    # row 0: [-0.05, 2 - 0.1, 0, 0]; row 1: [-0.5, 0, -1 - 0.5, 0]; row 2: nothing
    close(
        compute_token_rewards(scores, mask, kl=kl, kl_coef=0.5),
        [[-0.05, 1.9, 0.0, 0.0], [-0.5, 0.0, -1.5, 0.0], [0.0] * 4],
    )


def test_overlong_penalty():
    lengths = torch.tensor([50, 80, 90, 100, 130])
    # max 100, buffer 20 -> penalty starts after 80:
    # 50, 80 -> 0; 90 -> -0.5 * (90-80)/20 = -0.25; 100 -> -0.5; 130 (beyond max) -> -0.5
    out = overlong_penalty(lengths, max_len=100, buffer_len=20, penalty_factor=0.5)
    close(out, [0.0, 0.0, -0.25, -0.5, -0.5])
    # buffer 0: a hard cut at max_len (100 is fine, 130 is punished fully)
    hard = overlong_penalty(lengths, max_len=100, buffer_len=0)
    close(hard, [0.0, 0.0, 0.0, 0.0, -1.0])
    with pytest.raises(ValueError):
        overlong_penalty(lengths, max_len=100, buffer_len=-1)


# ---------------------------------------------------------------------------- losses


def test_policy_loss_values_metrics_and_grads():
    lr = [0.0, math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5), 50.0]
    old = torch.zeros(1, 6, dtype=D)
    logp = t([lr], requires_grad=True)
    adv = t([[1.0, 1.0, 1.0, -2.0, -2.0, 1.0]])
    mask = t([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, m = policy_loss(logp, old, adv, mask)
    # per token (clip 0.2): pg_loss1 = -A*ratio, pg_loss2 = -A*clamp(ratio, 0.8, 1.2)
    #   t0 ratio 1,   A  1: -1 vs -1        -> -1     (not clipped)
    #   t1 ratio 1.5, A  1: -1.5 vs -1.2    -> -1.2   (clipped)
    #   t2 ratio 0.5, A  1: -0.5 vs -0.8    -> -0.5   (not clipped)
    #   t3 ratio 1.5, A -2:  3 vs 2.4       ->  3     (not clipped)
    #   t4 ratio 0.5, A -2:  1 vs 1.6       ->  1.6   (clipped)
    #   t5 masked (log-ratio 50) -> ignored
    # token-mean = (-1 - 1.2 - 0.5 + 3 + 1.6) / 5 = 0.38
    close(loss, 0.38)
    # clipfrac = 2/5; ratio_mean = (1 + 1.5 + 0.5 + 1.5 + 0.5)/5 = 1
    assert m["clipfrac"] == pytest.approx(0.4)
    assert m["ratio_mean"] == pytest.approx(1.0)
    # approx_kl = mean(0.5 * log_ratio^2) = 0.5 * 2*(ln1.5^2 + ln0.5^2) / 5
    assert m["approx_kl"] == pytest.approx((math.log(1.5) ** 2 + math.log(0.5) ** 2) / 5)
    assert "dual_clipfrac" not in m
    assert all(isinstance(v, float) for v in m.values())
    loss.backward()
    # unclipped tokens: d/dlogp (-A * exp(logp - old)) / 5 = -A*ratio/5; clipped ones: 0
    # t0: -1/5, t2: -0.5/5, t3: 2*1.5/5 = 0.6; t1, t4 clipped, t5 masked
    close(logp.grad, [[-0.2, 0.0, -0.1, 0.6, 0.0, 0.0]])


def test_policy_loss_asymmetric_clip():
    logp = t([[math.log(1.5), math.log(0.5)]])
    # clip_high 0.28: ratio 1.5, A 1 -> max(-1.5, -1.28) = -1.28
    # clip_low 0.2:   ratio 0.5, A -1 -> max(0.5, 0.8) = 0.8
    # token-sum = -0.48
    loss, m = policy_loss(
        logp, torch.zeros(1, 2, dtype=D), t([[1.0, -1.0]]), torch.ones(1, 2, dtype=D),
        clip_low=0.2, clip_high=0.28, agg="token-sum",
    )  # fmt: skip
    close(loss, -0.48)
    assert m["clipfrac"] == pytest.approx(1.0)


def test_policy_loss_extreme_log_ratios_hit_every_clamp():
    old = torch.zeros(1, 4, dtype=D)
    adv = t([[1.0, -1.0, -1.0, 1.0]])
    mask = torch.ones(1, 4, dtype=D)
    e20 = math.exp(20.0)
    # log-ratios +-50 are clamped to +-20 -> ratio e^20 or e^-20
    #   t0 +50, A  1: max(-e^20, -1.2) = -1.2      (PPO clip)
    #   t1 -50, A -1: max(e^-20, 0.8)  =  0.8      (PPO clip)
    #   t2 +50, A -1: max(e^20, 1.2)   =  e^20     (unbounded without dual clip)
    #   t3 -50, A  1: max(-e^-20, -0.8) = -e^-20
    logp = t([[50.0, -50.0, 50.0, -50.0]], requires_grad=True)
    loss, m = policy_loss(logp, old, adv, mask)
    close(loss, (-1.2 + 0.8 + e20 - math.exp(-20.0)) / 4, atol=1e-6)
    # clipfrac 2/4; approx_kl = 0.5 * 20^2 = 200; ratio_mean = (2 e^20 + 2 e^-20)/4
    assert m["clipfrac"] == pytest.approx(0.5)
    assert m["approx_kl"] == pytest.approx(200.0)
    assert m["ratio_mean"] == pytest.approx((e20 + math.exp(-20.0)) / 2)
    loss.backward()
    # every token is either PPO-clipped or outside the +-20 log-ratio clamp -> zero grads
    close(logp.grad, torch.zeros(1, 4, dtype=D))

    # dual clip c = 3 bounds t2 (A < 0): min(e^20, -A*3) = 3; t1: min(0.8, 3) = 0.8
    # -> (-1.2 + 0.8 + 3 - e^-20) / 4; dual_clipfrac = 1/4
    loss, m = policy_loss(logp.detach(), old, adv, mask, dual_clip=3.0)
    close(loss, (2.6 - math.exp(-20.0)) / 4)
    assert m["dual_clipfrac"] == pytest.approx(0.25)


def test_policy_loss_dual_clip_grads_and_validation():
    logp = t([[math.log(5.0), math.log(2.0), math.log(5.0)]], requires_grad=True)
    adv = t([[-1.0, -1.0, 1.0]])
    old = torch.zeros(1, 3, dtype=D)
    mask = torch.ones(1, 3, dtype=D)
    loss, m = policy_loss(logp, old, adv, mask, dual_clip=3.0)
    # t0 ratio 5, A -1: max(5, 1.2) = 5 -> dual: min(5, 3) = 3 (constant)
    # t1 ratio 2, A -1: max(2, 1.2) = 2 -> min(2, 3) = 2
    # t2 ratio 5, A  1: max(-5, -1.2) = -1.2 (dual clip only touches A < 0)
    # token-mean = (3 + 2 - 1.2) / 3
    close(loss, 3.8 / 3)
    # dual bound taken on t0 only; PPO clip taken on t2 only
    assert m["dual_clipfrac"] == pytest.approx(1 / 3)
    assert m["clipfrac"] == pytest.approx(1 / 3)
    loss.backward()
    # t1 unclipped: d/dlogp(-A*ratio)/3 = 2/3; t0 (dual constant) and t2 (clipped) -> 0
    close(logp.grad, [[0.0, 2 / 3, 0.0]])
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip"):
            policy_loss(logp, old, adv, mask, dual_clip=bad)


def test_policy_loss_sequence_advantages_broadcast_and_agg():
    logp = torch.zeros(2, 2, dtype=D)
    adv = t([1.0, -2.0])
    mask = t([[1.0, 1.0], [1.0, 0.0]])
    # ratio 1 everywhere -> loss_mat = -A broadcast over T = [[-1, -1], [2, 2]]
    # token-mean: (-1 - 1 + 2)/3 = 0; seq-mean-token-sum: (-2 + 2)/2 = 0
    # seq-mean-token-mean: (-1 + 2)/2 = 0.5
    close(policy_loss(logp, logp, adv, mask)[0], 0.0)
    close(policy_loss(logp, logp, adv, mask, agg="seq-mean-token-sum")[0], 0.0)
    close(policy_loss(logp, logp, adv, mask, agg="seq-mean-token-mean")[0], 0.5)
    full = policy_loss(logp, logp, adv[:, None].expand(2, 2), mask, agg="seq-mean-token-mean")
    close(full[0], 0.5)


def test_dr_grpo_norm_is_a_constant_not_the_padded_width():
    logp = torch.zeros(2, 2, dtype=D)
    adv = t([1.0, 0.0])
    mask = t([[1.0, 1.0], [1.0, 0.0]])
    # ratio 1: loss_mat = -A = [[-1, -1], [0, .]], S = [-2, 0]; Dr. GRPO divides by a
    # constant L = 8 (the maximum response length): (-2/8 + 0/8) / 2 = -0.125
    agg = "seq-mean-token-sum-norm"
    close(policy_loss(logp, logp, adv, mask, agg=agg, norm_len=8)[0], -0.125)
    # the same rows padded to width 7: unchanged with norm_len, (-2/7 + 0) / 2 without it
    wide_logp, wide_mask = (
        torch.nn.functional.pad(logp, (0, 5)),
        torch.nn.functional.pad(mask, (0, 5)),
    )
    close(policy_loss(wide_logp, wide_logp, adv, wide_mask, agg=agg, norm_len=8)[0], -0.125)
    close(policy_loss(wide_logp, wide_logp, adv, wide_mask, agg=agg)[0], -1 / 7)
    # value_loss takes the same constant: 0.5 * mean_i (sum_t (v - R)^2) / 8, R = 0
    v = t([[1.0, 1.0], [2.0, 0.0]])
    close(
        value_loss(v, v, torch.zeros_like(v), mask, agg=agg, norm_len=8)[0],
        0.5 * (2 / 8 + 4 / 8) / 2,
    )


def test_per_sequence_estimators_give_constant_rows():
    scores, groups = t([1.0, 0.0, 2.0, 5.0]), torch.tensor([0, 0, 1, 1])
    mask = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    for name, est in ADVANTAGE_ESTIMATORS.items():
        if est.per_sequence:  # the driver ships these as one value per row
            adv = outcome_advantages(name, scores, groups, mask)
            rows = adv.gather(1, mask.argmax(1, keepdim=True))
            close(adv, rows * mask)


def test_value_loss_clipped_values_metrics_and_grads():
    values = t([[1.0, 2.0, 2.0, 100.0]], requires_grad=True)
    old = t([[1.0, 1.0, 1.0, 0.0]])
    returns = t([[1.5, 1.0, 3.0, 0.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    loss, m = value_loss(values, old, returns, mask, clip=0.2)
    # v_clipped = old + clamp(v - old, -0.2, 0.2) = [1.0, 1.2, 1.2, .]
    #   t0: (1 - 1.5)^2 = 0.25 both             -> 0.25
    #   t1: (2 - 1)^2 = 1 vs (1.2 - 1)^2 = 0.04 -> 1     (unclipped)
    #   t2: (2 - 3)^2 = 1 vs (1.2 - 3)^2 = 3.24 -> 3.24  (clipped)
    # 0.5 * (0.25 + 1 + 3.24) / 3 = 0.748333...
    close(loss, 0.5 * 4.49 / 3)
    # vf_clipfrac = 1/3; values_mean = (1 + 2 + 2) / 3
    assert m["vf_clipfrac"] == pytest.approx(1 / 3)
    assert m["values_mean"] == pytest.approx(5 / 3)
    loss.backward()
    # d/dv 0.5 * (v - R)^2 / 3 = (v - R)/3: t0 -0.5/3, t1 1/3; t2 clipped (constant) -> 0
    close(values.grad, [[-1 / 6, 1 / 3, 0.0, 0.0]])


def test_value_loss_without_clip():
    values = t([[1.0, 2.0, 2.0, 100.0]], requires_grad=True)
    returns = t([[1.5, 1.0, 3.0, 0.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    loss, m = value_loss(values, values.detach(), returns, mask)
    # 0.5 * (0.25 + 1 + 1) / 3 = 0.375
    close(loss, 0.375)
    assert m["vf_clipfrac"] == 0.0
    loss.backward()
    # (v - R)/3 = [-0.5/3, 1/3, -1/3]; masked -> 0
    close(values.grad, [[-1 / 6, 1 / 3, -1 / 3, 0.0]])


# ---------------------------------------------------------------------------- registry


def test_registry_entries_and_flags():
    assert set(ADVANTAGE_ESTIMATORS) == {
        "ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline",
    }  # fmt: skip
    for name, est in ADVANTAGE_ESTIMATORS.items():
        assert est.name == name
        assert isinstance(est.description, str) and est.description
    assert ADVANTAGE_ESTIMATORS["ppo"].needs_critic
    assert not any(e.needs_critic for n, e in ADVANTAGE_ESTIMATORS.items() if n != "ppo")
    groups = {n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_groups}
    assert groups == {"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        ADVANTAGE_ESTIMATORS["grpo"].needs_critic = True
    assert check_algorithm_name("rloo") is ADVANTAGE_ESTIMATORS["rloo"]


def test_outcome_advantages_group_estimators():
    scores = t([1.0, 3.0, 0.0])
    ids = torch.tensor([0, 0, 1])
    mask = t([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # grpo: group 0 = [1, 3] -> -+1/(sqrt(2) + 1e-6); group 1 single -> 0; times mask
    a = 1.0 / (math.sqrt(2.0) + 1e-6)
    close(outcome_advantages("grpo", scores, ids, mask), [[-a, 0, -a], [a, a, 0], [0, 0, 0]])
    # dr_grpo: r - mean = -+1
    close(outcome_advantages("dr_grpo", scores, ids, mask), [[-1, 0, -1], [1, 1, 0], [0, 0, 0]])
    # rloo: 1 - 3 = -2, 3 - 1 = 2
    close(outcome_advantages("rloo", scores, ids, mask), [[-2, 0, -2], [2, 2, 0], [0, 0, 0]])
    close(
        outcome_advantages("reinforce_pp_baseline", scores, ids, mask),
        reinforce_pp_baseline_advantages(scores, ids, mask),
    )


def test_outcome_advantages_reinforce_pp_with_kl_in_reward():
    scores = t([1.0, 3.0])
    mask = t([[1.0, 1.0], [1.0, 0.0]])
    kl = t([[0.2, 0.2], [0.4, 0.4]])
    out = outcome_advantages("reinforce_pp", scores, None, mask, gamma=1.0, kl=kl, kl_coef=0.5)
    # token rewards: row 0 [-0.1, 1 - 0.1], row 1 [3 - 0.2, .]
    # returns-to-go (gamma 1): row 0 [0.8, 0.9], row 1 [2.8, 0]
    # valid [0.8, 0.9, 2.8]: mean 1.5, deviations [-0.7, -0.6, 1.3], squares sum 2.54
    # unbiased var 2.54 / 2 = 1.27
    s = 1.0 / math.sqrt(1.27 + 1e-8)
    close(out, [[-0.7 * s, -0.6 * s], [1.3 * s, 0.0]])


def test_outcome_advantages_errors():
    scores, mask = t([1.0]), t([[1.0]])
    with pytest.raises(ValueError, match="GAE needs"):
        outcome_advantages("ppo", scores, torch.tensor([0]), mask)
    with pytest.raises(ValueError, match="use one of ppo, grpo, dr_grpo, rloo, reinforce_pp"):
        outcome_advantages("a2c", scores, torch.tensor([0]), mask)
    with pytest.raises(ValueError, match="use one of"):
        check_algorithm_name("GRPO")
    with pytest.raises(ValueError, match="group_ids"):
        outcome_advantages("grpo", scores, None, mask)
