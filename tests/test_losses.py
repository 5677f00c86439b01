"""Tests of ppo.py and grpo.py against numbers worked out by hand (arithmetic in the comments).

Padding positions hold deliberately absurd values (99, -100, ...) so that any leak through the mask shows.
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
import passes  # noqa: E402
import ppo  # noqa: E402

LN2 = math.log(2.0)  # 0.693147...


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def close(a, b, atol=1e-5):
    a = a if isinstance(a, torch.Tensor) else torch.tensor(a)
    b = b if isinstance(b, torch.Tensor) else torch.tensor(b)
    return torch.allclose(a.float(), b.float(), atol=atol, rtol=0)


# Shared padded 2x3 example: row 0 has 3 tokens, row 1 has 1 token.
LOSS = t([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]])
MASK = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------------------------
# GRPO advantages
# ---------------------------------------------------------------------------------------------------------
def test_group_advantages_unbiased_std_and_flat_group():
    scores = t([1.0, 0.0, 0.1, 0.1, 0.1, 0.1, 1.0, 1.0, 0.0])
    adv, n_flat = grpo.group_advantages(scores, group_size=3)
    # group 1 [1, 0, 0.1]: mean 1.1/3 = 0.366667; deviations 0.633333, -0.366667, -0.266667;
    #   squares 0.401111 + 0.134444 + 0.071111 = 0.606667; UNBIASED var 0.606667/2 = 0.303333, std 0.550757
    #   (the biased std would be 0.449691 and give 1.408 for the first entry)
    #   A = 0.633333/0.550758 = 1.149930, -0.366667/0.550758 = -0.665749, -0.266667/0.550758 = -0.484181
    # group 2 [0.1, 0.1, 0.1]: flat -> exactly 0, counted
    # group 3 [1, 1, 0]: mean 2/3; deviations 1/3, 1/3, -2/3; var (1/9+1/9+4/9)/2 = 1/3, std 0.577350
    #   A = 0.333333/0.577351 = 0.577349, 0.577349, -1.154699
    expected = [1.149930, -0.665749, -0.484181, 0.0, 0.0, 0.0, 0.577349, 0.577349, -1.154699]
    assert close(adv, t(expected))
    assert n_flat == 1
    assert (adv[3:6] == 0.0).all()  # exactly zero, not ~1e-8/eps noise


def test_group_advantages_without_std_dr_grpo():
    scores = t([1.0, 0.0, 0.1, 0.1, 0.1, 0.1, 1.0, 1.0, 0.0])
    adv, n_flat = grpo.group_advantages(scores, group_size=3, scale_std=False)
    # only the group mean is subtracted: 1 - 0.366667, 0 - 0.366667, 0.1 - 0.366667; 0,0,0; 1 - 2/3, ...
    expected = [0.633333, -0.366667, -0.266667, 0.0, 0.0, 0.0, 0.333333, 0.333333, -0.666667]
    assert close(adv, t(expected))
    assert n_flat == 1


def test_group_advantages_all_flat_and_errors():
    adv, n_flat = grpo.group_advantages(t([0.0, 0.0, 1.0, 1.0]), group_size=2)
    assert n_flat == 2 and (adv == 0).all()
    with pytest.raises(ValueError, match="divisible"):
        grpo.group_advantages(t([1.0] * 8), group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        grpo.group_advantages(t([1.0, 0.0]), group_size=1)


# ---------------------------------------------------------------------------------------------------------
# Aggregation and micro-batch accumulation
# ---------------------------------------------------------------------------------------------------------
def test_aggregate_modes_by_hand():
    # valid tokens: row 0 -> 1, 2, 3; row 1 -> 4 (50 and 60 are padding)
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5
    assert close(ppo.aggregate(LOSS, MASK, "token-mean"), 2.5)
    # seq-mean: row means 6/3 = 2 and 4/1 = 4 -> (2 + 4) / 2 = 3.0
    assert close(ppo.aggregate(LOSS, MASK, "seq-mean"), 3.0)
    # token-sum with max_len 4: 10 / (B * max_len) = 10 / (2 * 4) = 1.25 (the tensor's T=3 is not used)
    assert close(ppo.aggregate(LOSS, MASK, "token-sum", max_len=4), 1.25)
    assert ppo.LOSS_AGG_MODES == ("token-mean", "seq-mean", "token-sum")
    with pytest.raises(ValueError, match="token-mean"):
        ppo.aggregate(LOSS, MASK, "seq-mean-token-sum")
    with pytest.raises(ValueError, match="max_len"):
        ppo.aggregate(LOSS, MASK, "token-sum")


def test_aggregate_micro_batches_sum_to_full_batch_by_hand():
    rows = [(LOSS[:1], MASK[:1]), (LOSS[1:], MASK[1:])]
    # token-mean, denom = 4 valid tokens in the mini-batch: 6/4 + 4/4 = 2.5
    # seq-mean,   denom = 2 sequences: 2/2 + 4/2 = 3.0
    # token-sum,  denom = 2 * 4 = 8: 6/8 + 4/8 = 1.25
    for mode, denom, full in [("token-mean", 4.0, 2.5), ("seq-mean", 2, 3.0), ("token-sum", 8, 1.25)]:
        parts = [ppo.aggregate(lo, m, mode, denom=denom) for lo, m in rows]
        assert close(parts[0] + parts[1], full), mode


@pytest.mark.parametrize("mode", ppo.LOSS_AGG_MODES)
def test_policy_loss_gradient_accumulation_equals_full_batch(mode):
    # Invariance check (not a reference value): 4 micro-batches of 2 rows, backward on each, vs one batch.
    g = torch.Generator().manual_seed(0)
    B, T, max_len = 8, 6, 7
    lengths = torch.tensor([1, 6, 3, 2, 6, 4, 5, 2])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    old = -torch.rand(B, T, generator=g) * 3
    logp0 = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)

    full = logp0.clone().requires_grad_()
    loss_full, _ = ppo.policy_loss(full, old, adv, mask, 0.2, 0.28, mode, max_len)
    loss_full.backward()

    denom = {"token-mean": mask.sum(), "seq-mean": B, "token-sum": B * max_len}[mode]
    micro = logp0.clone().requires_grad_()
    total = 0.0
    for i in range(0, B, 2):
        s = slice(i, i + 2)
        part, _ = ppo.policy_loss(micro[s], old[s], adv[s], mask[s], 0.2, 0.28, mode, max_len, denom=denom)
        part.backward()
        total += part.item()
    assert abs(total - loss_full.item()) < 1e-6
    assert torch.allclose(micro.grad, full.grad, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Clipped policy loss
# ---------------------------------------------------------------------------------------------------------
def test_policy_loss_clipping_by_hand():
    # Five tokens (row 0: a b c, row 1: d e, then a padding token with an absurd log-ratio of +100).
    # clip_low = 0.2, clip_high = 0.28 -> ratio clipped to [0.8, 1.28].
    #   a: ratio 1.5, A=+1: max(-1.5, -1.28) = -1.28  clipped branch (no gradient)
    #   b: ratio 1.5, A=-1: max( 1.5,  1.28) =  1.5   unclipped (the pessimistic side keeps the gradient)
    #   c: ratio 0.5, A=+1: max(-0.5, -0.8)  = -0.5   unclipped
    #   d: ratio 0.5, A=-1: max( 0.5,  0.8)  =  0.8   clipped branch (no gradient)
    #   e: ratio 1.1, A=+2: inside the range        = -2.2
    # token-mean: (-1.28 + 1.5 - 0.5 + 0.8 - 2.2) / 5 = -1.68 / 5 = -0.336; clip_frac 2/5 = 0.4
    ratios = [[1.5, 1.5, 0.5], [0.5, 1.1, 1.0]]
    old = t([[-1.0, -2.0, -0.5], [-3.0, -1.5, -100.0]])
    logp = (old + torch.log(t(ratios))).detach()
    logp[1, 2] = 0.0  # padding: log-ratio +100, exp() would overflow without the clamp
    logp.requires_grad_()
    adv = t([[1.0, -1.0, 1.0], [-1.0, 2.0, 5.0]])
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, stats = ppo.policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert close(loss, -0.336)
    assert close(stats["clip_frac"], 0.4)
    assert close(stats["ratio_max"], 1.5)  # the padding's huge ratio is ignored
    # approx_kl = mean(old - logp) = -(ln1.5 + ln1.5 + ln0.5 + ln0.5 + ln1.1) / 5
    #           = -(0.405465 * 2 - 0.693147 * 2 + 0.095310) / 5 = 0.480054 / 5 = 0.096011
    assert close(stats["approx_kl"], 0.096011)
    loss.backward()
    # d loss / d logp = -A * ratio / 5 on unclipped tokens: b: 1.5/5 = 0.3; c: -0.5/5 = -0.1; e: -2.2/5 = -0.44
    assert close(logp.grad, t([[0.0, 0.3, -0.1], [0.0, -0.44, 0.0]]))
    assert torch.isfinite(logp.grad).all()


def test_policy_loss_symmetric_default_clip():
    # ratio 1.25 with A=+1: default clip 0.2 caps it at 1.2 -> loss -1.2, clipped; ratio 0.75, A=-1 -> 0.8
    logp = torch.log(t([[1.25, 0.75]]))
    loss, stats = ppo.policy_loss(logp, torch.zeros(1, 2), t([[1.0, -1.0]]), torch.ones(1, 2))
    assert close(loss, (-1.2 + 0.8) / 2)
    assert close(stats["clip_frac"], 1.0)


# ---------------------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------------------
def test_kl_estimators_by_hand():
    # token 1: pi = 0.5, ref = 0.25; token 2: pi = 0.25, ref = 0.5
    logp = torch.log(t([[0.5, 0.25]]))
    ref = torch.log(t([[0.25, 0.5]]))
    # k1 = logp - ref = ln2, -ln2 (negative for one sample: only its expectation is a KL)
    assert close(ppo.kl_penalty(logp, ref, "k1"), t([[LN2, -LN2]]))
    # k2 = 0.5 * (+-ln2)^2 = 0.5 * 0.480453 = 0.240227 for both
    assert close(ppo.kl_penalty(logp, ref, "k2"), t([[0.240227, 0.240227]]))
    # k3 = ref/pi - ln(ref/pi) - 1: 0.5 - ln0.5 - 1 = 0.193147;  2 - ln2 - 1 = 0.306853
    assert close(ppo.kl_penalty(logp, ref, "k3"), t([[0.193147, 0.306853]]))
    assert ppo.kl_penalty(logp, logp, "k3").abs().max() == 0  # zero when the policies agree
    assert ppo.KL_ESTIMATORS == ("k1", "k2", "k3")
    with pytest.raises(ValueError, match="k3"):
        ppo.kl_penalty(logp, ref, "low_var_kl")


def test_k3_is_clamped_as_verl_at_wide_log_ratios():
    # d = logp - ref = -8: k3 = e^8 - 8 - 1 = 2971.96 unclamped; veRL and TinyZero clamp it to 10, where its gradient
    # is 0. d = +8: e^-8 + 8 - 1 = 7.000335 (inside the clamp), gradient d/dlogp = 1 - e^-8 = 0.999665.
    # d = +12: e^-12 + 11 = 11.000006 -> 10, gradient 0. d = 0.5: e^-0.5 - 0.5 = 0.106531, gradient
    # 1 - e^-0.5 = 0.393469
    logp = t([[-8.0, 8.0, 12.0, 0.5]]).requires_grad_()
    k3 = ppo.kl_penalty(logp, torch.zeros(1, 4), "k3")
    assert close(k3, [[10.0, 7.000335, 10.0, 0.106531]])
    k3.sum().backward()
    assert close(logp.grad, [[0.0, 0.999665, 0.0, 0.393469]])
    assert ppo.MAX_K3 == 10.0


def test_kl_estimators_expectation_under_pi():
    # pi = [0.5, 0.25, 0.25], ref = [0.25, 0.5, 0.25]; true KL(pi||ref) = 0.5 ln2 + 0.25 ln0.5 + 0 = 0.25 ln2
    # = 0.173287. k1 and k3 are unbiased: E_pi = 0.173287. k2 is biased: 0.5 * (0.5 + 0.25) * ln2^2 = 0.180170
    pi = t([0.5, 0.25, 0.25])
    logp, ref = torch.log(pi)[None], torch.log(t([0.25, 0.5, 0.25]))[None]
    for est, want in [("k1", 0.173287), ("k2", 0.180170), ("k3", 0.173287)]:
        assert close((pi * ppo.kl_penalty(logp, ref, est)[0]).sum(), want), est


def _true_kl(logits, ref_logits):
    lp, lq = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    return (lp.exp() * (lp - lq)).sum().item()


REF_LOGITS = t([0.5, 1.0, -0.5, 0.0])
INIT_LOGITS = t([2.0, -1.0, 0.5, 0.0])


def _sgd_toward_ref(loss_fn, steps=25, lr=1.0, n=4096):
    """SGD on one position's logits; each step samples n tokens from the current policy (on-policy)."""
    g = torch.Generator().manual_seed(0)
    logits = INIT_LOGITS.clone().requires_grad_()
    opt = torch.optim.SGD([logits], lr=lr)
    ref_logp_all = torch.log_softmax(REF_LOGITS, -1)
    for _ in range(steps):
        tokens = torch.multinomial(torch.softmax(logits.detach(), -1), n, replacement=True, generator=g)
        logp = torch.log_softmax(logits, -1)[tokens][:, None]  # [n, 1]: n one-token responses
        loss = loss_fn(logp, ref_logp_all[tokens][:, None], torch.ones(n, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _true_kl(logits.detach(), REF_LOGITS)


@pytest.mark.parametrize("est", ["k2", "k3"])
def test_kl_loss_pulls_policy_toward_reference(est):
    # Only the KL term: zero advantages, kl_coef 1. KL(pi||ref) starts at 0.598 and must fall tenfold.
    kl0 = _true_kl(INIT_LOGITS, REF_LOGITS)

    def loss_fn(logp, ref_logp, mask):
        zeros = torch.zeros(logp.shape[0])
        return grpo.grpo_loss(logp, logp.detach(), ref_logp, zeros, mask, 0.2, 0.2, kl_coef=1.0, kl_estimator=est)[0]

    kl_end = _sgd_toward_ref(loss_fn)
    assert kl0 > 0.5 and kl_end < 0.1 * kl0, (kl0, kl_end)
    # with the sign flipped (TinyZero's veRL bug) the same steps push the policy away
    kl_bug = _sgd_toward_ref(lambda lp, rl, m: -loss_fn(lp, rl, m), steps=5)
    assert kl_bug > kl0


def test_k1_as_loss_has_zero_expected_gradient_but_works_as_reward():
    # As a loss, d/dtheta E_pi[k1] taken pathwise = E_pi[grad log pi] = sum_a grad pi(a) = 0: k1 must go in the
    # reward. Exact expectation over the 4 tokens, pi held fixed as weights:
    logits = INIT_LOGITS.clone().requires_grad_()
    logp = torch.log_softmax(logits, -1)
    ref = torch.log_softmax(REF_LOGITS, -1)
    (logp.exp().detach() * ppo.kl_penalty(logp, ref, "k1")).sum().backward()
    assert logits.grad.abs().max() < 1e-6
    # ... and on samples it only adds noise: 25 SGD steps leave KL(pi||ref) where it was (0.598 -> ~0.605)
    kl0 = _true_kl(INIT_LOGITS, REF_LOGITS)
    zeros = torch.zeros(4096)
    kl_end = _sgd_toward_ref(lambda lp, rl, m: grpo.grpo_loss(lp, lp.detach(), rl, zeros, m, 0.2, 0.2, 1.0, "k1")[0])
    assert kl_end > 0.9 * kl0

    # As a reward (PPO): r = -kl_coef * k1 on each token, critic values 0, GAE -> A = r, policy gradient:
    # E_pi[-r grad log pi] = E_pi[(log pi - log ref) grad log pi] = grad KL(pi||ref).

    def loss_fn(logp, ref_logp, mask):
        kl = ppo.kl_penalty(logp.detach(), ref_logp, "k1")
        rewards = ppo.token_rewards(torch.zeros(logp.shape[0]), mask, kl, kl_coef=1.0)
        adv, _ = ppo.gae(rewards, torch.zeros_like(rewards), mask)
        return ppo.policy_loss(logp, logp.detach(), adv, mask)[0]

    kl_end = _sgd_toward_ref(loss_fn)
    assert kl_end < 0.1 * kl0, (kl0, kl_end)


# ---------------------------------------------------------------------------------------------------------
# GRPO loss
# ---------------------------------------------------------------------------------------------------------
def test_grpo_loss_adds_kl_by_hand():
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logp = t([[-1.0, -2.0, -0.5], [-0.7, -1.2, 0.0]])
    ref = logp - t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])  # k1 = logp - ref = these numbers
    adv = t([1.0, -0.5])  # per sequence
    loss, stats = grpo.grpo_loss(logp, logp, ref, adv, mask, 0.2, 0.2, kl_coef=0.1, kl_estimator="k1")
    # ratio 1 everywhere -> per-token loss -A: row 0: -1, -1, -1; row 1: 0.5, 0.5 -> (-3 + 1) / 5 = -0.4
    # KL (k1) mean over 5 valid tokens: (0.1 + 0.2 + 0.3 + 0.4 + 0.5) / 5 = 0.3 (the 9 is padding)
    # loss = -0.4 + 0.1 * 0.3 = -0.37  (ADDED)
    assert close(loss, -0.37)
    assert close(stats["kl"], 0.3)
    assert close(stats["pg_loss"], -0.4)
    assert set(stats) >= {"clip_frac", "approx_kl", "ratio_max", "pg_loss", "kl"}
    # no reference needed without KL
    loss0, stats0 = grpo.grpo_loss(logp, logp, None, adv, mask, 0.2, 0.2, kl_coef=0.0)
    assert close(loss0, -0.4) and "kl" not in stats0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.grpo_loss(logp, logp, None, adv, mask, 0.2, 0.2, kl_coef=0.1)


