"""PPO with a critic, TinyZero's default: the KL to the reference in the reward, GAE, whitened advantages, the
clipped policy and value losses. This is the file to fork: `cp ppo.py my_ppo.py`, edit it, and run
`torchrun --nproc_per_node=2 train.py --algo my_ppo.py` (a path, or a module name beside train.py).

An algorithm is a module. train.py asks it, and compares --algo to no name:
    CRITIC        True: train.py builds build_critic(path, dtype), shards and trains it with the policy; the batch
                  then holds the critic's "values", and loss() gets the new ones
    PRM           True: train.py also loads a copy of the policy as a process reward model and hands it to use()
                  (prime.py); the reference model is then loaded whatever kl_coef
    KL_IN_REWARD  True: advantages() reads the KL of the old policy to the reference, so the old log-probs are
                  computed before the update (else the update's own first forward gives them, where it can)
    check(args)                               a problem with the flags, in one line, or None: before any model loads
    skip_zero_rows(args, kl_coef)             whether a row whose advantages are all 0 adds exactly nothing to loss():
                                              the update then runs no passes for it (its tokens still count)
    advantages(batch, scores, args, kl_coef)  once per batch, no gradient: fills batch["advantages"] [B, T]; returns
                                              this rank's metrics (means over ranks are logged)
    loss(logp, entropy, values, mb, args, kl_coef, denom)
                                              every micro-batch: (loss, stats); stats ending in "loss" are the
                                              micro-batch's share of its mini-batch's, "_max" ones maxima
    next_kl_coef(kl_coef, metrics, args)      after each step: the KL coefficient of the next (adaptive control)
The passes that every algorithm shares (packing, micro-batches, FSDP2, log-probs, values) are in passes.py.

Shapes: B sequences (a micro-batch's, or a rank's batch), T = padded response length. `mask` [B, T] is float, 1.0
on response tokens (EOS included), 0.0 on the right padding. Log-probs are those of the sampled tokens, already
temperature-scaled. Losses are scalars ready for .backward(); stats are detached 0-d tensors or floats.

One PPO step (TinyZero's defaults in brackets):
    values  = passes.batch_values(critic, batch)                          # V(s_t), before token t (train.py)
    advantages(batch, scores, ...):
      kl      = kl_penalty(old_logp, ref_logp, 'k1')                      # KL lives in the reward [k1]
      rewards = token_rewards(scores, mask, kl, kl_coef)                  # [kl_coef 0.001, fixed]
      adv, ret = gae(rewards, values, mask, gamma, lam)                   # [gamma = lam = 1]
      adv     = masked_whiten(adv, mask, all_ranks=True)
    loss(logp, entropy, new_values, mb, ...), on every micro-batch:
      policy_loss(logp, old_logp, adv, mask)[0]                           # [clip 0.2, token-mean]
      + value_loss(new_values, values, ret, mask)[0]                      # [value clip 0.5]
      - entropy_coef * aggregate(entropy, mask)                           # [0.001]

Where we differ from veRL (TinyZero's trainer), on purpose: no dual-clip (veRL bounds the loss of a token with a
negative advantage by -A * 3, on by default there; our ratios are clamped to e^20 and clipped as PPO's paper);
'token-sum' divides by B * max_len where veRL's 'seq-mean-token-sum-norm' divides by the horizon alone (ours is
veRL's / B: the same direction, a learning rate B times smaller). grpo.py and prime.py import the maths they share
with PPO (the masked reductions, the KL estimators, the clipped surrogate) from here.
"""
import math

import torch
import torch.distributed as dist

LOSS_AGG_MODES = ("token-mean", "seq-mean", "token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")

# log-ratios are clamped to this before exp(): padding positions may hold arbitrary log-probs, and
# exp(100) * 0.0 = inf * 0 = nan would poison the loss (and its gradient) despite the mask.
# A real token's ratio of e^20 means the run is already broken; past the clamp its gradient is 0 (as veRL).
MAX_LOG_RATIO = 20.0
MAX_K3 = 10.0  # veRL's and TinyZero's bound on the k3 estimate ('low_var_kl'): its value and gradient stay bounded

