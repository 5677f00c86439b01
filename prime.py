"""PRIME (Cui et al. 2025, "Process Reinforcement through Implicit Rewards"; veRL's recipe/prime): dense per-token
rewards from an implicit process reward model (PRM) trained online with the outcome label alone.

The PRM is a causal LM initialised from the policy's starting weights (train.py loads and shards it like the
policy, and hands it over with use()). Its implicit reward of response token t is
    r_t = beta * (log pi_prm(y_t | y_<t) - log pi_ref(y_t | y_<t))
and it is trained as an outcome classifier: p(correct) = sigmoid(sum_t r_t), cross-entropy against the label
(score == 1.0), one optimizer step per batch, BEFORE the batch is scored (veRL's default `update: before`).
The policy's advantages combine both rewards, each with a leave-one-out baseline in its group (process_rloo),
as the return of every token, whitened over the batch of all ranks (prime_advantages). The policy's loss is
grpo.loss (clipped surrogate + KL loss). docs/algorithms.md has the formulas and where we differ from veRL's recipe.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from grpo import check, loss, next_kl_coef  # noqa: F401 (the contract: GRPO's flag checks, loss and fixed KL)
from passes import batch_logprobs, micro_batches, response_logprobs, sync_after_backward
from ppo import masked_whiten

# ALGO CONTRACT: what train.py reads of this module (ppo.py's docstring) ---------------------------------------------
CRITIC = False        # the group (leave-one-out) is the baseline
PRM = True            # train.py loads the PRM from the policy's start, with the reference model, and calls use()
KL_IN_REWARD = False  # the KL to the reference is GRPO's loss term

_PRM = {}  # set once by train.py through use(): the PRM (FSDP2), its optimizer and schedule, the forwards' autocast


def use(model, optimizer, schedule, autocast):
    """The PRM this module trains and scores with (train.py calls this once, after loading it)."""
    _PRM.update(model=model, optimizer=optimizer, schedule=schedule, autocast=autocast)


def skip_zero_rows(args, kl_coef):
    """Never: the process rewards make a row's advantages all 0 only by chance."""
    return False


def implicit_rewards(prm_logp, ref_logp, mask, beta):
    """r_t = beta * (log pi_prm - log pi_ref) on the response tokens [B, T]; padding 0 (whatever it holds)."""
    return beta * (prm_logp - ref_logp) * mask


def prm_loss(rewards, labels, mask, denom=None):
    """Cross-entropy of p = sigmoid(sum_t r_t) against labels [B] in {0, 1}: the PRM learns to predict the outcome
    from its summed implicit rewards (PRIME's 'ce' loss). Summed over rows / denom (default B): pass the whole
    batch's row count to every micro-batch, and the micro-batch losses sum to the batch's mean."""
    z = (rewards * mask).sum(-1)
    return F.binary_cross_entropy_with_logits(z, labels.to(z), reduction="sum") / (len(z) if denom is None else denom)


@torch.no_grad()
def pairwise_accuracy(seq_rewards, labels, group_size):
    """The PRM's ranking accuracy (veRL's 'dpo_acc', ties counted half here): over the pairs of responses to one
    prompt with different labels, the share where the correct one has the larger summed implicit reward.
    0.5 when no group holds such a pair."""
    s, y = seq_rewards.view(-1, group_size), labels.float().view(-1, group_size)
    ds, dy = s[:, :, None] - s[:, None, :], y[:, :, None] - y[:, None, :]  # [G, K, K]: every ordered pair
    pairs = dy > 0  # i correct, j wrong
    n = pairs.sum().item()
    return ((ds > 0).float() + 0.5 * (ds == 0).float())[pairs].sum().item() / n if n else 0.5