def test_grpo_loss_seq_mean_and_token_sum_by_hand():
    mask = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logp = torch.zeros(2, 3)
    ref = logp - t([[0.3, 0.3, 0.6], [0.9, 0.0, 0.0]])  # k1 values
    adv = t([2.0, -1.0])
    # seq-mean: pg rows -2 and +1 -> (-2 + 1)/2 = -0.5; kl rows 1.2/3 = 0.4 and 0.9 -> 0.65; -0.5 + 0.1*0.65
    loss, _ = grpo.grpo_loss(logp, logp, ref, adv, mask, 0.2, 0.2, 0.1, "k1", agg="seq-mean")
    assert close(loss, -0.435)
    # token-sum, max_len 5: pg (-6 + 1)/10 = -0.5; kl (1.2 + 0.9)/10 = 0.21 -> -0.5 + 0.021 = -0.479
    loss, _ = grpo.grpo_loss(logp, logp, ref, adv, mask, 0.2, 0.2, 0.1, "k1", agg="token-sum", max_len=5)
    assert close(loss, -0.479)


# ---------------------------------------------------------------------------------------------------------
# PPO pieces: rewards, GAE, whitening, value loss, KL controller, explained variance, entropy
# ---------------------------------------------------------------------------------------------------------
def test_token_rewards_by_hand():
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    r = ppo.token_rewards(t([1.0, 0.1]), mask, kl, kl_coef=0.5)
    # -0.5 * kl everywhere valid, score on the last valid token: row 0: -0.05, -0.1, -0.15 + 1 = 0.85
    # row 1: -0.2, -0.25 + 0.1 = -0.15, padding 0
    assert close(r, t([[-0.05, -0.1, 0.85], [-0.2, -0.15, 0.0]]))
    assert close(ppo.token_rewards(t([1.0, 0.1]), mask), t([[0, 0, 1.0], [0, 0.1, 0]]))