# ALGO CONTRACT: what train.py reads of this module (see the docstring) --------------------------------------------
CRITIC = True        # the critic is PPO's baseline
PRM = False          # no process reward model
KL_IN_REWARD = True  # kl_coef * k1 is a per-token reward: advantages() reads the old and the reference log-probs


# ---------------------------------------------------------------------------------------------------------
# Masked reductions
# ---------------------------------------------------------------------------------------------------------
def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1. An all-padding input gives 0, not nan (count clamped to 1)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(x, mask, eps=1e-8, all_ranks=False):
    """(x - mean) / std over the valid tokens of the whole batch; padding positions of the output are 0.

    The variance is unbiased (Bessel's n-1), as veRL's masked_whiten that TinyZero uses. all_ranks: the mean
    and variance are those of the batch of all ranks together (sums of n, x and x^2 in float64, one
    all-reduce), as TinyZero whitens on its single controller.
    """
    sums = torch.stack([mask.sum(), (x * mask).sum(), (x**2 * mask).sum()]).double()
    if all_ranks and dist.is_initialized():
        dist.all_reduce(sums)
    n, s, q = sums.tolist()
    mean = s / max(n, 1.0)
    var = (q - n * mean**2) / max(n - 1, 1.0)
    return (x - mean) * (var + eps) ** -0.5 * mask


