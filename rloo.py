"""RLOO (Ahmadian et al. 2024; veRL's 'rloo'): GRPO with a leave-one-out baseline. A response's advantage is its
score minus the mean score of the OTHER responses to its prompt, the same for every token. Everything else, the
loss (clipped surrogate + KL loss) included, is GRPO's (grpo.py). docs/algorithms.md has the formulas.
"""
import torch

from grpo import group_advantages
from grpo import CRITIC, KL_IN_REWARD, PRM, check, loss, next_kl_coef, skip_zero_rows  # noqa: F401 (the contract)


@torch.no_grad()
def rloo_advantages(scores, group_size):
    """A_i = r_i - mean of the OTHER group_size - 1 scores of the group = K / (K - 1) * (r_i - mean(group)),
    K = group_size: no std division, and the baseline is independent of r_i, so the gradient estimate is unbiased.
    A flat group gives exactly 0. scores [N], N = n_prompts * K. Returns (advantages [N], n_flat_groups)."""
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2 (a group of one has no other response), got {group_size}")
    adv, n_flat = group_advantages(scores, group_size, scale_std=False)          # [N] r - mean(group)
    return adv * (group_size / (group_size - 1)), n_flat


# ALGO LOGIC ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def advantages(batch, scores, args, kl_coef):
    """RLOO's advantages into batch["advantages"] [B, T] (one per response, broadcast over its tokens). Returns this
    rank's metrics: the share of its groups whose scores are all equal (no signal)."""
    adv, n_flat = rloo_advantages(scores, args.group_size)                        # [B]
    batch["advantages"] = adv.unsqueeze(1).expand_as(batch["mask"]).contiguous()  # [B, T]
    return {"flat_group_frac": n_flat / (len(scores) // args.group_size)}
