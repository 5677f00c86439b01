"""Tests of RLOO, REINFORCE++ and dynamic sampling (grpo.py) and PRIME (prime.py) against numbers worked out by hand
(arithmetic in the comments), and of their flags' bad combinations (train.py, one error line before any model).

Padding positions hold deliberately absurd values (99, -100, ...) so that any leak through the mask shows.
"""
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import REPO, python  # noqa: E402
from test_train import TRAIN, assert_clean_failure, check_metrics, flags, read_metrics, train  # noqa: E402

sys.path.insert(0, REPO)
import grpo  # noqa: E402
import prime  # noqa: E402


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def close(a, b, atol=1e-5):
    return torch.allclose(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=atol, rtol=0)


# Shared padded 2x3 example: row 0 has 3 tokens, row 1 has 1 token.
MASK = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------------------------
# RLOO
# ---------------------------------------------------------------------------------------------------------
def test_rloo_leave_one_out_by_hand():
    scores = t([1.0, 0.0, 0.1, 0.1, 0.1, 0.1, 1.0, 1.0, 0.0])
    adv, n_flat = grpo.rloo_advantages(scores, group_size=3)
    # group 1 [1, 0, 0.1]: 1 - (0 + 0.1)/2 = 0.95; 0 - (1 + 0.1)/2 = -0.55; 0.1 - (1 + 0)/2 = -0.4
    # group 2 [0.1, 0.1, 0.1]: 0.1 - 0.1 = 0 (exactly), counted as flat
    # group 3 [1, 1, 0]: 1 - (1 + 0)/2 = 0.5 twice; 0 - (1 + 1)/2 = -1
    assert close(adv, [0.95, -0.55, -0.4, 0.0, 0.0, 0.0, 0.5, 0.5, -1.0])
    assert n_flat == 1 and (adv[3:6] == 0.0).all()
    with pytest.raises(ValueError, match="group_size >= 2"):
        grpo.rloo_advantages(t([1.0]), group_size=1)


# ---------------------------------------------------------------------------------------------------------
# REINFORCE++
# ---------------------------------------------------------------------------------------------------------
def test_reinforce_pp_returns_whitened_by_hand():
    scores = t([1.0, 0.0])
    kl = t([[0.1, 0.2, -0.1], [0.5, 99.0, 99.0]])
    adv = grpo.reinforce_pp_advantages(scores, MASK, kl, kl_coef=0.5)
    # rewards = -0.5 * kl, the score added on the last token:
    #   row 0 [-0.05, -0.1, 0.05 + 1 = 1.05]; row 1 [-0.25 + 0 = -0.25] (padding 0)
    # returns (reverse cumulative sums): row 0 [0.9, 0.95, 1.05]; row 1 [-0.25]
    # whitened over the 4 tokens: mean 2.65/4 = 0.6625; deviations 0.2375, 0.2875, 0.3875, -0.9125;
    #   squares 0.05640625 + 0.08265625 + 0.15015625 + 0.83265625 = 1.121875; unbiased var 1.121875/3 = 0.373958,
    #   std 0.611521: 0.2375/0.611521 = 0.388376, 0.470139, 0.633666, -1.492180
    assert close(adv, [[0.388376, 0.470139, 0.633666], [-1.492180, 0.0, 0.0]])


def test_reinforce_pp_discounted_by_hand():
    # no KL; gamma 0.5: row 0's returns [0.25, 0.5, 1] (the score 1 on the last token, halved per step back),
    # row 1's [0]; mean 1.75/4 = 0.4375, deviations -0.1875, 0.0625, 0.5625, -0.4375; squares 0.03515625 +
    # 0.00390625 + 0.31640625 + 0.19140625 = 0.546875, var 0.182292, std 0.426956:
    # -0.439155, 0.146385, 1.317465, -1.024695
    adv = grpo.reinforce_pp_advantages(t([1.0, 0.0]), MASK, gamma=0.5)
    assert close(adv, [[-0.439155, 0.146385, 1.317465], [-1.024695, 0.0, 0.0]])