def aggregate(loss_tok, mask, mode, max_len=None, denom=None):
    """Reduce a per-token loss [B, T] to a scalar.

    'token-mean': sum over valid tokens / number of valid tokens. Long answers weigh more (DAPO, TinyZero).
    'seq-mean':   mean over each sequence's tokens, then mean over sequences (GRPO paper). A token of a short
                  answer weighs more than one of a long answer: the length bias Dr. GRPO points out.
    'token-sum':  sum over valid tokens / (B * max_len), max_len = the configured max response length, a
                  constant (Dr. GRPO): no length bias, and the scale does not depend on the batch's lengths.

    denom: overrides the divisor, for gradient accumulation. When one mini-batch is split into micro-batches,
    pass the WHOLE mini-batch's divisor to every micro-batch: its total valid tokens ('token-mean'), its number
    of sequences ('seq-mean') or its B * max_len ('token-sum'). Each micro-batch's loss is then its share of
    the mini-batch loss, and the sum of the micro-batch losses (and gradients) equals the full-batch value;
    do not divide by the number of micro-batches on top.
    """
    total = (loss_tok * mask).sum()
    if mode == "token-mean":
        return total / (mask.sum().clamp(min=1.0) if denom is None else denom)
    if mode == "seq-mean":
        per_seq = (loss_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / (per_seq.shape[0] if denom is None else denom)
    if mode == "token-sum":
        if denom is None:
            if max_len is None:
                raise ValueError("aggregate mode 'token-sum' needs max_len (the configured max response length) "
                                 "or denom")
            denom = loss_tok.shape[0] * max_len
        return total / denom
    raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {LOSS_AGG_MODES}")


# ---------------------------------------------------------------------------------------------------------
# KL to the reference policy
# ---------------------------------------------------------------------------------------------------------
def kl_penalty(logp, ref_logp, estimator):
    """Per-token estimate [B, T] of KL(pi || ref) from tokens sampled from pi (Schulman, "Approximating KL", 2020).

    'k1' = logp - ref_logp: unbiased, high variance, can be negative per token. As a LOSS its expected gradient
          is zero (E_pi[grad log pi] = 0), so it belongs in the REWARD (PPO's token_rewards), where the policy
          gradient turns it into the true KL gradient. That is how TinyZero's PPO uses it.
    'k2' = 0.5 * (logp - ref_logp)^2: biased, >= 0; as a loss its gradient is the true gradient of KL(pi||ref).
    'k3' = exp(ref - logp) - (ref - logp) - 1: unbiased, >= 0, low variance (veRL's 'low_var_kl', GRPO's
          default); as a loss its gradient is that of KL(ref||pi), which also pulls pi toward ref. Clamped to
          [0, MAX_K3] as veRL and TinyZero do: a token the policy has made e^8 times less likely than the reference
          would otherwise weigh e^8 - 9 ~ 2,972 and dominate the loss; past the clamp its gradient is 0.
    """
    d = logp - ref_logp                                                       # [B, T] log(pi / ref)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        r = (-d).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # log(ref/pi), clamped only so exp() stays finite
        return (torch.exp(r) - r - 1.0).clamp(max=MAX_K3)                     # [B, T] >= 0
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


# ---------------------------------------------------------------------------------------------------------
# Policy: the clipped surrogate
# ---------------------------------------------------------------------------------------------------------
def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, agg="token-mean", max_len=None,
                denom=None, sampler_logp=None, tis_cap=0.0):
    """PPO's clipped surrogate: per token max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)).

    The max (a pessimistic bound) means: once the ratio has moved past the bound in the direction the
    advantage rewards, the token stops contributing gradient. A larger clip_high than clip_low ("clip-higher",
    DAPO) lets unlikely good tokens grow faster and delays entropy collapse.
    advantages: [B, T] (GRPO broadcasts its per-sequence advantage over the tokens).
    stats: 'clip_frac' share of valid tokens where the clipped branch was strictly larger (no gradient there),
           'approx_kl' mean over valid tokens of old_logp - logp (k1 of KL(old || new), as veRL logs it; it
           can be slightly negative), 'ratio_max' the largest ratio over valid tokens.
    sampler_logp, tis_cap: truncated importance sampling (TIS): each token's term is weighted by
    w = min(pi_old / pi_sampler, tis_cap) = min(exp(old_logp - sampler_logp), tis_cap), a constant (no gradient).
    The sampler (vLLM, bf16) is not quite the policy the trainer computes: w corrects the mismatch, the cap bounds
    the variance. stats then add 'tis_weight_mean' and 'tis_weight_max' over valid tokens.
    """
    log_ratio = (logp - old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)            # [B, T] log(pi / pi_old)
    ratio = torch.exp(log_ratio)                                                  # [B, T]
    loss_unclipped = -advantages * ratio                                          # [B, T]
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)     # [B, T]
    loss_tok = torch.maximum(loss_unclipped, loss_clipped)                        # [B, T] the pessimistic one
    if sampler_logp is not None:  # clamped first: padding holds arbitrary log-probs (see MAX_LOG_RATIO)
        tis = torch.exp((old_logp - sampler_logp).detach().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)).clamp(max=tis_cap)
        loss_tok = loss_tok * tis
    loss = aggregate(loss_tok, mask, agg, max_len, denom)                         # scalar
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
            "approx_kl": masked_mean(-log_ratio, mask),
            "ratio_max": torch.where(mask > 0, ratio, torch.zeros_like(ratio)).max(),  # ratios are > 0
        }
        if sampler_logp is not None:
            stats["tis_weight_mean"] = masked_mean(tis, mask)
            stats["tis_weight_max"] = torch.where(mask > 0, tis, torch.zeros_like(tis)).max()
    return loss, stats


# ---------------------------------------------------------------------------------------------------------
# Rewards and advantages (PPO with a critic)
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def token_rewards(scores, mask, kl=None, kl_coef=0.0):
    """Per-token reward [B, T]: -kl_coef * kl on every valid token, plus the scalar score [B] on the LAST
    valid token of each row (the outcome reward arrives when the episode ends). Padding stays 0.

    kl: per-token KL [B, T] (k1 of the rollout policy vs the reference, computed by the caller).
    """
    rewards = torch.zeros_like(mask, dtype=torch.float32)
    if kl is not None and kl_coef != 0.0:
        rewards -= kl_coef * kl.float() * mask
    # index of the last valid token: the largest position whose mask is 1 (works for any mask shape)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * (mask > 0)).argmax(-1)
    has_tokens = (mask.sum(-1) > 0).float()
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.to(rewards) * has_tokens
    return rewards


