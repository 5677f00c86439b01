"""Tests of RLOO (rloo.py), REINFORCE++ (reinforce_pp.py), dynamic sampling (rollout.py) and PRIME (prime.py) against
numbers worked out by hand
(arithmetic in the comments), and of their flags' bad combinations (train.py, one error line before any model).

Padding positions hold deliberately absurd values (99, -100, ...) so that any leak through the mask shows.
"""
import math
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import REPO, python  # noqa: E402
from test_train import (TRAIN, assert_clean_failure, assert_same_metrics, assert_same_weights,  # noqa: E402
                        check_metrics, flags, max_weight_change, read_metrics, train)

sys.path.insert(0, REPO)
import prime  # noqa: E402
import reinforce_pp  # noqa: E402
import rloo  # noqa: E402
import rollout  # noqa: E402


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
    adv, n_flat = rloo.rloo_advantages(scores, group_size=3)
    # group 1 [1, 0, 0.1]: 1 - (0 + 0.1)/2 = 0.95; 0 - (1 + 0.1)/2 = -0.55; 0.1 - (1 + 0)/2 = -0.4
    # group 2 [0.1, 0.1, 0.1]: 0.1 - 0.1 = 0 (exactly), counted as flat
    # group 3 [1, 1, 0]: 1 - (1 + 0)/2 = 0.5 twice; 0 - (1 + 1)/2 = -1
    assert close(adv, [0.95, -0.55, -0.4, 0.0, 0.0, 0.0, 0.5, 0.5, -1.0])
    assert n_flat == 1 and (adv[3:6] == 0.0).all()
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo.rloo_advantages(t([1.0]), group_size=1)


# ---------------------------------------------------------------------------------------------------------
# REINFORCE++
# ---------------------------------------------------------------------------------------------------------
def test_reinforce_pp_returns_whitened_by_hand():
    scores = t([1.0, 0.0])
    kl = t([[0.1, 0.2, -0.1], [0.5, 99.0, 99.0]])
    adv = reinforce_pp.reinforce_pp_advantages(scores, MASK, kl, kl_coef=0.5)
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
    adv = reinforce_pp.reinforce_pp_advantages(t([1.0, 0.0]), MASK, gamma=0.5)
    assert close(adv, [[-0.439155, 0.146385, 1.317465], [-1.024695, 0.0, 0.0]])


