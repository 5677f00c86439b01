"""GRPO: group-relative advantages (no critic) and the GRPO loss = PPO's clipped surrogate + a KL loss.

Each prompt is sampled group_size times; a response's advantage is its score relative to its own group,
the same for every token of the response. The policy loss is ppo.policy_loss, reused, not copied.
Variants: scale_std=False and agg='token-sum' give Dr. GRPO; clip_high > clip_low gives DAPO's clip-higher.
"""
import torch

from ppo import aggregate, kl_penalty, masked_mean, policy_loss


@torch.no_grad()
def group_advantages(scores, group_size, scale_std=True, eps=1e-6):
    """Advantages [N] for N = n_prompts * group_size scores; consecutive entries are one prompt's group.

    A = (r - mean(group)) / (std(group) + eps), std UNBIASED (n - 1), as torch.std in the GRPO paper's code
    and veRL. scale_std=False drops the division (Dr. GRPO: the std scaling up-weights groups that are
    almost all right or all wrong). A group whose scores are all equal carries no signal: its advantages are
    exactly 0 (set explicitly; float rounding of the mean would otherwise leave ~1e-8 / eps noise), and it is
    counted in n_flat_groups, the number to log (many flat groups = batch too easy or too hard).
    Returns (advantages [N] float32, n_flat_groups int).
    """
    if group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2 (a group of one has no baseline), got {group_size}")
    if scores.dim() != 1 or scores.numel() % group_size != 0:
        raise ValueError(f"scores must be 1-D with a length divisible by group_size={group_size}, "
                         f"got shape {tuple(scores.shape)}")
    groups = scores.float().view(-1, group_size)
    adv = groups - groups.mean(-1, keepdim=True)
    if scale_std:
        adv = adv / (groups.std(-1, keepdim=True) + eps)
    flat = groups.max(-1).values == groups.min(-1).values
    adv[flat] = 0.0
    return adv.view(-1), int(flat.sum())


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_low, clip_high, kl_coef, kl_estimator="k3",
              agg="token-mean", max_len=None, denom=None):
    """policy_loss(...) + kl_coef * aggregate(kl_penalty(logp, ref_logp, kl_estimator)), both with the same
    aggregation (and denom, for gradient accumulation). Returns (loss, stats).

    advantages: [B] per sequence (broadcast over the tokens here) or already [B, T].
    ref_logp may be None when kl_coef == 0 (no reference model needed).
    stats: policy_loss's ('clip_frac', 'approx_kl', 'ratio_max') + 'pg_loss' + 'kl' (masked mean of the
    per-token KL estimate; only when ref_logp is given).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    loss, stats = policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, agg, max_len, denom)
    stats["pg_loss"] = loss.detach()
    if ref_logp is None:
        if kl_coef != 0.0:
            raise ValueError("grpo_loss: kl_coef != 0 needs ref_logp (the reference model's log-probs)")
        return loss, stats
    kl = kl_penalty(logp, ref_logp, kl_estimator)
    stats["kl"] = masked_mean(kl.detach(), mask)
    if kl_coef != 0.0:
        # ADDED: we minimise the loss, so +kl_coef * KL pulls the policy toward the reference. TinyZero's veRL
        # copy (dp_actor.py) SUBTRACTS it, which rewards drifting away from the reference: a known bug.
        loss = loss + kl_coef * aggregate(kl, mask, agg, max_len, denom)
    return loss, stats


# ---------------------------------------------------------------------------------------------------------
# The GRPO step, as train.py drives it: the same two functions as ppo.py's, picked with --algo.
# ---------------------------------------------------------------------------------------------------------
def advantages(batch, scores, args, kl_coef):
    """Group-relative advantages, one per response, broadcast over its tokens into batch["advantages"] [B, T].
    Returns this rank's metrics: the share of its groups whose scores are all equal (no signal)."""
    adv, n_flat = group_advantages(scores, args.group_size, scale_std=not args.no_std_scale)
    batch["advantages"] = adv.unsqueeze(1).expand_as(batch["mask"]).contiguous()
    return {"flat_group_frac": n_flat / (len(scores) // args.group_size)}


def loss(logp, values, mb, args, kl_coef, denom):
    """grpo_loss of a micro-batch (values is unused: no critic). Returns (loss, stats)."""
    return grpo_loss(logp, mb["old_logp"], mb.get("ref_logp"), mb["advantages"], mb["mask"], clip_low=args.clip_low,
                     clip_high=args.clip_high, kl_coef=kl_coef, kl_estimator=args.kl_estimator, agg=args.loss_agg,
                     max_len=args.max_response_len, denom=denom)