@torch.no_grad()
def gae(token_rewards, values, mask, gamma=1.0, lam=1.0):
    """Generalised advantage estimation, right to left over the response tokens. Returns (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t;   A_t = delta_t + gamma * lam * A_{t+1}
    The episode ends at the last valid token, so V and A after it count as 0 (whatever the padding holds).
    returns = advantages + values (the critic's regression target). Padding positions of both outputs are 0.
    With gamma = lam = 1 (TinyZero) A_t = (sum of rewards from t on) - V_t. No whitening here: the caller
    whitens the advantages with masked_whiten, as TinyZero does. Assumes right padding (a valid prefix).
    """
    values = values.float() * mask                                                # [B, T]
    rewards = token_rewards.float() * mask                                        # [B, T]
    T = mask.shape[1]
    advantages = torch.zeros_like(values)                                         # [B, T]
    next_value = torch.zeros_like(values[:, 0])                                   # [B]
    next_adv = torch.zeros_like(values[:, 0])                                     # [B]
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]                 # [B]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]  # padding: resets to 0 before the last token
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


# ---------------------------------------------------------------------------------------------------------
# Critic: value head on the policy's architecture, and its clipped loss
# ---------------------------------------------------------------------------------------------------------
def build_critic(model_path, dtype):
    """The critic: the base model's transformer with a scalar value head (`score`, hidden -> 1) instead of
    the LM head, as in veRL/TinyZero. The backbone is initialised from model_path; the value head is FRESH
    (random, std = initializer_range), so its first values are noise: TinyZero uses a 10x higher learning
    rate for the critic than the actor (1e-5 vs 1e-6). Dropout before the head is off (transformers would
    default to 0.1), so values are deterministic in train mode.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification  # lazy: GRPO runs never need it

    config = AutoConfig.from_pretrained(model_path, num_labels=1)
    config.classifier_dropout = 0.0  # set on the object: Qwen2Config rejects it as a from_pretrained kwarg
    return AutoModelForTokenClassification.from_pretrained(model_path, config=config, dtype=dtype)


def value_loss(values, old_values, returns, mask, clip=0.5, agg="token-mean", denom=None):
    """Clipped value loss (PPO2 / veRL): loss_tok = 0.5 * max((v - R)^2, (v_clipped - R)^2), where
    v_clipped = old + clamp(v - old, -clip, clip) keeps each update's value change within `clip` of the
    value at rollout time. stats: 'vf_clip_frac' share of valid tokens where the clip is active and the clipped
    term was larger (inside the clip v_clipped is v up to rounding: comparing the two losses alone would count
    rounding noise). agg and denom as in aggregate ('token-sum' needs denom = B * max_len here).
    """
    delta = values - old_values                                                   # [B, T]
    v_clipped = old_values + delta.clamp(-clip, clip)                             # [B, T]
    loss_unclipped = (values - returns) ** 2                                      # [B, T]
    loss_clipped = (v_clipped - returns) ** 2                                     # [B, T]
    loss = 0.5 * aggregate(torch.maximum(loss_unclipped, loss_clipped), mask, agg, denom=denom)
    with torch.no_grad():
        clipped = (delta.abs() > clip) & (loss_clipped > loss_unclipped)
        stats = {"vf_clip_frac": masked_mean(clipped.float(), mask)}
    return loss, stats


def update_kl_coef(coef, kl, target, horizon, n_steps):
    """Adaptive KL controller (Ziegler et al. 2019, veRL/TinyZero 'adaptive'): nudge coef toward the target KL.

    err = clip(kl / target - 1, -0.2, 0.2); new coef = coef * (1 + err * n_steps / horizon). n_steps is the
    number of samples since the last update (veRL passes the batch size). TinyZero's default is 'fixed'.
    """
    err = min(max(float(kl) / target - 1.0, -0.2), 0.2)
    return float(coef) * (1.0 + err * n_steps / horizon)


@torch.no_grad()
def explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R] over the valid tokens: 1 = perfect critic, 0 = no better than a constant,
    < 0 = worse. Returns nan when Var[R] is 0 up to float rounding (undefined: e.g. every return equal), so a
    log shows it instead of a huge number from a denominator of rounding noise.
    """
    def var(x):
        return masked_mean((x - masked_mean(x, mask)) ** 2, mask)

    returns = returns.float()
    var_r = var(returns).item()
    if var_r <= 1e-10 * masked_mean(returns**2, mask).item():  # float32 rounding of equal returns is ~1e-14
        return math.nan
    return 1.0 - var(returns - values.float()).item() / var_r


