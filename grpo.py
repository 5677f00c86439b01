"""GRPO (Shao et al. 2024, DeepSeekMath): no critic; each prompt is sampled group_size times, and a response's
advantage is its score relative to its own group, the same for every token of the response. The loss is PPO's
clipped surrogate (ppo.policy_loss, imported, not copied) plus a KL loss to the reference.

Variants by flag: --no-std-scale and --loss-agg token-sum give Dr. GRPO; --clip-high > --clip-low gives DAPO's
clip-higher; --dynamic-sampling is DAPO's filter of flat groups (rollout.py samples more prompts).
rloo.py, reinforce_pp.py and prime.py are GRPO's siblings: each imports what it shares from here. A new estimator
is a file that imports this one's contract and replaces advantages() (README, "Change the algorithm"):
    from grpo import *  # noqa: F401,F403  GRPO's declarations, check(), loss(), next_kl_coef()
    def advantages(batch, scores, args, kl_coef): ...
The contract (what train.py asks of an algorithm module) is in ppo.py's docstring; docs/algorithms.md has the
formulas side by side.
"""
import torch

from ppo import aggregate, kl_penalty, masked_mean, policy_loss

# ALGO CONTRACT: what train.py reads of this module (ppo.py's docstring) ---------------------------------------------
CRITIC = False        # the group is the baseline
PRM = False           # no process reward model
KL_IN_REWARD = False  # kl_coef * the --kl-estimator estimate is a loss term (grpo_loss), not a reward


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
    groups = scores.float().view(-1, group_size)                                  # [G, K]
    adv = groups - groups.mean(-1, keepdim=True)                                  # [G, K]
    if scale_std:
        adv = adv / (groups.std(-1, keepdim=True) + eps)                          # [G, K]
    flat = groups.max(-1).values == groups.min(-1).values                         # [G]
    adv[flat] = 0.0
    return adv.view(-1), int(flat.sum())


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_low, clip_high, kl_coef, kl_estimator="k3",
              agg="token-mean", max_len=None, denom=None, sampler_logp=None, tis_cap=0.0):
    """policy_loss(...) + kl_coef * aggregate(kl_penalty(logp, ref_logp, kl_estimator)), both with the same
    aggregation (and denom, for gradient accumulation). Returns (loss, stats).

    advantages: [B] per sequence (broadcast over the tokens here) or already [B, T].
    ref_logp may be None when kl_coef == 0 (no reference model needed). sampler_logp, tis_cap: see policy_loss.
    stats: policy_loss's ('clip_frac', 'approx_kl', 'ratio_max') + 'pg_loss' + 'kl' (masked mean of the
    per-token KL estimate; only when ref_logp is given).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)                          # [B, T]
    loss, stats = policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, agg, max_len, denom,
                              sampler_logp, tis_cap)
    stats["pg_loss"] = loss.detach()
    if ref_logp is None:
        if kl_coef != 0.0:
            raise ValueError("grpo_loss: kl_coef != 0 needs ref_logp (the reference model's log-probs)")
        return loss, stats
    kl = kl_penalty(logp, ref_logp, kl_estimator)                                 # [B, T]
    stats["kl"] = masked_mean(kl.detach(), mask)
    if kl_coef != 0.0:
        # ADDED: we minimise the loss, so +kl_coef * KL pulls the policy toward the reference. TinyZero's veRL
        # copy (dp_actor.py) SUBTRACTS it, which rewards drifting away from the reference: a known bug.
        loss = loss + kl_coef * aggregate(kl, mask, agg, max_len, denom)
    return loss, stats


# ---------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the GRPO step, as train.py drives it (ppo.py's docstring has the contract).
# ---------------------------------------------------------------------------------------------------------
def check(args):
    """A group of one has no relative advantage; the adaptive KL controller steers a KL reward (PPO's)."""
    if args.group_size < 2:
        return (f"--group-size 1 with --algo {args.algo}: a group of one has no relative advantage (use >= 2, or "
                "--algo ppo or reinforce++)")
    if args.kl_ctrl == "adaptive":
        return "--kl-ctrl adaptive steers PPO's KL reward: use --algo ppo"
    return None


def skip_zero_rows(args, kl_coef):
    """Rows whose advantages are all 0 (a group of equal scores) add exactly nothing to a loss that is the policy
    term alone: no KL term (kl_coef 0) and no entropy bonus."""
    return kl_coef == 0 and not args.entropy_coef


@torch.no_grad()
def advantages(batch, scores, args, kl_coef):
    """GRPO's advantages into batch["advantages"] [B, T] (one per response, broadcast over its tokens). Returns this
    rank's metrics: the share of its groups whose scores are all equal (no signal)."""
    adv, n_flat = group_advantages(scores, args.group_size, scale_std=not args.no_std_scale)  # [B]
    batch["advantages"] = adv.unsqueeze(1).expand_as(batch["mask"]).contiguous()  # [B, T]
    return {"flat_group_frac": n_flat / (len(scores) // args.group_size)}


def loss(logp, entropy, values, mb, args, kl_coef, denom):
    """grpo_loss of a micro-batch minus the entropy bonus (values is unused: no critic). With --tis-cap each token's
    term is weighted by min(pi_old / pi_sampler, cap). Without mb["old_logp"] (one epoch, one mini-batch: train.py
    computed none) the policy that sampled is this one: old = logp, detached. Returns (loss, stats)."""
    loss, stats = grpo_loss(logp, mb.get("old_logp", logp.detach()), mb.get("ref_logp"), mb["advantages"], mb["mask"],
                            clip_low=args.clip_low, clip_high=args.clip_high, kl_coef=kl_coef,
                            kl_estimator=args.kl_estimator, agg=args.loss_agg, max_len=args.max_response_len,
                            denom=denom, sampler_logp=mb["sampler_logp"] if args.tis_cap else None,
                            tis_cap=args.tis_cap)
    if args.entropy_coef:  # a bonus: maximising entropy keeps exploration alive
        loss = loss - args.entropy_coef * aggregate(entropy, mb["mask"], args.loss_agg, args.max_response_len, denom)
    return loss, stats


def next_kl_coef(kl_coef, metrics, args):
    """A fixed coefficient (check() refuses --kl-ctrl adaptive)."""
    return kl_coef