@torch.no_grad()
def process_rloo(rewards, mask, group_size):
    """Leave-one-out on per-token rewards [B, T], as veRL's PRIME recipe (masked_rloo): with m_j the mean of
    response j's rewards over its masked tokens and K = group_size,
        r'_t(i) = r_t(i) * K / (K - 1) - sum_j m_j / (K - 1)  =  K / (K - 1) * (r_t(i) - mean_j m_j).
    A mask with one token per row (the last) gives RLOO on the outcome: r_i - mean of the others' scores."""
    m = (rewards * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    base = m.view(-1, group_size).sum(-1, keepdim=True) / (group_size - 1)
    k = group_size / (group_size - 1)
    return (rewards * k - base.expand(-1, group_size).reshape(-1, 1)) * mask


@torch.no_grad()
def prime_advantages(scores, process, mask, group_size):
    """PRIME's advantages [B, T]: the outcome score on the last token and the process rewards [B, T] each through
    process_rloo, summed, the return of every token (reverse cumulative sum, gamma = 1), whitened over the batch
    of all ranks (veRL's coefficients, 5 and 5, are equal: after whitening only their ratio counts)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = ((positions * (mask > 0)).argmax(-1, keepdim=True) == positions) * mask  # one-hot of the last token
    rewards = process_rloo(process, mask, group_size) + process_rloo(scores[:, None] * last, last, group_size)
    returns = rewards.flip(-1).cumsum(-1).flip(-1) * mask
    return masked_whiten(returns, mask, all_ranks=True)


def train_step(batch, args):
    """One optimizer step of the PRM on this batch (batch["labels"]: the outcomes) on all ranks (FSDP averages the
    gradients), micro-batched as the policy's update. Returns the loss, the gradient norm, whether the step was
    skipped for a non-finite gradient, and the summed implicit rewards [B] of the forward (before the step)."""
    model, optimizer, n = _PRM["model"], _PRM["optimizer"], len(batch["labels"])
    model.train()
    total, seq = 0.0, []
    mbs = list(micro_batches(batch, torch.arange(n), args.micro_batch_tokens))
    for j, mb in enumerate(mbs):
        sync_after_backward(model, j == len(mbs) - 1 or not args.keep_gathered)  # as train.py's update
        logp = response_logprobs(model, mb, args.temperature, _PRM["autocast"])
        rewards = implicit_rewards(logp, mb["ref_logp"], mb["mask"], args.prm_beta)
        step_loss = prm_loss(rewards, mb["labels"], mb["mask"], denom=n)
        step_loss.backward()
        seq.append(rewards.detach().sum(-1))
        total += step_loss.item()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # the norm of all ranks: same on each
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _PRM["schedule"].step()
    return total, norm, not math.isfinite(norm), torch.cat(seq)


@torch.no_grad()
def advantages(batch, scores, args, kl_coef):
    """Train the PRM on the batch, score its tokens with the updated PRM, and put PRIME's advantages into
    batch["advantages"]. The process rewards are scaled by the largest |return| of the batch of all ranks
    (veRL's prime_norm 'batch_norm'), so that they stay within [-1, 1] whatever beta. Returns this rank's
    metrics: prm_loss, prm_grad_norm, prm_acc (ranking accuracy before the step), prm_reward (mean summed
    implicit reward after it), prm_skipped."""
    labels = (scores == 1.0).float()  # the outcome label: solved or not (0.1 is a well-formed wrong answer)
    keys = ("input_ids", "attention_mask", "response_ids", "mask", "ref_logp", "group")
    inputs = {**{k: batch[k] for k in keys}, "labels": labels}
    with torch.enable_grad():
        step_loss, norm, skipped, seq_before = train_step(inputs, args)
    model = _PRM["model"]
    model.eval()
    logp = batch_logprobs(model, inputs, args.micro_batch_tokens, args.temperature, _PRM["autocast"])  # [B, T]
    mask = batch["mask"]
    process = implicit_rewards(logp, batch["ref_logp"], mask, args.prm_beta)      # [B, T]
    scale = process.flip(-1).cumsum(-1).abs().max().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(scale, op=dist.ReduceOp.MAX)
    batch["advantages"] = prime_advantages(scores, process / (scale + 1e-6), mask, args.group_size)
    seq = process.sum(-1)
    return {"prm_loss": step_loss, "prm_grad_norm": norm, "prm_skipped": float(skipped),
            "prm_acc": pairwise_accuracy(seq_before, labels, args.group_size), "prm_reward": seq.mean().item()}