def test_advantages_and_loss_pick_the_estimator_by_algo():
    """grpo.advantages reads args.algo; REINFORCE++ takes its KL (k1 of old vs ref) into the reward, and its loss has
    no KL term: the loss is the policy loss alone even with kl_coef > 0."""
    args = SimpleNamespace(algo="rloo", group_size=2, no_std_scale=False, gamma=1.0, clip_low=0.2, clip_high=0.2,
                           kl_estimator="k3", loss_agg="token-mean", max_response_len=3, tis_cap=0.0)
    old = t([[-1.0, -1.0, -1.0], [-2.0, -100.0, -100.0]])
    batch = {"mask": MASK, "old_logp": old, "ref_logp": old - t([[0.1, 0.2, -0.1], [0.5, 7.0, 7.0]]),
             "sampler_logp": old}
    stats = grpo.advantages(batch, t([1.0, 0.0]), args, kl_coef=0.5)
    assert close(batch["advantages"], [[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])  # 1 - 0, 0 - 1
    assert stats == {"flat_group_frac": 0.0}
    args.algo = "reinforce++"
    assert grpo.advantages(batch, t([1.0, 0.0]), args, kl_coef=0.5) == {}
    assert close(batch["advantages"], [[0.388376, 0.470139, 0.633666], [-1.492180, 0.0, 0.0]])  # as above
    loss, stats = grpo.loss(old.clone().requires_grad_(), None, batch, args, kl_coef=0.5, denom=None)
    # ratio 1: -(0.388376 + 0.470139 + 0.633666 - 1.492180)/4 = 0 (whitened advantages have mean 0); no KL added
    assert close(loss, 0.0) and close(stats["pg_loss"], loss) and stats["kl"] > 0


# ---------------------------------------------------------------------------------------------------------
# Dynamic sampling
# ---------------------------------------------------------------------------------------------------------
def test_has_signal():
    assert grpo.has_signal([1.0, 0.0, 0.1, 0.1, 0.1, 0.1, 1.0, 1.0, 0.0], 3).tolist() == [True, False, True]


# the scores of each prompt's group of 2: 0 and 11 are flat, 1 and 12 are not
GROUPS = {0: [0.0, 0.0], 1: [1.0, 0.0], 11: [1.0, 1.0], 12: [0.0, 0.1]}


def sample(idx, r):
    """What train.py's sampler returns: the prompts, the samples (named after the prompt), scores, seconds."""
    return ([f"p{i}" for i in idx], [f"s{i}.{j}" for i in idx for j in range(2)],
            [x for i in idx for x in GROUPS[i]], 1.0)


def test_dynamic_sampling_refills_dropped_groups():
    # round 0: prompts 0 (flat) and 1; one missing, so round 1 samples one more prompt, 11: flat again; round 2
    # samples 12: the batch is full with 1 and 12, in the order sampled; 2 extra prompts, 3 s of scoring
    prompts, samples, scores, seconds, stats = grpo.dynamic_sample(
        sample, [0, 1], 2, rounds=3, more=lambda r, k: [10 + r] * k, any_rank=lambda short: short)
    assert prompts == ["p1", "p12"] and samples == ["s1.0", "s1.1", "s12.0", "s12.1"]
    assert scores == [1.0, 0.0, 0.0, 0.1] and seconds == 3.0
    assert stats == {"dynamic_rounds": 2, "dynamic_prompts": 2, "dynamic_flat_kept": 0}


def test_dynamic_sampling_bounded_fills_with_flat_groups():
    # one extra round only: 11 is flat too, so a flat group (the first sampled, 0) fills the batch
    prompts, samples, scores, _, stats = grpo.dynamic_sample(
        sample, [0, 1], 2, rounds=1, more=lambda r, k: [10 + r] * k, any_rank=lambda short: short)
    assert prompts == ["p0", "p1"] and scores == [0.0, 0.0, 1.0, 0.0]
    assert stats == {"dynamic_rounds": 1, "dynamic_prompts": 1, "dynamic_flat_kept": 1}
    # off: one round, nothing dropped, nothing logged
    assert grpo.dynamic_sample(sample, [0, 1], 2, 0, None, None) == (["p0", "p1"], ["s0.0", "s0.1", "s1.0", "s1.1"],
                                                                     [0.0, 0.0, 1.0, 0.0], 1.0, {})


def test_dynamic_sampling_keeps_pace_with_a_short_rank():
    # this rank is full, another is short: it still samples (one prompt a round) so that the ranks stay in step
    prompts, _, _, _, stats = grpo.dynamic_sample(
        sample, [1, 12], 2, rounds=2, more=lambda r, k: [11] * k, any_rank=lambda short: True)
    assert prompts == ["p1", "p12"] and stats["dynamic_rounds"] == 2 and stats["dynamic_prompts"] == 2


# ---------------------------------------------------------------------------------------------------------
# PRIME
# ---------------------------------------------------------------------------------------------------------
def test_implicit_rewards_and_prm_loss_by_hand():
    prm = t([[-1.0, -2.0, -0.5], [-3.0, 99.0, 99.0]])
    ref = t([[-2.0, -2.0, -1.5], [-3.0, -100.0, 5.0]])
    r = prime.implicit_rewards(prm, ref, MASK, beta=0.5)
    assert close(r, [[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]])  # 0.5 * (-1 + 2), 0.5 * 0, 0.5 * 1; padding 0
    # sums z = ln 3 and 0: sigmoid 0.75 and 0.5; labels 1 and 0: -ln 0.75 = 0.287682, -ln 0.5 = 0.693147
    rewards = t([[math.log(3.0), 0.0, 0.0], [0.0, 99.0, -99.0]])
    assert close(prime.prm_loss(rewards, t([1.0, 0.0]), MASK), (0.287682 + 0.693147) / 2)
    # micro-batches with the batch's row count as denom sum to the batch's loss
    halves = [prime.prm_loss(rewards[i:i + 1], t([1.0, 0.0])[i:i + 1], MASK[i:i + 1], denom=2) for i in (0, 1)]
    assert close(sum(halves), (0.287682 + 0.693147) / 2)


def test_prm_pairwise_accuracy_by_hand():
    # group 1: summed rewards [2, 1, 1], labels [1, 0, 1]: pairs (correct, wrong) = (0, 1): 2 > 1 right;
    # (2, 1): 1 = 1, a tie, half; group 2 all wrong: no pair. (1 + 0.5) / 2 = 0.75
    assert prime.pairwise_accuracy(t([2.0, 1.0, 1.0, 5.0, 4.0, 3.0]), t([1, 0, 1, 0, 0, 0]), 3) == 0.75
    assert prime.pairwise_accuracy(t([2.0, 1.0]), t([1, 1]), 2) == 0.5  # no pair at all


def test_process_rloo_by_hand():
    # K = 2; response means m_0 = (1 + 3)/2 = 2, m_1 = 4 (one token); baseline (2 + 4)/(2 - 1) = 6, factor 2:
    # row 0 [2 - 6, 6 - 6] = [-4, 0]; row 1 [8 - 6] = [2] (= 2 * (r - mean(2, 4)))
    r = prime.process_rloo(t([[1.0, 3.0], [4.0, 99.0]]), t([[1.0, 1.0], [1.0, 0.0]]), 2)
    assert close(r, [[-4.0, 0.0], [2.0, 0.0]])
    # one token per row: RLOO on the outcome, as grpo.rloo_advantages: 0.95, -0.55, -0.4
    last = t([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assert close(prime.process_rloo(t([1.0, 0.0, 0.1])[:, None] * last, last, 3).sum(-1), [0.95, -0.55, -0.4])


def test_prime_advantages_by_hand():
    process = t([[0.1, 0.2, 0.3], [0.4, 99.0, -99.0]])
    adv = prime.prime_advantages(t([1.0, 0.0]), process, MASK, group_size=2)
    # process: means 0.2 and 0.4, baseline 0.6, factor 2: row 0 [-0.4, -0.2, 0], row 1 [0.2]
    # outcome on the last token: 1 - 0 = 1 (row 0, token 2), 0 - 1 = -1 (row 1, token 0)
    # rewards row 0 [-0.4, -0.2, 1], row 1 [-0.8]; returns row 0 [0.4, 0.8, 1], row 1 [-0.8]
    # whitened: mean 1.4/4 = 0.35, deviations 0.05, 0.45, 0.65, -1.15, squares sum 1.95, var 0.65, std 0.806226:
    # 0.062017, 0.558156, 0.806226, -1.426400
    assert close(adv, [[0.062017, 0.558156, 0.806226], [-1.426400, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------------------------
# end to end: 2 ranks, the tiny random model (every reward 0: every group is flat)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("algo", ["rloo", "reinforce++", "prime"])
def test_algo_end_to_end_with_tis_and_dynamic_sampling(algo, tmp_path):
    """2 steps of each new --algo with --tis-cap and --dynamic-sampling under torchrun: every metric finite, TIS's
    weights logged (sampler = trainer in float32: ~1), dynamic sampling spends its 2 extra rounds (2 prompts each)
    and fills each rank's 2 groups with flat ones; PRIME logs its PRM (loss ln 2 at first: sigmoid(0), any label)."""
    train(tmp_path, steps=2, rollout="hf", algo=algo, tis_cap=2, dynamic_sampling=2)
    lines = read_metrics(tmp_path)
    check_metrics(lines, steps=2, eval_every=2)
    for m in lines[1:]:
        assert abs(m["tis_weight_mean"] - 1) < 1e-3 and 1 <= m["tis_weight_max"] <= 2
        assert (m["dynamic_rounds"], m["dynamic_prompts"], m["dynamic_flat_kept"]) == (2, 4, 2)
        assert ("prm_loss" in m) == (algo == "prime")
    if algo == "prime":
        assert abs(lines[1]["prm_loss"] - math.log(2)) < 1e-4 and lines[1]["prm_acc"] == 0.5


# ---------------------------------------------------------------------------------------------------------
# bad input: one line before any model loads
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, phrase", [
    (["--algo", "rloo", "--group-size", "1"], "--group-size 1 with --algo rloo"),
    (["--algo", "prime", "--group-size", "1"], "--group-size 1 with --algo prime"),
    (["--tis-cap", "1"], "--tis-cap 1 must be > 1"),
    (["--tis-cap", "2", "--top-p", "0.9"], "--tis-cap with --top-p < 1"),
    (["--dynamic-sampling", "2", "--algo", "reinforce++", "--group-size", "1"], "--dynamic-sampling drops groups"),
])
def test_bad_input_algos(extra, phrase, tmp_path):
    out = tmp_path / "out"
    res = python(TRAIN, flags(out=out) + extra, timeout=120)
    assert_clean_failure(res, phrase, out)
