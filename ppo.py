"""PPO's numerical core: masked reductions, KL estimators, GAE, clipped policy and value losses, the critic.

Everything here works on response-only tensors of shape [B, T]: B sequences, T = padded response length.
`mask` is float, 1.0 on response tokens (EOS included) and 0.0 on the right padding. Log-probs are the
per-token log-probs of the sampled tokens, already temperature-scaled by the caller. Losses come back as
scalars ready for .backward(); stats come back as dicts of detached 0-d tensors (call float() to log them:
no GPU sync happens here).

One PPO step, as train.py drives it (TinyZero's defaults in brackets); the last two functions of this file,
advantages() and loss(), are the whole of PPO that train.py sees:
    values  = critic_values(critic, batch)                                # V(s_t), before token t (train.py)
    advantages(batch, scores, ...):
      kl      = kl_penalty(old_logp, ref_logp, 'k1')                      # KL lives in the reward [k1]
      rewards = token_rewards(scores, mask, kl, kl_coef)                  # [kl_coef 0.001, fixed]
      adv, ret = gae(rewards, values, mask, gamma, lam)                   # [gamma = lam = 1]
      adv     = masked_whiten(adv, mask, all_ranks=True)
    loss(logp, new_values, mb, ...), on every micro-batch:
      policy_loss(logp, old_logp, adv, mask)[0]                           # [clip 0.2, token-mean]
      + value_loss(new_values, values, ret, mask)[0]                      # [value clip 0.5]
    train.py subtracts entropy_coef * aggregate(entropy, mask, agg) for both algorithms [0.001].
GRPO (grpo.py) skips the critic and GAE and reuses policy_loss, kl_penalty and aggregate from here.
This file imports only torch (transformers lazily, in build_critic).
"""
import contextlib
import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

LOSS_AGG_MODES = ("token-mean", "seq-mean", "token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")