def test_rloo_and_reinforce_pp_modules_advantages_and_loss():
    """Each algorithm is its module: rloo.advantages broadcasts RLOO's per-response advantage over the tokens;
    REINFORCE++ takes its KL (k1 of old vs ref) into the reward, and its loss has no KL term: the loss is the policy
    loss alone even with kl_coef > 0 (the KL is still logged)."""
    args = SimpleNamespace(algo="rloo", group_size=2, no_std_scale=False, gamma=1.0, clip_low=0.2, clip_high=0.2,
                           kl_estimator="k3", loss_agg="token-mean", max_response_len=3, tis_cap=0.0, entropy_coef=0.0)
    old = t([[-1.0, -1.0, -1.0], [-2.0, -100.0, -100.0]])
    batch = {"mask": MASK, "old_logp": old, "ref_logp": old - t([[0.1, 0.2, -0.1], [0.5, 7.0, 7.0]]),
             "sampler_logp": old}
    stats = rloo.advantages(batch, t([1.0, 0.0]), args, kl_coef=0.5)
    assert close(batch["advantages"], [[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])  # 1 - 0, 0 - 1
    assert stats == {"flat_group_frac": 0.0}
    args.algo = "reinforce++"
    assert reinforce_pp.advantages(batch, t([1.0, 0.0]), args, kl_coef=0.5) == {}
    assert close(batch["advantages"], [[0.388376, 0.470139, 0.633666], [-1.492180, 0.0, 0.0]])  # as above
    loss, stats = reinforce_pp.loss(old.clone().requires_grad_(), None, None, batch, args, kl_coef=0.5, denom=None)
    # ratio 1: -(0.388376 + 0.470139 + 0.633666 - 1.492180)/4 = 0 (whitened advantages have mean 0); no KL added
    assert close(loss, 0.0) and close(stats["pg_loss"], loss) and stats["kl"] > 0
    assert reinforce_pp.KL_IN_REWARD and not rloo.KL_IN_REWARD  # REINFORCE++ needs the old log-probs first


# ---------------------------------------------------------------------------------------------------------
# Dynamic sampling
# ---------------------------------------------------------------------------------------------------------
def test_has_signal():
    assert rollout.has_signal([1.0, 0.0, 0.1, 0.1, 0.1, 0.1, 1.0, 1.0, 0.0], 3).tolist() == [True, False, True]


def test_dynamic_sampling_keeps_groups_with_signal_first():
    # groups of 2 in the order sampled: 0 flat [0, 0], 1 [1, 0], 2 flat [1, 1], 3 [0, 0.1]
    scores = [0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.1]
    assert rollout.pick_groups(scores, 2, want=2) == ([1, 3], 0)  # two with signal: both flat groups dropped
    # three wanted, two have signal: the first flat group sampled fills the batch, in sampling order
    assert rollout.pick_groups(scores, 2, want=3) == ([0, 1, 3], 1)
    assert rollout.pick_groups(scores[:4], 2, want=2) == ([0, 1], 1)  # no extra round: the batch as sampled


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
    # one token per row: RLOO on the outcome, as rloo.rloo_advantages: 0.95, -0.55, -0.4
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
# an algorithm is a module: a fork of ppo.py, and a new estimator in a file of its own (no existing file touched)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_copy_of_ppo_py_under_another_name_is_ppo(tmp_path):
    """cp ppo.py my_ppo.py; --algo my_ppo.py: two PPO steps (critic, KL reward, GAE) with the same metrics and the
    same policy and critic weights as --algo ppo."""
    fork = tmp_path / "my_ppo.py"
    shutil.copy(os.path.join(REPO, "ppo.py"), fork)
    for out, algo in ((tmp_path / "ppo", "ppo"), (tmp_path / "fork", str(fork))):
        train(out, steps=2, algo=algo, rollout="hf", eval_every=0, save_every=2)
    a, b = read_metrics(tmp_path / "ppo"), read_metrics(tmp_path / "fork")
    assert len(a) == len(b) == 2 and "value_loss" in a[-1] and a[-1]["critic_grad_norm"] > 0
    for x, y in zip(a, b):
        assert_same_metrics(x, y, "--algo my_ppo.py against --algo ppo")
    assert_same_weights(tmp_path / "ppo" / "checkpoints" / "step_2", tmp_path / "fork" / "checkpoints" / "step_2")


ONE_FUNCTION_ESTIMATOR = '''"""A new estimator in one function: the score minus the batch's mean score (all ranks)."""
import torch
import torch.distributed as dist

from grpo import *  # noqa: F401,F403  GRPO's declarations, check(), loss(), next_kl_coef()


@torch.no_grad()
def advantages(batch, scores, args, kl_coef):
    total = torch.stack([scores.sum(), torch.tensor(float(len(scores)))])
    dist.all_reduce(total)
    batch["advantages"] = (scores - total[0] / total[1])[:, None].expand_as(batch["mask"]).contiguous()
    return {"batch_mean_score": (total[0] / total[1]).item()}
'''


@pytest.mark.slow
def test_a_one_function_estimator_in_a_new_file_trains(tmp_path):
    """A file that imports GRPO's contract and replaces advantages() trains with --algo FILE: the built-in base
    (whose rewards vary) learns under it, its metric is logged, and no file of the repository changed."""
    before = {f: open(os.path.join(REPO, f), "rb").read() for f in os.listdir(REPO) if f.endswith(".py")}
    (tmp_path / "mean_baseline.py").write_text(ONE_FUNCTION_ESTIMATOR)
    out = tmp_path / "out"
    res = python(TRAIN, ["--algo", str(tmp_path / "mean_baseline.py"), "--steps", "2", "--batch-prompts", "2",
                         "--group-size", "4", "--eval-every", "0", "--max-response-len", "64", "--rollout", "hf",
                         "--out", str(out)], timeout=420)
    assert res.returncode == 0, res.tail()
    lines = read_metrics(out)
    assert len(lines) == 2 and all(math.isfinite(m["loss"]) for m in lines)
    assert all(0 <= m["batch_mean_score"] <= 1 for m in lines) and max(m["batch_mean_score"] for m in lines) > 0
    assert max_weight_change(os.path.join(REPO, "assets", "countdown-base"), out / "checkpoints" / "step_2") > 0
    assert before == {f: open(os.path.join(REPO, f), "rb").read() for f in before}


# ---------------------------------------------------------------------------------------------------------
# bad input: one line before any model loads
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, phrase", [
    (["--algo", "rloo", "--group-size", "1"], "--group-size 1 with --algo rloo"),
    (["--algo", "prime", "--group-size", "1"], "--group-size 1 with --algo prime"),
    (["--tis-cap", "1"], "--tis-cap 1 must be > 1"),
    (["--tis-cap", "2", "--top-p", "0.9"], "--tis-cap with --top-p < 1"),
    (["--dynamic-sampling", "2", "--algo", "reinforce++", "--group-size", "1"], "--dynamic-sampling drops groups"),
    (["--kl-ctrl", "adaptive", "--algo", "reinforce++"], "--kl-ctrl adaptive steers PPO's KL reward"),
    (["--algo", "nope"], "--algo 'nope': No module named 'nope'"),
    (["--algo", "no/such/file.py"], "--algo 'no/such/file.py': no such file"),
    (["--algo", "aha"], "aha.py lacks CRITIC, PRM, KL_IN_REWARD, check, skip_zero_rows, advantages, loss, "
                        "next_kl_coef"),
])
def test_bad_input_algos(extra, phrase, tmp_path):
    out = tmp_path / "out"
    res = python(TRAIN, flags(out=out) + extra, timeout=120)
    assert_clean_failure(res, phrase, out)