GAE_MASK = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
GAE_REWARDS = t([[0.0, 0.0, 1.0], [0.0, 0.5, 7.0]])  # 7.0 is padding garbage
GAE_VALUES = t([[0.5, 0.6, 0.7], [0.2, 0.4, 9.0]])  # 9.0 is padding garbage: must count as 0


def test_gae_gamma_lambda_one_by_hand():
    adv, ret = ppo.gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=1.0, lam=1.0)
    # gamma = lam = 1: A_t = (rewards from t on) - V_t.
    # row 0: returns 1, 1, 1 -> A = 1-0.5, 1-0.6, 1-0.7 = 0.5, 0.4, 0.3
    # row 1: returns 0.5, 0.5 -> A = 0.5-0.2, 0.5-0.4 = 0.3, 0.1; padding 0
    assert close(adv, t([[0.5, 0.4, 0.3], [0.3, 0.1, 0.0]]))
    assert close(ret, t([[1.0, 1.0, 1.0], [0.5, 0.5, 0.0]]))


def test_gae_discounted_by_hand():
    adv, ret = ppo.gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=0.9, lam=0.8)
    # gamma * lam = 0.72. delta_t = r_t + 0.9 * V_{t+1} - V_t, V after the last valid token = 0.
    # row 0: t=2: delta = 1 + 0 - 0.7 = 0.3                 A2 = 0.3
    #        t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03          A1 = 0.03 + 0.72*0.3   = 0.246
    #        t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04          A0 = 0.04 + 0.72*0.246 = 0.21712
    #        returns = A + V = 0.71712, 0.846, 1.0
    # row 1: t=2 padding: 0
    #        t=1: delta = 0.5 + 0.9*0 - 0.4 = 0.1 (not 0.9*9) A1 = 0.1
    #        t=0: delta = 0 + 0.9*0.4 - 0.2 = 0.16          A0 = 0.16 + 0.72*0.1 = 0.232
    #        returns = 0.432, 0.5, 0
    assert close(adv, t([[0.21712, 0.246, 0.3], [0.232, 0.1, 0.0]]))
    assert close(ret, t([[0.71712, 0.846, 1.0], [0.432, 0.5, 0.0]]))