# ---------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the PPO step, as train.py drives it. A fork edits from here (and the maths above).
# ---------------------------------------------------------------------------------------------------------
def check(args):
    """PPO runs with any --group-size (its baseline is the critic, not the group) and either KL controller."""
    return None


def skip_zero_rows(args, kl_coef):
    """Never: every row trains the critic, whatever its advantages."""
    return False


@torch.no_grad()
def advantages(batch, scores, args, kl_coef):
    """TinyZero's PPO advantages: k1 KL to the reference in the per-token reward (when there is a reference),
    the score on the last token, GAE over the critic's values, whitened over the batch of all ranks.

    batch: rollout.to_batch()'s, with "values" [B, T] (the critic's, computed by train.py), "old_logp" and,
    with a reference, "ref_logp". scores [B]. Adds batch["advantages"] and batch["returns"] (the critic's
    targets). Returns this rank's metrics: the rollout KL, the value mean (of all ranks), explained variance.
    """
    mask, vals = batch["mask"], batch["values"]                                   # [B, T], [B, T]
    kl = kl_penalty(batch["old_logp"], batch["ref_logp"], "k1") if "ref_logp" in batch else None  # [B, T]
    adv, batch["returns"] = gae(token_rewards(scores, mask, kl, kl_coef), vals, mask, args.gamma, args.lam)
    batch["advantages"] = masked_whiten(adv, mask, all_ranks=True)                # [B, T]
    n_and_sum = torch.stack([mask.sum(), (vals * mask).sum()]).double()
    dist.all_reduce(n_and_sum)
    n, v = n_and_sum.tolist()
    stats = {"value_mean": v / max(n, 1.0), "explained_var": explained_variance(vals, batch["returns"], mask),
             "kl_coef": kl_coef}
    if kl is not None:
        stats["kl"] = masked_mean(kl, mask).item()
    return stats


def loss(logp, entropy, values, mb, args, kl_coef, denom):
    """The clipped policy loss of a micro-batch plus the critic's clipped value loss (one backward trains both
    models: their parameters are disjoint), minus the entropy bonus. kl_coef is unused: PPO's KL is in the reward.
    logp, entropy, values: [B, T] of the policy and critic being trained. Without mb["old_logp"] (one epoch, one
    mini-batch: train.py computed none) the policy that sampled is this one: old = logp, detached."""
    old_logp = mb.get("old_logp", logp.detach())                              # [B, T]
    pg, stats = policy_loss(logp, old_logp, mb["advantages"], mb["mask"], args.clip_low, args.clip_high,
                            args.loss_agg, args.max_response_len, denom,
                            mb["sampler_logp"] if args.tis_cap else None, args.tis_cap)
    vf, vf_stats = value_loss(values, mb["values"], mb["returns"], mb["mask"], args.value_clip, args.loss_agg, denom)
    total = pg + vf
    if args.entropy_coef:  # a bonus: maximising entropy keeps exploration alive
        total = total - args.entropy_coef * aggregate(entropy, mb["mask"], args.loss_agg, args.max_response_len, denom)
    return total, {**stats, **vf_stats, "pg_loss": pg.detach(), "value_loss": vf.detach()}


def next_kl_coef(kl_coef, metrics, args):
    """--kl-ctrl adaptive: update_kl_coef toward --kl-target from the step's mean KL; fixed: unchanged."""
    if args.kl_ctrl != "adaptive" or "kl" not in metrics:
        return kl_coef
    return update_kl_coef(kl_coef, metrics["kl"], args.kl_target, args.kl_horizon, args.batch_prompts * args.group_size)