# log-ratios are clamped to this before exp(): padding positions may hold arbitrary log-probs, and
# exp(100) * 0.0 = inf * 0 = nan would poison the loss (and its gradient) despite the mask.
# A real token's ratio of e^20 means the run is already broken; past the clamp its gradient is 0 (as veRL).
MAX_LOG_RATIO = 20.0


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
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman, "Approximating KL", 2020).

    'k1' = logp - ref_logp: unbiased, high variance, can be negative per token. As a LOSS its expected gradient
          is zero (E_pi[grad log pi] = 0), so it belongs in the REWARD (PPO's token_rewards), where the policy
          gradient turns it into the true KL gradient. That is how TinyZero's PPO uses it.
    'k2' = 0.5 * (logp - ref_logp)^2: biased, >= 0; as a loss its gradient is the true gradient of KL(pi||ref).
    'k3' = exp(ref - logp) - (ref - logp) - 1: unbiased, >= 0, low variance (veRL's 'low_var_kl', GRPO's
          default); as a loss its gradient is that of KL(ref||pi), which also pulls pi toward ref.
    """
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        r = (-d).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # log(ref/pi), clamped only so exp() stays finite
        return torch.exp(r) - r - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


# ---------------------------------------------------------------------------------------------------------
# Policy: clipped surrogate and entropy
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
    log_ratio = (logp - old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_tok = torch.maximum(loss_unclipped, loss_clipped)
    if sampler_logp is not None:  # clamped first: padding holds arbitrary log-probs (see MAX_LOG_RATIO)
        tis = torch.exp((old_logp - sampler_logp).detach().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)).clamp(max=tis_cap)
        loss_tok = loss_tok * tis
    loss = aggregate(loss_tok, mask, agg, max_len, denom)
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


def entropy_from_logits(logits):
    """Entropy [B, T] of softmax(logits [B, T, V]): logsumexp(z) - sum softmax(z) * z.

    z = logits - max first: entropy is shift-invariant, and without the shift the two terms are both ~max(logits)
    and their difference loses precision (float32 at 1000 resolves only ~6e-5). Computed in the logits' dtype:
    pass float32 logits when bf16 precision matters.
    """
    z = logits - logits.max(dim=-1, keepdim=True).values.detach()
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)


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
    values = values.float() * mask
    rewards = token_rewards.float() * mask
    T = mask.shape[1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]  # padding: resets to 0 before the last token
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


# ---------------------------------------------------------------------------------------------------------
# Critic: value head on the policy's architecture
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


def pack(batch):
    """The micro-batch's sequences laid end to end in one row, without padding, each prompt once per group.

    batch: rollout.to_batch()'s layout, input_ids [B, P + T] with prompts left-padded to P and responses right-padded
    to T, attention_mask 1 on real tokens, group [B] the prompt of each row (optional). Consecutive rows of one
    group share their prompt: it is laid out once, before the first of them, and each of their responses attends
    to it and to itself (keys and values of the prompt are the same for every response: computing them once is
    exact). Returns (input_ids [1, L], position_ids [1, L], attention_mask, index [N], rows [N], cols [N]):
    L = the prompts once plus the responses; positions count from 0 within each sequence (prompt + response);
    attention_mask [1, 1, L, L] (True: may attend) where a prompt is shared, else None (transformers then builds
    the block-diagonal causal mask from the positions, or flash-attention's variable-length kernels where set).
    Logits at position i predict token i + 1: response token t > 0 of row b is scored at its own position - 1,
    token 0 at the last position of its prompt; its result goes to [rows, cols] = [b, t] of the response layout.
    N = the batch's response tokens. Example, no shared prompt: prompts [7 8] and [9], responses [1 2] and [3]:
    ids [7 8 1 2 9 3], positions [0 1 2 3 0 1], index [1 2 4], rows [0 0 1], cols [0 1 0]. Shared: prompt [7 8]
    with responses [1 2] and [3]: ids [7 8 1 2 3], positions [0 1 2 3 2], index [1 2 1], rows [0 0 1], cols [0 1 0].
    """
    attn = batch["attention_mask"].bool()
    B, T = batch["response_ids"].shape
    group = batch.get("group", torch.arange(B, device=attn.device))
    first = torch.ones(B, dtype=torch.bool, device=attn.device)  # the rows that lay out their group's prompt
    first[1:] = group[1:] != group[:-1]
    keep = attn.clone()
    keep[~first, :-T] = False
    n_prompt, n_kept = attn[:, :-T].sum(-1), keep.sum(-1)
    starts = n_kept.cumsum(0) - n_kept
    owner = torch.where(first, torch.arange(B, device=attn.device), 0).cummax(0).values  # row holding b's prompt
    rows, cols = attn[:, -T:].nonzero(as_tuple=True)  # the generated tokens, in row-major (packed) order
    response_start = starts + torch.where(first, n_prompt, 0)
    index = torch.where(cols == 0, (starts[owner] + n_prompt - 1)[rows], response_start[rows] + cols - 1)
    positions = (attn.cumsum(-1) - 1)[keep]
    mask = None
    if not first.all():  # query q sees key k <= q of its group's prompt or of its own row
        row = torch.arange(B, device=attn.device)[:, None].expand(B, attn.shape[1])[keep]
        prompt = (torch.arange(attn.shape[1], device=attn.device) < attn.shape[1] - T).expand(B, -1)[keep]
        grp, L = owner[row], len(row)
        see = (grp[:, None] == grp[None]) & (prompt[None] | (row[:, None] == row[None]))
        mask = (see & torch.ones(L, L, dtype=torch.bool, device=attn.device).tril())[None, None]
    return batch["input_ids"][keep][None], positions[None], mask, index, rows, cols


def _unpack(flat, rows, cols, shape):
    """[N] values of the response tokens back into the padded response layout [B, T] (0 on padding)."""
    return torch.zeros(shape, dtype=flat.dtype, device=flat.device).index_put((rows, cols), flat)


def micro_batches(batch, idx, budget):
    """The rows idx of batch, in order, in micro-batches of at most `budget` tokens as pack() lays them out (a
    prompt once for consecutive rows of one group; a longer sequence alone). Every rank gets as many micro-batches,
    at least one (each FSDP2 forward is a collective, so the ranks must run the same number): a rank that needs
    fewer than another halves its largest ones, and with too few rows to split (idx may be empty) it adds fillers:
    batch's first row with "mask" and "valid" zeroed and "filler" set, a pass that adds nothing to a loss."""
    attn = batch["attention_mask"][idx]
    lengths = attn.sum(-1).tolist()
    group = batch["group"][idx].tolist() if "group" in batch else range(len(lengths))
    responses = attn[:, -batch["response_ids"].shape[1]:].sum(-1).tolist() if "group" in batch else lengths
    parts, tokens = [], 0
    for k, n in enumerate(lengths):
        if parts and group[k] == group[k - 1]:
            n = responses[k]  # its prompt is already in this micro-batch
        if not parts or tokens + n > budget:
            parts.append([])
            tokens, n = 0, lengths[k]
        parts[-1].append(k)
        tokens += n
    count = torch.tensor([max(len(parts), 1)], device=batch["attention_mask"].device)
    if dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    while len(parts) < int(count) and any(len(p) > 1 for p in parts):
        j = max((j for j in range(len(parts)) if len(parts[j]) > 1), key=lambda j: sum(lengths[k] for k in parts[j]))
        parts[j:j + 1] = [parts[j][:len(parts[j]) // 2], parts[j][len(parts[j]) // 2:]]
    for part in parts:
        yield {k: v[idx[part]] for k, v in batch.items()}
    for _ in range(int(count) - len(parts)):
        filler = {k: torch.zeros_like(v[:1]) if k in ("mask", "valid") else v[:1] for k, v in batch.items()}
        yield {**filler, "filler": True}


def sync_after_backward(model, last):
    """FSDP2 between the micro-batches of one optimizer step: after the last one (or after each, when `last` is
    always True) reduce-scatter the gradients and reshard the parameters; before it keep both unsharded, so the next
    micro-batch gathers nothing (train.py's --keep-gathered). The two go together: parameters still gathered when
    the optimizer steps the shards would be stale in the next forward."""
    model.set_requires_gradient_sync(last)
    model.set_reshard_after_backward(last)


def per_micro_batch(fn, batch, budget, model):
    """fn(micro-batch) over all of batch's rows, in order, in micro_batches of `budget` tokens, concatenated: the
    forward-only passes of model (reference and old log-probs, values, PRIME's PRM). Then model's gathered
    parameters are freed: FSDP2 keeps them after each forward where train.py's --keep-gathered built it with
    reshard_after_forward=False (a no-op on shards, and without FSDP)."""
    out = [(fn(mb), mb) for mb in micro_batches(batch, torch.arange(len(batch["mask"])), budget)]
    out = torch.cat([x for x, mb in out if "filler" not in mb])
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return out


def response_logprobs(model, batch, temperature, autocast=contextlib.nullcontext(), with_entropy=False,
                      entropy_grad=False):
    """Log-probs [B, T] of the response tokens under softmax(logits / temperature) (and entropy [B, T]); 0 on
    padding. One packed forward pass (pack()); the LM head runs only on the N positions that predict a response
    token (logits_to_keep), so the only vocabulary-sized tensors are [N, V]: the logits, and their float32
    tempered copy z, which autograd keeps. log p(y) = z[y] - logsumexp(z), without a [N, V] log-softmax. The
    entropy is computed without autograd (and in chunks) unless entropy_grad: only an entropy bonus needs its
    gradient. autocast wraps the forward only; the softmax runs in float32.
    """
    ids, positions, mask, index, rows, cols = pack(batch)
    with autocast:
        logits = model(input_ids=ids, position_ids=positions, attention_mask=mask, logits_to_keep=index,
                       use_cache=False).logits[0]
    z = logits.float() if temperature == 1.0 else logits.float() / temperature
    tokens, shape = batch["response_ids"][rows, cols], batch["response_ids"].shape
    logp = _unpack(z.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(z, dim=-1), rows, cols, shape)
    if not with_entropy:
        return logp
    if entropy_grad:
        return logp, _unpack(entropy_from_logits(z), rows, cols, shape)
    with torch.no_grad():  # chunks of <= 2^26 logits: no [N, V] temporaries of the softmax
        chunk = max(1, 2**26 // z.shape[-1])
        entropy = torch.cat([entropy_from_logits(c) for c in z.detach().split(chunk)])
    return logp, _unpack(entropy, rows, cols, shape)


def critic_values(critic, batch, autocast=contextlib.nullcontext()):
    """Values [B, T] (float32) of the response tokens, 0 on padding; batch as for response_logprobs (one packed
    forward pass). The value of response token t is the critic's output at the position that predicts it, having
    seen the tokens before it: the state BEFORE the token is emitted. That is the same position as its log-prob,
    so values[:, t], logp[:, t] and mask[:, t] all refer to response token t.
    """
    ids, positions, mask, index, rows, cols = pack(batch)
    with autocast:
        out = critic(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False).logits[0, index, 0]
    return _unpack(out.float(), rows, cols, batch["response_ids"].shape)


def value_loss(values, old_values, returns, mask, clip=0.5, agg="token-mean", denom=None):
    """Clipped value loss (PPO2 / veRL): loss_tok = 0.5 * max((v - R)^2, (v_clipped - R)^2), where
    v_clipped = old + clamp(v - old, -clip, clip) keeps each update's value change within `clip` of the
    value at rollout time. stats: 'vf_clip_frac' share of valid tokens where the clip is active and the clipped
    term was larger (inside the clip v_clipped is v up to rounding: comparing the two losses alone would count
    rounding noise). agg and denom as in aggregate ('token-sum' needs denom = B * max_len here).
    """
    delta = values - old_values
    v_clipped = old_values + delta.clamp(-clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * aggregate(torch.maximum(loss_unclipped, loss_clipped), mask, agg, denom=denom)
    with torch.no_grad():
        clipped = (delta.abs() > clip) & (loss_clipped > loss_unclipped)
        stats = {"vf_clip_frac": masked_mean(clipped.float(), mask)}
    return loss, stats


# ---------------------------------------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------------------------------------
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
# The PPO step, as train.py drives it: advantages() once per batch, loss() on every micro-batch. grpo.py
# provides the same two functions; train.py picks the module with --algo. Fork here to change PPO.
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def advantages(batch, scores, args, kl_coef):
    """TinyZero's PPO advantages: k1 KL to the reference in the per-token reward (when there is a reference),
    the score on the last token, GAE over the critic's values, whitened over the batch of all ranks.

    batch: rollout.to_batch()'s, with "values" [B, T] (the critic's, computed by train.py), "old_logp" and,
    with a reference, "ref_logp". scores [B]. Adds batch["advantages"] and batch["returns"] (the critic's
    targets). Returns this rank's metrics: the rollout KL, the value mean (of all ranks), explained variance.
    """
    mask, vals = batch["mask"], batch["values"]
    kl = kl_penalty(batch["old_logp"], batch["ref_logp"], "k1") if "ref_logp" in batch else None
    adv, batch["returns"] = gae(token_rewards(scores, mask, kl, kl_coef), vals, mask, args.gamma, args.lam)
    batch["advantages"] = masked_whiten(adv, mask, all_ranks=True)
    n_and_sum = torch.stack([mask.sum(), (vals * mask).sum()]).double()
    dist.all_reduce(n_and_sum)
    n, v = n_and_sum.tolist()
    stats = {"value_mean": v / max(n, 1.0), "explained_var": explained_variance(vals, batch["returns"], mask),
             "kl_coef": kl_coef}
    if kl is not None:
        stats["kl"] = masked_mean(kl, mask).item()
    return stats


def loss(logp, values, mb, args, kl_coef, denom):
    """The clipped policy loss of a micro-batch plus the critic's clipped value loss (one backward trains both
    models: their parameters are disjoint). kl_coef is unused: PPO's KL is in the reward. Returns (loss,
    stats); stats ending in "loss" are this micro-batch's share of the mini-batch's (see aggregate)."""
    pg, stats = policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], args.clip_low, args.clip_high,
                            args.loss_agg, args.max_response_len, denom,
                            mb["sampler_logp"] if args.tis_cap else None, args.tis_cap)
    vf, vf_stats = value_loss(values, mb["values"], mb["returns"], mb["mask"], args.value_clip, args.loss_agg, denom)
    return pg + vf, {**stats, **vf_stats, "pg_loss": pg.detach(), "value_loss": vf.detach()}
