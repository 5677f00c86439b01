"""The trainer's passes, shared by every algorithm and forked by none: a loaded model made ready (prepare), a
micro-batch's sequences packed end to end (pack), micro-batches that every rank runs as many of (micro_batches),
FSDP2's two toggles between them (sync_after_backward), the log-prob and entropy pass (response_logprobs, its LM head
in chunks recomputed in backward: _HeadLogprobs) and the critic's value pass (critic_values), each also forward only
over a whole batch (batch_logprobs, batch_values), and the update's statistics (Tally).

Tensors are response-only [B, T] (B sequences, T = padded response length) unless said otherwise, as in ppo.py.
"""
import contextlib
import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule


def prepare(model, trainable, grad_checkpointing=False):
    """A loaded model as the trainer runs it: no KV cache; trainable in train mode (transformers' checkpointed layers
    recompute only when self.training: from_pretrained returns eval mode; Qwen's dropout is 0, so nothing else
    changes) with --grad-checkpointing's recomputation; frozen (the reference) in eval mode without gradients."""
    model.config.use_cache = False
    if not trainable:
        return model.requires_grad_(False).eval()
    if grad_checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


def entropy_from_logits(logits):
    """Entropy [B, T] of softmax(logits [B, T, V]): logsumexp(z) - sum softmax(z) * z.

    z = logits - max first: entropy is shift-invariant, and without the shift the two terms are both ~max(logits)
    and their difference loses precision (float32 at 1000 resolves only ~6e-5). Computed in the logits' dtype:
    pass float32 logits when bf16 precision matters.
    """
    z = logits - logits.max(dim=-1, keepdim=True).values.detach()
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)


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


def _whole_batch(fn, model, batch, budget):
    """fn(micro-batch) over all of batch's rows, in order, in micro_batches of `budget` tokens, concatenated. Then
    model's gathered parameters are freed: FSDP2 keeps them after each forward where train.py's --keep-gathered built
    it with reshard_after_forward=False (a no-op on shards, and without FSDP)."""
    out = [(fn(mb), "filler" in mb) for mb in micro_batches(batch, torch.arange(len(batch["mask"])), budget)]
    out = torch.cat([x for x, filler in out if not filler])
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return out


@torch.no_grad()
def batch_logprobs(model, batch, budget, temperature, autocast=contextlib.nullcontext()):
    """response_logprobs of the whole batch [B, T], forward only, in micro-batches of `budget` tokens: the old
    policy's and the reference's log-probs before the update, PRIME's PRM after its step."""
    return _whole_batch(lambda mb: response_logprobs(model, mb, temperature, autocast), model, batch, budget)


@torch.no_grad()
def batch_values(critic, batch, budget, autocast=contextlib.nullcontext()):
    """critic_values of the whole batch [B, T], forward only, in micro-batches of `budget` tokens."""
    return _whole_batch(lambda mb: critic_values(critic, mb, autocast), critic, batch, budget)