def test_masked_whiten_and_mean_by_hand():
    x = t([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # valid 1, 2, 3, 4: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; unbiased var 5/3,
    # std 1.290994 -> -1.5/1.290994 = -1.161895, -0.5/1.290994 = -0.387298, ...; padding -> 0
    w = ppo.masked_whiten(x, mask)
    assert close(w, t([[-1.161895, -0.387298, 0.387298], [1.161895, 0.0, 0.0]]))
    assert close(ppo.masked_mean(x, mask), 2.5)
    assert close(ppo.masked_mean(x, mask, dim=-1), t([2.0, 4.0]))
    assert ppo.masked_mean(x, torch.zeros_like(mask)) == 0  # empty mask: 0, not nan
    assert (ppo.masked_whiten(x, torch.zeros_like(mask)) == 0).all()  # no valid token (all masked): 0, no crash


def test_vf_clip_frac_counts_no_rounding_noise():
    """Inside the clip, old + (v - old) is v up to rounding: those tokens are never counted as clipped."""
    g = torch.Generator().manual_seed(0)
    old, v = (0.4 * torch.rand(4096, generator=g) - 0.2 for _ in range(2))  # |v - old| < 0.4 < clip 0.5
    ret = torch.randn(4096, generator=g)
    assert ((old + (v - old) - ret) ** 2 > (v - ret) ** 2).any()  # the naive comparison would count some
    _, stats = ppo.value_loss(v[None], old[None], ret[None], torch.ones(1, 4096), clip=0.5)
    assert stats["vf_clip_frac"] == 0


def test_value_loss_clipping_by_hand():
    # clip 0.5; v_clipped = old + clamp(v - old, -0.5, 0.5)
    #   1: old 0, v  1.0, R  1: v_clip  0.5; (v-R)^2 = 0,    (vc-R)^2 = 0.25 -> 0.25 clipped branch
    #   2: old 0, v  0.2, R  1: v_clip  0.2; 0.64 and 0.64 (equal)           -> 0.64 not counted
    #   3: old 0, v -1.0, R  0: v_clip -0.5; 1.0 and 0.25                    -> 1.0  unclipped
    #   4: old 0, v -1.0, R -1: v_clip -0.5; 0 and 0.25                      -> 0.25 clipped branch
    # loss = 0.5 * (0.25 + 0.64 + 1.0 + 0.25) / 4 = 0.5 * 2.14 / 4 = 0.2675; vf_clip_frac = 2/4
    v = t([[1.0, 0.2], [-1.0, -1.0], [5.0, 5.0]]).requires_grad_()  # last row is padding
    old = t([[0.0, 0.0], [0.0, 0.0], [-5.0, -5.0]])
    ret = t([[1.0, 1.0], [0.0, -1.0], [0.0, 0.0]])
    mask = t([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    loss, stats = ppo.value_loss(v, old, ret, mask, clip=0.5)
    assert close(loss, 0.2675)
    assert close(stats["vf_clip_frac"], 0.5)
    loss.backward()
    # gradient 0.5 * 2 (v - R) / 4 on unclipped tokens: token 2: -0.8/4 = -0.2; token 3: -1/4 = -0.25
    assert close(v.grad, t([[0.0, -0.2], [-0.25, 0.0], [0.0, 0.0]]))


def test_update_kl_coef_by_hand():
    # target 6, horizon 10000, n_steps 256 -> step scale 256/10000 = 0.0256
    # kl 3:   err = 3/6 - 1 = -0.5 -> clipped to -0.2: 0.1 * (1 - 0.2*0.0256) = 0.1 * 0.99488 = 0.099488
    # kl 6.6: err = 0.1:               0.1 * (1 + 0.1*0.0256) = 0.1 * 1.00256 = 0.100256
    # kl 100: err = 15.67 -> 0.2:      0.1 * (1 + 0.2*0.0256) = 0.100512
    for kl, want in [(3.0, 0.099488), (6.6, 0.100256), (100.0, 0.100512), (6.0, 0.1)]:
        got = ppo.update_kl_coef(0.1, kl, target=6.0, horizon=10000, n_steps=256)
        assert isinstance(got, float) and abs(got - want) < 1e-9, (kl, got)


def test_explained_variance_by_hand():
    mask = t([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    ret = t([[1.0, 2.0], [3.0, 4.0], [50.0, -50.0]])
    val = t([[1.0, 2.0], [3.0, 3.0], [0.0, 0.0]])
    # R - V = 0, 0, 0, 1: mean 0.25, var (3*0.0625 + 0.5625)/4 = 0.1875; Var[R] = (2.25+0.25+0.25+2.25)/4 = 1.25
    # EV = 1 - 0.1875/1.25 = 0.85
    assert abs(ppo.explained_variance(val, ret, mask) - 0.85) < 1e-6
    assert ppo.explained_variance(val, ret, mask) == pytest.approx(0.85)
    assert ppo.explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert math.isnan(ppo.explained_variance(val, torch.ones(3, 2), mask))  # Var[R] = 0: undefined
    # seven equal returns of 0.3: their float32 mean is not exactly 0.3, so Var[R] is rounding noise (8.9e-16),
    # not 0, and 1 - Var[R - V] / noise would read -4.5e15 for values 0..6 (Var[V] = 4). Undefined too.
    ones = torch.ones(1, 7)
    assert math.isnan(ppo.explained_variance(torch.arange(7.0)[None], torch.full((1, 7), 0.3), ones))


def test_entropy_from_logits_by_hand():
    # probs 0.5, 0.25, 0.25 (logits ln2, 0, 0, any shift): H = 0.5 ln2 + 2 * 0.25 ln4 = 1.5 ln2 = 1.039721
    # uniform over 4: ln4 = 1.386294; a one-hot-like [1000, 0]: ~0 and finite
    logits = torch.zeros(1, 3, 4)
    logits[0, 0] = t([LN2, 0.0, 0.0, -1e9]) + 1000.0
    logits[0, 2] = t([1000.0, 0.0, 0.0, 0.0])
    h = passes.entropy_from_logits(logits)
    assert close(h, t([[1.039721, 1.386294, 0.0]]))
    assert torch.isfinite(h).all()


# ---------------------------------------------------------------------------------------------------------
# Critic
# ---------------------------------------------------------------------------------------------------------
def test_critic_from_tiny_qwen2(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=100, max_position_embeddings=128)
    policy = Qwen2ForCausalLM(cfg)
    policy.save_pretrained(tmp_path)
    critic = ppo.build_critic(str(tmp_path), torch.float32)

    # backbone identical to the policy's, plus a fresh scalar head
    pol_sd, cri_sd = policy.state_dict(), critic.state_dict()
    backbone = [k for k in pol_sd if k.startswith("model.")]
    assert backbone and all(torch.equal(pol_sd[k], cri_sd[k]) for k in backbone)
    assert critic.score.weight.shape == (1, 64)
    assert critic.dropout.p == 0.0

    P, T = 4, 5
    ids = torch.randint(1, 100, (2, P + T))
    attn = torch.ones(2, P + T, dtype=torch.long)

    def values(ids, attn, n_prompt):  # a batch as rollout.to_batch lays it out: prompt columns, then the response
        return passes.critic_values(critic, {"input_ids": ids, "attention_mask": attn,
                                          "response_ids": ids[:, n_prompt:]})
    critic.train()  # value-head dropout is off: train mode is deterministic
    v = values(ids, attn, P)
    assert v.shape == (2, T) and v.dtype == torch.float32
    assert torch.equal(v, values(ids, attn, P))
    critic.eval()
    with torch.no_grad():
        v = values(ids, attn, P)
        raw = critic(input_ids=ids, attention_mask=attn).logits[..., 0]
        assert torch.allclose(v, raw[:, P - 1 : P + T - 1], atol=1e-6)  # packed = the padded batch
        # alignment: value of response token t must not see token t. Changing response token 2 (absolute P+2)
        # leaves values[:, :3] (states before tokens 0, 1, 2) unchanged and changes values[:, 3:].
        ids2 = ids.clone()
        ids2[:, P + 2] = (ids2[:, P + 2] % 99) + 1
        v2 = values(ids2, attn, P)
        assert torch.allclose(v[:, :3], v2[:, :3], atol=1e-6)
        assert not torch.allclose(v[:, 3:], v2[:, 3:], atol=1e-6)
        # a left-padded prompt gets the same values as the unpadded one (pack drops the padding)
        pad_ids = torch.cat([torch.zeros(2, 2, dtype=torch.long), ids], 1)
        pad_attn = torch.cat([torch.zeros(2, 2, dtype=torch.long), attn], 1)
        assert torch.allclose(values(pad_ids, pad_attn, P + 2), v, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Packed passes: no padding, the LM head only where the loss reads
# ---------------------------------------------------------------------------------------------------------
def _packed_batch():
    """rollout.to_batch's layout for prompts [7 8] and [9] (left-padded to 2), responses [1 2] and [3]."""
    import rollout
    samples = [{"token_ids": [1, 2], "logprobs": [0.0, 0.0], "truncated": False},
               {"token_ids": [3], "logprobs": [0.0], "truncated": False}]
    return rollout.to_batch([[7, 8], [9]], samples, 1, 0, torch.device("cpu"))


def test_pack_by_hand():
    ids, positions, mask, index, rows, cols = passes.pack(_packed_batch())
    # row 0: 7 8 | 1 2 (4 tokens), row 1: [pad] 9 | 3 [pad] (2 tokens) -> 6 tokens end to end
    assert ids.tolist() == [[7, 8, 1, 2, 9, 3]]
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1]]  # restart per sequence: attention stays within it
    assert mask is None  # no shared prompt: transformers builds the block-diagonal mask from the positions
    # response token 1 sits at packed 2 and is predicted at 1; token 2 at 3 (from 2); token 3 at 5 (from 4)
    assert index.tolist() == [1, 2, 4] and rows.tolist() == [0, 0, 1] and cols.tolist() == [0, 1, 0]


def test_pack_shares_a_groups_prompt_by_hand():
    """Prompt [7 8] with responses [1 2] and [3] (one group), then prompt [9] with [4]: each prompt once."""
    import rollout
    samples = [{"token_ids": r, "logprobs": [0.0] * len(r), "truncated": False} for r in ([1, 2], [3], [4], [5])]
    batch = rollout.to_batch([[7, 8], [9]], samples, 2, 0, torch.device("cpu"))  # groups [0 0 1 1]
    ids, positions, mask, index, rows, cols = passes.pack({k: v[:3] for k, v in batch.items()})
    assert ids.tolist() == [[7, 8, 1, 2, 3, 9, 4]]
    assert positions.tolist() == [[0, 1, 2, 3, 2, 0, 1]]  # response [3] sits after the prompt, at 2
    # token 1 from the prompt's last position 1, token 2 from 2; token 3 ALSO from 1; token 4 from 5
    assert index.tolist() == [1, 2, 1, 5] and rows.tolist() == [0, 0, 1, 2] and cols.tolist() == [0, 1, 0, 0]
    see = [[1, 0, 0, 0, 0, 0, 0],   # 7
           [1, 1, 0, 0, 0, 0, 0],   # 8
           [1, 1, 1, 0, 0, 0, 0],   # 1: the prompt and itself
           [1, 1, 1, 1, 0, 0, 0],   # 2
           [1, 1, 0, 0, 1, 0, 0],   # 3: the prompt and itself, not the other response
           [0, 0, 0, 0, 0, 1, 0],   # 9: another group
           [0, 0, 0, 0, 0, 1, 1]]   # 4
    assert mask.shape == (1, 1, 7, 7) and mask[0, 0].long().tolist() == see


def _tiny_lm(vocab=50):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
                                        max_position_embeddings=128)).eval()


def test_grad_checkpointing_recomputes_in_train_mode():
    """passes.prepare puts a trainable model in train mode, where transformers' checkpointed layers recompute in
    backward: a packed pass keeps fewer tensors for backward, with the same gradients. In eval mode (what
    from_pretrained returns, where train.py used to leave the policy) --grad-checkpointing changed nothing."""
    batch = _packed_batch()

    def saved_bytes_and_grads(model):
        saved = [0]

        def keep(x):
            saved[0] += x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x):
            logp = passes.response_logprobs(model, batch, 1.0)
        logp.sum().backward()
        return saved[0], torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    plain, grads = saved_bytes_and_grads(passes.prepare(_tiny_lm(), trainable=True))
    recomputed, grads_recomputed = saved_bytes_and_grads(passes.prepare(_tiny_lm(), True, grad_checkpointing=True))
    eval_mode = _tiny_lm()
    eval_mode.gradient_checkpointing_enable()
    assert recomputed < 0.7 * plain and close(grads_recomputed, grads, atol=1e-6)
    assert saved_bytes_and_grads(eval_mode.eval())[0] == plain  # the old path: nothing recomputed
    frozen = passes.prepare(_tiny_lm(), trainable=False)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_packed_logprobs_equal_each_sequence_alone():
    """The specification of the packed pass: each sequence's log-probs and entropy are those of a forward over
    that sequence alone, unpadded (prompts and responses of different lengths, so both paddings occur)."""
    import rollout
    model, temp = _tiny_lm(), 0.7
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 50, (n,), generator=g).tolist() for n in (5, 2, 9)]
    samples = [{"token_ids": torch.randint(1, 50, (n,), generator=g).tolist(), "truncated": False,
                "logprobs": [0.0] * n} for n in (4, 7, 1, 3, 6, 2)]  # 2 per prompt
    batch = rollout.to_batch(prompts, samples, 2, 0, torch.device("cpu"))
    logp, ent = passes.response_logprobs(model, batch, temp, with_entropy=True)
    assert logp.shape == ent.shape == batch["mask"].shape
    for k, s in enumerate(samples):
        q, r = prompts[k // 2], s["token_ids"]
        with torch.no_grad():
            z = model(input_ids=torch.tensor([q + r])).logits[0, len(q) - 1:-1] / temp  # predicts r
        ref = torch.log_softmax(z, -1).gather(-1, torch.tensor(r)[:, None])[:, 0]
        assert close(logp[k, :len(r)], ref, atol=1e-5)
        assert close(ent[k, :len(r)], passes.entropy_from_logits(z), atol=1e-5)
        assert (logp[k, len(r):] == 0).all() and (ent[k, len(r):] == 0).all()  # padding: 0, not garbage


def test_a_shared_prompt_gives_the_same_gradients():
    """Computing a group's prompt once is exact: log-probs and parameter gradients equal those of the same
    sequences packed each with its own prompt copy (the batch without its group key)."""
    import rollout
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 50, (n,), generator=g).tolist() for n in (6, 3)]
    samples = [{"token_ids": torch.randint(1, 50, (n,), generator=g).tolist(), "truncated": False,
                "logprobs": [0.0] * n} for n in (4, 1, 5, 3, 2, 6)]  # 3 per prompt
    batch = rollout.to_batch(prompts, samples, 3, 0, torch.device("cpu"))
    alone = {k: v for k, v in batch.items() if k != "group"}
    assert passes.pack(batch)[0].shape[1] == 6 + 3 + 21 < passes.pack(alone)[0].shape[1] == 3 * 6 + 3 * 3 + 21
    grads = []
    for b in (batch, alone):
        model = _tiny_lm()
        logp = passes.response_logprobs(model, b, 0.9)
        (logp * torch.arange(1.0, 7.0)[:, None]).sum().backward()  # a different weight per sequence
        grads.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
    assert close(grads[0][0], grads[1][0], atol=1e-5)
    assert all(close(a, b, atol=1e-5) for a, b in zip(grads[0][1], grads[1][1]))


