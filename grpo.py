"""The critic-free estimators: GRPO, RLOO and REINFORCE++ (--algo), and the loss they share: PPO's clipped
surrogate (ppo.policy_loss, reused, not copied) + a KL loss (GRPO, RLOO; REINFORCE++ has its KL in the reward).

GRPO: each prompt is sampled group_size times; a response's advantage is its score relative to its own group,
the same for every token of the response. Variants: scale_std=False and agg='token-sum' give Dr. GRPO;
clip_high > clip_low gives DAPO's clip-higher. RLOO: the score minus the mean of the group's OTHER responses.
REINFORCE++: the return of a per-token reward (score - KL), whitened over the whole batch. docs/algorithms.md
has the formulas side by side; has_signal() is DAPO's dynamic-sampling filter.
"""
import torch

from ppo import aggregate, gae, kl_penalty, masked_mean, masked_whiten, policy_loss, token_rewards


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


@torch.no_grad()
def rloo_advantages(scores, group_size):
    """RLOO (Ahmadian et al. 2024; veRL's 'rloo'): A_i = r_i - mean of the OTHER group_size - 1 scores of the group
    = K / (K - 1) * (r_i - mean(group)), K = group_size: no std division, and the baseline is independent of r_i,
    so the gradient estimate is unbiased. A flat group gives exactly 0. Returns (advantages [N], n_flat_groups).
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2 (a group of one has no other response), got {group_size}")
    adv, n_flat = group_advantages(scores, group_size, scale_std=False)
    return adv * (group_size / (group_size - 1)), n_flat


@torch.no_grad()
def reinforce_pp_advantages(scores, mask, kl=None, kl_coef=0.0, gamma=1.0):
    """REINFORCE++ (Hu 2025; veRL's 'reinforce_plus_plus'): the per-token reward is -kl_coef * kl on every token
    with the score added on the last (ppo.token_rewards, as PPO's), its return G_t = sum_{s >= t} gamma^(s-t) r_s
    (GAE with no critic and lambda = 1), whitened over the batch of ALL ranks. Padding stays 0. [B, T]."""
    returns, _ = gae(token_rewards(scores, mask, kl, kl_coef), torch.zeros_like(mask), mask, gamma, 1.0)
    return masked_whiten(returns, mask, all_ranks=True)


def has_signal(scores, group_size):
    """DAPO's dynamic-sampling filter: [n_groups] bool, True where a group's scores are not all equal (a flat
    group's advantages are 0 for GRPO and RLOO: it spends compute and teaches nothing)."""
    groups = torch.as_tensor(scores, dtype=torch.float32).view(-1, group_size)
    return groups.max(-1).values != groups.min(-1).values


def dynamic_sample(sample, idx, group_size, rounds, more, any_rank):
    """DAPO's dynamic sampling on this rank: groups whose scores are all equal are dropped and more prompts are
    sampled, as many as are missing, for up to `rounds` extra rounds; short of that, flat groups fill the batch.
    sample(idx, r) -> (prompts, samples, scores, seconds) for prompt indices idx in round r; more(r, k) -> k new
    prompt indices for round r; any_rank(short) -> whether any rank is short (the ranks sample in lockstep: a
    tensor-parallel engine samples for its ranks together). Returns (prompts, samples, scores, seconds, stats);
    stats (none when rounds is 0): extra rounds, extra prompts sampled, flat groups kept to fill the batch."""
    prompts, samples, scores, seconds = sample(idx, 0)
    want, r, extra = len(prompts), 0, 0
    while r < rounds and any_rank(int(has_signal(scores, group_size).sum()) < want):
        r += 1
        k = max(1, want - int(has_signal(scores, group_size).sum()))  # a full rank samples one: lockstep
        p, sa, sc, sec = sample(more(r, k), r)
        prompts, samples, scores, seconds, extra = prompts + p, samples + sa, scores + sc, seconds + sec, extra + k
    signal = has_signal(scores, group_size).tolist()
    chosen = ([g for g in range(len(prompts)) if signal[g]] + [g for g in range(len(prompts)) if not signal[g]])[:want]
    chosen.sort()
    n_flat = sum(not signal[g] for g in chosen)
    prompts = [prompts[g] for g in chosen]
    samples, scores = ([x[g * group_size + j] for g in chosen for j in range(group_size)] for x in (samples, scores))
    stats = {"dynamic_rounds": r, "dynamic_prompts": extra, "dynamic_flat_kept": n_flat} if rounds else {}
    return prompts, samples, scores, seconds, stats


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
        advantages = advantages[:, None].expand_as(logp)
    loss, stats = policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, agg, max_len, denom,
                              sampler_logp, tis_cap)
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
# The step of GRPO, RLOO and REINFORCE++, as train.py drives it: the same two functions as ppo.py's, picked with
# --algo (args.algo picks the estimator here).
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def advantages(batch, scores, args, kl_coef):
    """args.algo's advantages into batch["advantages"] [B, T] (GRPO's and RLOO's, one per response, broadcast over
    its tokens). Returns this rank's metrics: the share of its groups whose scores are all equal (GRPO, RLOO: no
    signal); none for REINFORCE++ (its loss logs the KL)."""
    mask = batch["mask"]
    if args.algo == "reinforce++":
        kl = kl_penalty(batch["old_logp"], batch["ref_logp"], "k1") if "ref_logp" in batch else None
        batch["advantages"] = reinforce_pp_advantages(scores, mask, kl, kl_coef, args.gamma)
        return {}
    adv, n_flat = (rloo_advantages(scores, args.group_size) if args.algo == "rloo" else
                   group_advantages(scores, args.group_size, scale_std=not args.no_std_scale))
    batch["advantages"] = adv.unsqueeze(1).expand_as(mask).contiguous()
    return {"flat_group_frac": n_flat / (len(scores) // args.group_size)}


def loss(logp, values, mb, args, kl_coef, denom):
    """grpo_loss of a micro-batch (values is unused: no critic); REINFORCE++ has its KL in the reward, not here.
    With --tis-cap each token's term is weighted by min(pi_old / pi_sampler, cap). Returns (loss, stats)."""
    return grpo_loss(logp, mb["old_logp"], mb.get("ref_logp"), mb["advantages"], mb["mask"], clip_low=args.clip_low,
                     clip_high=args.clip_high, kl_coef=0.0 if args.algo == "reinforce++" else kl_coef,
                     kl_estimator=args.kl_estimator, agg=args.loss_agg, max_len=args.max_response_len, denom=denom,
                     sampler_logp=mb["sampler_logp"] if args.tis_cap else None, tis_cap=args.tis_cap)