class _HeadLogprobs(torch.autograd.Function):
    """The LM head and the log-probs of given tokens (and the entropy) from hidden states [N, H], in chunks of rows,
    recomputed in backward: no [N, V] tensor is kept for backward, only the hidden states (the weight is the
    model's). Each chunk is what the plain path computes on its rows, so one chunk (N * V <= CHUNK_LOGITS: every
    CPU run of ours) gives the plain path's numbers to the bit; more chunks sum the weight's gradient in parts."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, with_entropy):
        # the chunk's logits under the forward's autocast (CPU bf16), repeated in backward
        ctx.autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        ctx.temperature, ctx.with_entropy, ctx.has_bias = temperature, with_entropy, bias is not None
        ctx.save_for_backward(hidden, weight, bias, tokens)
        out = torch.zeros(len(hidden), 2, device=hidden.device)  # [N, 2]: log-prob, entropy
        for rows, logits in _head_chunks(hidden, weight, bias, ctx.autocast):
            z = logits.float() if temperature == 1.0 else logits.float() / temperature  # [n, V]
            out[rows, 0] = z.gather(-1, tokens[rows, None])[:, 0] - torch.logsumexp(z, dim=-1)
            if with_entropy:
                out[rows, 1] = entropy_from_logits(z)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, tokens = ctx.saved_tensors
        grad_hidden, grad_weight = torch.zeros_like(hidden), torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if ctx.has_bias else None
        for rows, logits in _head_chunks(hidden, weight, bias, ctx.autocast):
            with torch.enable_grad():  # d out / d logits by autograd on the chunk alone, as the plain path's
                logits = logits.detach().requires_grad_()
                z = logits.float() if ctx.temperature == 1.0 else logits.float() / ctx.temperature
                logp = z.gather(-1, tokens[rows, None])[:, 0] - torch.logsumexp(z, dim=-1)
                value = (logp * grad_out[rows, 0]).sum()
                if ctx.with_entropy and grad_out[rows, 1].any():
                    value = value + (entropy_from_logits(z) * grad_out[rows, 1]).sum()
                (grad_logits,) = torch.autograd.grad(value, logits)                      # [n, V]
            grad_hidden[rows] = grad_logits.mm(weight).to(hidden.dtype)                    # [n, H]
            grad_weight += grad_logits.t().mm(hidden[rows].to(grad_logits.dtype)).float()  # [V, H]
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias, None, None, None


CHUNK_LOGITS = 2**26  # logits a chunk of the LM head holds (256 MiB in float32)


def _head_chunks(hidden, weight, bias, autocast):
    """(row indices, logits [n, V]) of hidden's rows in chunks of at most CHUNK_LOGITS logits, under autocast."""
    n = max(1, CHUNK_LOGITS // weight.shape[0])
    for start in range(0, len(hidden), n):
        rows = torch.arange(start, min(start + n, len(hidden)), device=hidden.device)
        with contextlib.ExitStack() as stack:
            for device, dtype in autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            yield rows, torch.nn.functional.linear(hidden[start:start + n], weight, bias)


@contextlib.contextmanager
def _head_returns_logprobs(model, tokens, temperature, with_entropy):
    """Within: model's LM head computes no logits; it returns _HeadLogprobs of its input instead ([1, N, 2]). Hooks,
    not a new module, so that FSDP2 gathers the head's weight as for any forward and the model's state is as it was."""
    head, hidden = model.get_output_embeddings(), []

    def take_hidden(module, args):
        hidden.append(args[0])
        return (args[0][:, :0],)  # the head's own matmul on no rows

    def logprobs(module, args, output):
        out = _HeadLogprobs.apply(hidden.pop()[0], module.weight, module.bias, tokens, temperature, with_entropy)
        return out[None]

    handles = [head.register_forward_pre_hook(take_hidden), head.register_forward_hook(logprobs)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def response_logprobs(model, batch, temperature, autocast=contextlib.nullcontext(), with_entropy=False,
                      entropy_grad=False):
    """Log-probs [B, T] of the response tokens under softmax(logits / temperature) (and entropy [B, T]); 0 on
    padding. One packed forward pass (pack()); the LM head runs only on the N positions that predict a response
    token (logits_to_keep), in chunks of rows that backward recomputes (_HeadLogprobs): no [N, V] tensor is kept
    for backward (8192 tokens x Qwen's 151,936 would be 4.6 GiB in float32). log p(y) = z[y] - logsumexp(z), z
    the float32 logits / temperature. The entropy carries a gradient only with entropy_grad (an entropy bonus).
    autocast wraps the forward (and the head's recomputation); the softmax runs in float32.
    """
    ids, positions, mask, index, rows, cols = pack(batch)
    tokens, shape = batch["response_ids"][rows, cols], batch["response_ids"].shape
    with autocast, _head_returns_logprobs(model, tokens, temperature, with_entropy):
        out = model(input_ids=ids, position_ids=positions, attention_mask=mask, logits_to_keep=index,
                    use_cache=False).logits[0]                                                  # [N, 2]
    logp = _unpack(out[:, 0], rows, cols, shape)
    if not with_entropy:
        return logp
    return logp, _unpack(out[:, 1] if entropy_grad else out[:, 1].detach(), rows, cols, shape)


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


class Tally:
    """The update's statistics over micro-batches, then over ranks: weighted means (a sum of value x weight and a sum
    of weights), and maxima for the keys that end in "_max" (a mean of maxima would hide the largest one)."""

    def __init__(self):
        self.sums, self.weights, self.maxima = {}, {}, {}

    def add(self, key, value, weight=1.0):
        """One value of key: toward its weighted mean, or its maximum."""
        if key.endswith("_max"):
            self.maxima[key] = max(self.maxima.get(key, -math.inf), float(value))
        else:
            self.add_sum(key, float(value) * weight, weight)

    def add_sum(self, key, total, count):
        """A sum of count values of key at once (a mean's numerator and denominator)."""
        self.sums[key], self.weights[key] = self.sums.get(key, 0.0) + float(total), self.weights.get(key, 0.0) + count

    def over_ranks(self, allreduce):
        """The means and maxima over all ranks (every rank adds the same keys); a mean of weight 0 is left out (a
        step on which no row was trained has no entropy)."""
        sums = allreduce({**{"sum " + k: v for k, v in self.sums.items()},
                          **{"weight " + k: v for k, v in self.weights.items()}})
        means = {k: sums["sum " + k] / sums["weight " + k] for k in self.sums if sums["weight " + k]}
        return {**means, **allreduce(self.maxima, op=dist.ReduceOp.MAX)}