def test_lm_head_in_chunks_keeps_no_vocabulary_sized_tensor(monkeypatch):
    """Qwen's vocabulary (151,936 tokens), 600 positions, a head with a bias, temperature 0.7, in 3 chunks of rows:
    the log-probs, the entropy and every gradient equal the plain computation's (the [N, V] logits through autograd),
    and what is kept for backward is the hidden states and the head (0.36 GB of float32 logits in the plain path)."""
    V, H, N = 151_936, 16, 600
    monkeypatch.setattr(passes, "CHUNK_LOGITS", 250 * V)  # rows 0-249, 250-499, 500-599
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(N, H, generator=g), 0.5 * torch.randn(V, H, generator=g), torch.randn(V, generator=g)]
    tokens, weights = torch.randint(0, V, (N,), generator=g), torch.rand(N, 2, generator=g)  # d loss / d out

    def plain(hidden, weight, bias):
        z = torch.nn.functional.linear(hidden, weight, bias).float() / 0.7
        return torch.stack([z.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(z, -1),
                            passes.entropy_from_logits(z)], -1)

    results = []
    for fn in (plain, lambda h, w, b: passes._HeadLogprobs.apply(h, w, b, tokens, 0.7, True)):
        inputs, saved = [x.clone().requires_grad_() for x in leaves], [0]

        def keep(x):
            saved[0] += x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x):
            out = fn(*inputs)
        (out * weights).sum().backward()
        results.append((out.detach(), [x.grad for x in inputs], saved[0]))
    (out_plain, grads_plain, saved_plain), (out_chunked, grads_chunked, saved_chunked) = results
    assert close(out_chunked, out_plain, atol=1e-5)
    for a, b in zip(grads_chunked, grads_plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    head = (N * H + V * H + V) * 4 + N * 8  # hidden, weight, bias (float32), tokens (int64)
    assert saved_plain > N * V * 4 and saved_chunked == head


def test_entropy_has_a_gradient_only_when_asked():
    batch = _packed_batch()
    model = _tiny_lm()
    logp, ent = passes.response_logprobs(model, batch, 1.0, with_entropy=True)
    assert logp.requires_grad and not ent.requires_grad  # no [N, V] softmax kept for an unused bonus
    logp2, ent2 = passes.response_logprobs(model, batch, 1.0, with_entropy=True, entropy_grad=True)
    assert ent2.requires_grad and close(ent, ent2.detach(), atol=1e-6) and close(logp, logp2.detach(), atol=1e-6)


def test_micro_batches_by_token_budget():
    # real tokens per row: 3+2, 3+4, 1+1, 2+6 = 5, 7, 2, 8; budget 12: [5 7] = 12, then [2 8] = 10
    attn = t([[1, 1, 1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
              [0, 0, 1, 1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1, 1, 0]]).long()
    batch = {"attention_mask": attn, "row": torch.arange(4)}
    parts = [mb["row"].tolist() for mb in passes.micro_batches(batch, torch.arange(4), 12)]
    assert parts == [[0, 1], [2, 3]]
    assert [mb["row"].tolist() for mb in passes.micro_batches(batch, torch.tensor([3, 0, 2]), 9)] == [[3], [0, 2]]
    # a sequence longer than the budget goes alone; nothing is dropped or reordered
    assert [mb["row"].tolist() for mb in passes.micro_batches(batch, torch.arange(4), 6)] == [[0], [1], [2], [3]]


def test_micro_batches_count_a_shared_prompt_once():
    # prompt of 3 tokens, responses of 2, 1, 4 (one group), then a prompt of 1 with a response of 1
    attn = t([[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0],
              [0, 0, 1, 1, 0, 0, 0, 0]]).long()
    batch = {"attention_mask": attn, "response_ids": attn[:, 3:], "group": t([0, 0, 0, 1]).long(),
             "row": torch.arange(4)}
    # laid out: 3 + 2 = 5, + 1 = 6, + 4 = 10 (the prompt once), then 1 + 1 = 2: budget 10 -> [0 1 2] [3]
    assert [mb["row"].tolist() for mb in passes.micro_batches(batch, torch.arange(4), 10)] == [[0, 1, 2], [3]]
    # budget 9: row 2 starts a micro-batch and brings its prompt again: 3 + 4 = 7, + 2 = 9
    assert [mb["row"].tolist() for mb in passes.micro_batches(batch, torch.arange(4), 9)] == [[0, 1], [2, 3]]


def _equal_counts(rank, world, port, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # rank 0: 4 sequences of 3 tokens (one micro-batch of budget 12); rank 1: 4 of 10 (four micro-batches)
    attn = torch.ones(4, 3 if rank == 0 else 10, dtype=torch.long)
    batch = {"attention_mask": attn, "row": torch.arange(4), "mask": torch.ones(4, 2)}
    out[rank] = [mb["row"].tolist() for mb in passes.micro_batches(batch, torch.arange(4), 12)]
    # rank 0 now brings one row, or none: fillers (its row 0, nothing in the loss) make up the count
    for key, idx in (("one", torch.tensor([2])), ("none", torch.tensor([], dtype=torch.long))):
        mbs = list(passes.micro_batches(batch, idx if rank == 0 else torch.arange(4), 12))
        out[rank, key] = [(mb["row"].tolist(), mb["mask"].sum().item(), "filler" in mb) for mb in mbs]
    dist.destroy_process_group()


def test_micro_batches_are_as_many_on_every_rank():
    """Each FSDP2 forward is a collective: a rank whose rows fit in fewer micro-batches splits its largest, and
    with too few rows, runs fillers whose loss mask is 0."""
    import torch.multiprocessing as mp
    import cli
    out = mp.Manager().dict()
    mp.spawn(_equal_counts, args=(2, cli.free_port(), out), nprocs=2)
    assert out[1] == [[0], [1], [2], [3]]
    assert out[0] == [[0], [1], [2], [3]]  # [0 1 2 3] -> [0 1] [2 3] -> [0] [1] [2 3] -> [0] [1] [2] [3]
    assert out[0, "one"] == [([2], 2.0, False)] + [([0], 0.0, True)] * 3
    assert out[0, "none"] == [([0], 0.0, True)] * 4
    assert out[1, "one"] == out[1, "none"] == [([k], 2.0, False) for k in range(4)]


def test_tally_means_and_maxima_by_hand():
    # "x": weighted mean (2 * 0.25 + 4 * 0.75) / (0.25 + 0.75) = 3.5; "n": 6 values summing to 3 at once, then 2 of
    # value 1.5: (3 + 3) / 8 = 0.75; "ratio_max": the largest (a mean of the maxima would say 2.5)
    tally = passes.Tally()
    tally.add("x", 2.0, 0.25), tally.add("x", 4.0, 0.75), tally.add_sum("n", 3.0, 6), tally.add("n", 1.5, 2.0)
    tally.add("ratio_max", 1.0), tally.add("ratio_max", 4.0)
    assert tally.sums == {"x": 3.5, "n": 6.0} and tally.weights == {"x": 1.0, "n": 8.0}
    assert tally.maxima == {"ratio_max": 4.0}


def _tally_over_ranks(rank, world, port, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def allreduce(d, op=dist.ReduceOp.SUM):  # train.py's
        keys = sorted(d)
        x = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(x, op=op)
        return dict(zip(keys, x.tolist()))

    tally = passes.Tally()
    # rank 0: entropy 1.0 over weight 3, ratio_max 1.5 and 2.0; rank 1: entropy 3.0 over weight 1, ratio_max 7.0;
    # "none" has weight 0 on both ranks (no row trained): left out
    tally.add("entropy", 1.0 if rank == 0 else 3.0, 3.0 if rank == 0 else 1.0)
    for r in ([1.5, 2.0] if rank == 0 else [7.0]):
        tally.add("ratio_max", r)
    tally.add("none", 5.0, 0.0)
    out[rank] = tally.over_ranks(allreduce)
    dist.destroy_process_group()


def test_tally_over_ranks_takes_the_maximum_of_maxima():
    # entropy (1 * 3 + 3 * 1) / (3 + 1) = 1.5; ratio_max max(1.5, 2, 7) = 7 on every rank
    import torch.multiprocessing as mp
    import cli
    out = mp.Manager().dict()
    mp.spawn(_tally_over_ranks, args=(2, cli.free_port(), out), nprocs=2)
    assert out[0] == out[1] == {"entropy": 1.5, "ratio_max": 7.0}


def test_micro_batches_of_no_rows_are_one_filler():
    """Alone, no rows still make one pass (its gradient is zeros, so the optimizer steps as it would)."""
    batch = {"attention_mask": torch.ones(2, 3, dtype=torch.long), "mask": torch.ones(2, 1),
             "valid": torch.ones(2, 1), "row": torch.arange(2)}
    (mb,) = passes.micro_batches(batch, torch.tensor([], dtype=torch.long), 12)
    assert mb["filler"] and mb["row"].tolist() == [0] and mb["mask"].sum() == 0 and mb["valid"].sum() == 0


def test_a_group_of_equal_scores_adds_nothing_to_the_update():
    """Why train.py's update skips rows of advantage 0 (GRPO without KL or entropy terms): the loss over the other
    rows, with the whole batch's divisor, is the same number with the same gradient."""
    import rollout
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 50, (n,), generator=g).tolist() for n in (4, 6)]
    samples = [{"token_ids": torch.randint(1, 50, (n,), generator=g).tolist(), "truncated": False,
                "logprobs": [0.0] * n} for n in (3, 5, 2, 4)]
    batch = rollout.to_batch(prompts, samples, 2, 0, torch.device("cpu"))
    args = SimpleNamespace(algo="grpo", group_size=2, no_std_scale=False, clip_low=0.2, clip_high=0.2,
                           kl_estimator="k3", loss_agg="token-mean", max_response_len=5, tis_cap=0.0,
                           entropy_coef=0.0)
    grpo.advantages(batch, t([1.0, 0.0, 1.0, 1.0]), args, kl_coef=0.0)  # the second group is flat
    assert batch["advantages"][2:].abs().sum() == 0 and batch["advantages"][:2].abs().min() > 0
    denom = batch["mask"].sum()
    grads = []
    for rows in (torch.arange(4), torch.arange(2)):
        model = _tiny_lm()
        mb = {k: v[rows] for k, v in batch.items()}
        logp = passes.response_logprobs(model, mb, 1.0)
        mb["old_logp"] = logp.detach() + 0.1  # the ratio is not 1
        loss, _ = grpo.loss(logp, None, None, mb, args, kl_coef=0.0, denom=denom)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert abs(grads[0][0] - grads[1][0]) < 1e-7 and grads[0][0] != 0
    assert all(close(a, b, atol=1e-7) for a, b in zip(grads[0][1], grads[1][1]))


def test_policy_loss_truncated_importance_sampling_by_hand():
    """--tis-cap: each token's term times w = min(pi_old / pi_sampler, cap), a constant; padding cannot leak."""
    logp = t([[-1.0, -2.0, -100.0]]).requires_grad_()
    old = t([[-1.0, -2.0, 50.0]])  # ratio 1 on the valid tokens
    sampler = t([[-1.0 - LN2, -2.0 + LN2, -50.0]])  # old/sampler = 2 and 0.5; padding: e^100 before the clamp
    adv, mask = t([[1.0, -2.0, 3.0]]), t([[1.0, 1.0, 0.0]])
    loss, stats = ppo.policy_loss(logp, old, adv, mask, sampler_logp=sampler, tis_cap=1.5)
    # w = min(2, 1.5) = 1.5 and min(0.5, 1.5) = 0.5; per-token -A * ratio = -1 and 2; weighted -1.5 and 1.0;
    # token-mean over 2: -0.25 (without TIS: (-1 + 2)/2 = 0.5)
    assert close(loss, -0.25)
    assert close(stats["tis_weight_mean"], 1.0) and close(stats["tis_weight_max"], 1.5)
    loss.backward()
    # d/dlogp of -A * w * exp(logp - old) / 2 at ratio 1: -1 * 1.5 / 2 = -0.75, 2 * 0.5 / 2 = 0.5, padding 0
    assert close(logp.grad, t([[-0.75, 0.5, 0.0]]))
    plain, plain_stats = ppo.policy_loss(logp.detach(), old, adv, mask)
    assert close(plain, 0.5) and "tis_weight_mean" not in plain_stats
