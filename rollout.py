"""Rollout: n sampled responses per prompt, with the sampler's own per-token log-probs.

Two engines behind one interface, so train.py never asks which one it has:
- "vllm": an in-process `vllm.LLM` on every rank (no server, no disk round trip). After each optimizer step
  train.py hands it the full state dict gathered from FSDP2; we reload it in place and reset the prefix
  cache (without the reset, cached prompt blocks keep the old weights' keys and values).
- "hf": transformers `generate` on a plain, unsharded copy of the policy, refreshed from the same full state
  dict. It is for machines without vLLM. (Generating with the FSDP2 module itself would deadlock: ranks
  finish their sequences after different numbers of forwards, and each forward is a collective.)

generate() returns, for prompt i and sample j, at index i * n + j:
    {"token_ids": [...], "logprobs": [...], "truncated": bool}
token_ids include the EOS token when the response ended with one (it is part of the response and of the
loss), or the tokens up to the one that completed a stop string (`stop`, as vLLM's: the string stays in the
response); truncated is True when the response hit max_tokens without either. logprobs are those of the sampled
tokens under softmax(logits / temperature), the same quantity train.py recomputes.
"""
import os
import random
import time

import numpy as np
import torch

import rewards


def engine_kwargs(cuda, tp, kv_cache_gib, gpu_memory_utilization):
    """vLLM engine arguments that depend on the machine (the rest are the same everywhere)."""
    if not cuda:
        # A fixed, small KV cache. Chunked prefill off: the CPU backend's per-request generators cannot rewind
        # the draw it discards for a partly prefilled prompt ("CPU Generator does not use offset").
        kw = dict(kv_cache_memory_bytes=int(kv_cache_gib * 2**30), enable_chunked_prefill=False)
    else:
        kw = dict(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
    if tp > 1 or cuda:
        # torchrun already started one process per GPU: vLLM's external launcher forms tensor-parallel groups
        # of consecutive ranks from that world, each on the GPU of its LOCAL_RANK (the default single-process
        # executor would put every rank's engine on GPU 0). data_parallel_size stays 1: the groups are
        # independent replicas (vLLM's "external DP", as in veRL), not one DP group that all-reduces every
        # engine step and runs dummy batches on idle ranks (that is for MoE models).
        kw.update(tensor_parallel_size=tp, data_parallel_size=1, distributed_executor_backend="external_launcher")
    return kw


def make_engine(kind, model_path, *, dtype, device, max_model_len, seed, tp=1, kv_cache_gib=0.25,
                gpu_memory_utilization=0.3):
    """Build the rollout engine. Call on every rank, after torch.distributed is initialised."""
    if kind == "vllm":
        # In-process engine: no worker processes, so it shares this rank's process group and memory.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except ImportError as e:
            raise SystemExit(f"--rollout vllm: vllm is not importable ({e}); install it (./setup.sh) "
                             "or use --rollout hf") from e
        cuda = device.type == "cuda"
        kw = engine_kwargs(cuda, tp, kv_cache_gib, gpu_memory_utilization)
        # LLM(seed=...) reseeds python's, numpy's and torch's global generators: put back the trainer's (a resumed
        # run restored them from its checkpoint just before). Sampling does not read them: see request_seeds.
        state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                 torch.cuda.get_rng_state(device) if cuda else None)
        llm = vllm.LLM(model=model_path, dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype],
                       seed=seed, max_model_len=max_model_len, enforce_eager=not cuda,
                       # processed = after temperature (and top-p): the distribution we sampled from.
                       logprobs_mode="processed_logprobs", enable_prefix_caching=True, **kw)
        random.setstate(state[0]), np.random.set_state(state[1]), torch.set_rng_state(state[2])
        if cuda:
            torch.cuda.set_rng_state(state[3], device)
        return {"kind": "vllm", "llm": llm, "tp": tp, "cuda": cuda, "dtype": dtype}
    if kind == "hf":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        return {"kind": "hf", "model": model}
    raise ValueError(f"unknown rollout engine {kind!r}; known: vllm, hf")


def generate(engine, prompts, *, n, temperature, top_p, max_tokens, seed, eos_token_id, pad_token_id, stop=(),
             tokenizer=None):
    """Sample n responses for each prompt (a list of token-id lists). temperature 0 means greedy (n=1). A response
    also ends where its text first contains one of the `stop` strings (the hf engine decodes with `tokenizer`)."""
    if temperature == 0 and n != 1:
        raise ValueError("greedy decoding (temperature 0) gives n identical samples: use n=1")
    if engine.get("asleep"):  # on GPU vLLM would wait forever on its paused scheduler: fail here, on CPU too
        raise RuntimeError("rollout.generate: the engine is asleep (rollout.sleep); rollout.sync_weights wakes it")
    if engine["kind"] == "vllm":
        return _generate_vllm(engine, prompts, n, temperature, top_p, max_tokens, seed, list(stop))
    return _generate_hf(engine["model"], prompts, n, temperature, top_p, max_tokens, seed,
                        eos_token_id, pad_token_id, list(stop), tokenizer)


def sample_and_score(engine, tokenizer, rows, prompts, *, n, temperature, top_p, max_tokens, seed, stop=()):
    """A rollout with its rewards: generate() n responses per prompt, decode them, score each against its row
    (rewards.score). Returns (samples, texts, scores, seconds spent decoding and scoring)."""
    eos = tokenizer.eos_token_id
    samples = generate(engine, prompts, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                       eos_token_id=eos, pad_token_id=eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
                       stop=stop, tokenizer=tokenizer)
    t = time.time()
    texts = tokenizer.batch_decode([s["token_ids"] for s in samples], skip_special_tokens=True)
    scores = [rewards.score(rows[k // n], text) for k, text in enumerate(texts)]
    return samples, texts, scores, time.time() - t


def batch_indices(n_rows, step, seed, batch_prompts, rank, world):
    """This rank's row indices at a step: a fresh permutation of the n_rows train rows each epoch, by seed. A function
    of (seed, step) alone, so resuming at step N replays the same data order."""
    epoch, k = divmod(step, n_rows // batch_prompts)
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    start = k * batch_prompts + rank * (batch_prompts // world)
    return order[start:start + batch_prompts // world].tolist()


def sample_rows(engine, tokenizer, split, idx, args, seed):
    """args.group_size responses to each of the rows idx of split (data.Split), scored: (prompts, samples, scores,
    seconds spent scoring)."""
    rows, prompts = split.batch(idx, tokenizer)
    samples, _, scores, seconds = sample_and_score(
        engine, tokenizer, rows, prompts, n=args.group_size, temperature=args.temperature, top_p=args.top_p,
        max_tokens=args.max_response_len, seed=seed, stop=args.stop)
    return prompts, samples, scores, seconds


def has_signal(scores, group_size):
    """DAPO's dynamic-sampling filter: [n_groups] bool, True where a group's scores are not all equal (a flat
    group's advantages are 0 for GRPO and RLOO: it spends compute and teaches nothing)."""
    groups = torch.as_tensor(scores, dtype=torch.float32).view(-1, group_size)
    return groups.max(-1).values != groups.min(-1).values


def pick_groups(scores, group_size, want):
    """DAPO's dynamic sampling, the choice among the groups sampled: the first `want` groups with signal, then flat
    ones to fill the batch if too few have it. Returns (the chosen group indices in sampling order, how many of them
    are flat)."""
    signal = has_signal(scores, group_size).tolist()
    chosen = sorted(([g for g, s in enumerate(signal) if s] + [g for g, s in enumerate(signal) if not s])[:want])
    return chosen, sum(not signal[g] for g in chosen)


def rollout_step(engine, tokenizer, split, step, args, rank, world):
    """Collective: train.py's phase 1 on this rank, its prompts of the step sampled and scored. --dynamic-sampling
    (DAPO): while any rank has fewer groups of unequal scores than prompts, up to that many extra rounds, sample as
    many new prompts as are missing (a rank that is not short samples one: the ranks sample in lockstep, as a
    tensor-parallel engine must), then keep groups with signal first (pick_groups). Each round's seed is its own.
    Returns (prompts, samples, scores, seconds spent scoring, stats: none without --dynamic-sampling)."""
    seed = args.seed + 10**6 * step + 10**4 * rank  # + the round
    idx = batch_indices(len(split), step, args.seed, args.batch_prompts, rank, world)
    prompts, samples, scores, seconds = sample_rows(engine, tokenizer, split, idx, args, seed)
    want, rounds, extra = len(prompts), 0, 0
    while rounds < args.dynamic_sampling:
        n_signal = int(has_signal(scores, args.group_size).sum())
        short = torch.tensor([float(n_signal < want)],
                             device="cuda" if torch.cuda.is_available() else "cpu")  # nccl reduces CUDA tensors
        torch.distributed.all_reduce(short, op=torch.distributed.ReduceOp.MAX)
        if not short.item():
            break
        rounds += 1
        k = max(1, want - n_signal)
        more = np.random.default_rng([args.seed, step, rank, rounds]).choice(len(split), k).tolist()
        more_prompts, more_samples, more_scores, more_seconds = sample_rows(engine, tokenizer, split, more, args,
                                                                           seed + rounds)
        prompts, samples, scores = prompts + more_prompts, samples + more_samples, scores + more_scores
        seconds, extra = seconds + more_seconds, extra + k
    if not args.dynamic_sampling:
        return prompts, samples, scores, seconds, {}
    chosen, n_flat = pick_groups(scores, args.group_size, want)
    rows = [g * args.group_size + j for g in chosen for j in range(args.group_size)]
    return [prompts[g] for g in chosen], [samples[i] for i in rows], [scores[i] for i in rows], seconds, \
        {"dynamic_rounds": rounds, "dynamic_prompts": extra, "dynamic_flat_kept": n_flat}


def _generate_vllm(engine, prompts, n, temperature, top_p, max_tokens, seed, stop):
    import vllm
    tp = engine["tp"]
    if tp > 1:
        # The ranks of one tensor-parallel group run one model: they must submit the same requests.
        # Each rank brings its own prompts; the group generates the union and each keeps its own share.
        # They must also sample alike: the group uses its first rank's seed.
        gathered = [None] * tp
        torch.distributed.all_gather_object(gathered, (prompts, seed), group=_tp_group(tp))
        own = torch.distributed.get_rank() % tp
        offset = sum(len(p) for p, _ in gathered[:own])
        seed = gathered[0][1]
        gathered = [p for p, _ in gathered]
        prompts = [p for chunk in gathered for p in chunk]
    # One seed per request, a function of (seed, prompt index): the samples are a function of (seed, weights,
    # prompts) whatever the state of the global generators, so a resumed run replays exactly. (Without it,
    # CUDA vLLM's runner draws each request's seed from numpy's global state.)
    # Stop strings are matched on vLLM's own detokenized text: detokenize only when there are some.
    params = [vllm.SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
                                  detokenize=bool(stop), stop=stop or None, include_stop_str_in_output=True, seed=s)
              for s in request_seeds(seed, len(prompts))]
    outs = engine["llm"].generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    samples = []
    for out in outs:
        for c in sorted(out.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            samples.append({"token_ids": ids, "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, ids)],
                            "truncated": c.finish_reason == "length"})
    if tp > 1:
        n_own = len(gathered[own]) * n
        samples = samples[offset * n: offset * n + n_own]
    return samples


def request_seeds(seed, n_prompts):
    """vLLM's seed for each prompt of a generate call. vLLM seeds sample j of a prompt seeded s with s + j, so
    the prompts' seeds are hashed from (seed, prompt index) into [0, 2**62), far apart: no two samples of a run
    share a seed (train.py's seed already differs by step and rank)."""
    return [int(np.random.SeedSequence([seed % 2**63, i]).generate_state(1, np.uint64)[0] >> 2)
            for i in range(n_prompts)]


_TP_GROUPS = {}


def _tp_group(tp):
    """The process group of this rank's tensor-parallel peers (consecutive ranks), made once."""
    if tp not in _TP_GROUPS:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        for start in range(0, world, tp):  # every rank must create every group, in the same order
            g = torch.distributed.new_group(list(range(start, start + tp)))
            if start <= rank < start + tp:
                _TP_GROUPS[tp] = g
    return _TP_GROUPS[tp]


@torch.no_grad()
def _generate_hf(model, prompts, n, temperature, top_p, max_tokens, seed, eos_token_id, pad_token_id, stop,
                 tokenizer):
    from transformers import LogitsProcessorList, StoppingCriteriaList
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    # Left padding, so every prompt ends where generation starts.
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    greedy = temperature == 0
    scale = 1.0 if greedy else temperature
    # The sampled tokens' log-probs under log_softmax(logits / temperature), the trainer's quantity, taken
    # step by step: generate's raw logits are offered to our processor before its temperature and top-p
    # warpers; the token sampled from them shows up as the last input id of the next call (or, for the last
    # step, in the output). One fp32 [batch, vocab] tensor at a time, not the stack of all steps that
    # output_logits keeps (0.6 GB per sequence of 1,024 tokens with Qwen's 151,936-token vocabulary).
    steps, last = [], []

    def record(input_ids, logits):
        if last:
            steps.append(last.pop().gather(-1, input_ids[:, -1:]).squeeze(-1))
        last.append(torch.log_softmax(logits.float() / scale, dim=-1))
        return logits

    # Stop strings: after each token, the tail of each running response is decoded (enough tokens to hold the
    # longest string); a response that now contains one ends here: stopped_at[i] = its length.
    stopped_at, window = {}, max((len(s) for s in stop), default=0) + 4

    def stopped(input_ids, scores, **kwargs):
        for i, row in enumerate(input_ids[:, width:].tolist()):
            if i not in stopped_at and any(s in tokenizer.decode(row[-window:], skip_special_tokens=True)
                                           for s in stop):
                stopped_at[i] = len(row)
        return torch.tensor([i in stopped_at for i in range(len(input_ids))], device=input_ids.device)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # keep the trainer's RNG
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=not greedy,
                             temperature=None if greedy else temperature, top_p=None if greedy else top_p,
                             top_k=None, max_new_tokens=max_tokens, num_return_sequences=n,
                             eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                             logits_processor=LogitsProcessorList([record]),
                             stopping_criteria=StoppingCriteriaList([stopped] if stop else []))
    steps.append(last.pop().gather(-1, out[:, -1:]).squeeze(-1))
    new = out[:, width:].cpu()
    logp = torch.stack(steps, dim=1).cpu()
    samples = []
    for i, (row, lp) in enumerate(zip(new.tolist(), logp.tolist())):
        end = min(row.index(eos_token_id) + 1 if eos_token_id in row else len(row), stopped_at.get(i, len(row)))
        samples.append({"token_ids": row[:end], "logprobs": lp[:end],
                        "truncated": eos_token_id not in row[:end] and i not in stopped_at})
    return samples


def to_batch(prompts, samples, n, pad_id, device, mask_truncated=False):
    """generate()'s output as padded tensors (the trainer's passes drop the padding again: passes.pack).

    input_ids [B, P + T]: prompt i (left-padded to P) followed by each of its n responses (right-padded to T).
    mask [B, T]: 1.0 on the response tokens that enter the loss (EOS included; with mask_truncated, none of a
    truncated response). valid [B, T]: 1.0 on every generated token. sampler_logp [B, T]: the engine's own
    log-probs, kept to check them against the trainer's. group [B]: the prompt of each row (pack() lays a
    prompt out once for the consecutive rows of its group).
    """
    P = max(len(q) for q in prompts)
    T = max(1, max(len(s["token_ids"]) for s in samples))
    B = len(samples)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    mask, valid, sampler_logp = torch.zeros((B, T)), torch.zeros((B, T)), torch.zeros((B, T))
    for k, s in enumerate(samples):
        q, r = prompts[k // n], s["token_ids"]
        ids[k, P - len(q):P], attn[k, P - len(q):P] = torch.tensor(q), 1
        if r:
            ids[k, P:P + len(r)], attn[k, P:P + len(r)] = torch.tensor(r), 1
            sampler_logp[k, :len(r)] = torch.tensor(s["logprobs"])
        valid[k, :len(r)] = 1.0
        if not (mask_truncated and s["truncated"]):
            mask[k, :len(r)] = 1.0
    batch = {"input_ids": ids, "attention_mask": attn, "response_ids": ids[:, P:], "mask": mask, "valid": valid,
             "sampler_logp": sampler_logp, "group": torch.arange(B) // n}
    return {k: v.to(device) for k, v in batch.items()}


def full_weights(model, dtype):
    """(name, full tensor) pairs of an FSDP2 model, gathered one parameter at a time and cast to dtype.

    A generator: at most one unsharded parameter exists at a time, not a whole fp32 state dict (28 GB for a
    7B model). Collective: every rank must consume it, in the same order."""
    for name, t in model.state_dict().items():
        yield name, (t.full_tensor() if hasattr(t, "full_tensor") else t).to(dtype)


def sync_weights(engine, model):
    """Copy the trainer's weights into the engine and wake it: the one way back from sleep(). Collective: every rank
    calls it after each step, also after one whose updates were all skipped (sleep dropped the engine's weights)."""
    engine["asleep"] = False
    if engine["kind"] == "hf":  # in place, one gathered parameter at a time
        own = engine["model"].state_dict()
        for name, t in full_weights(model, engine["model"].dtype):
            own[name].copy_(t)
        return
    llm = engine["llm"]
    if engine["cuda"]:
        llm.wake_up(tags=["weights"])  # weights first, the KV cache after the reload
    # In place, streaming the gathered parameters straight into the engine's own buffers (in-process engine,
    # so the generator crosses no process boundary).
    llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=full_weights(model, engine["dtype"])))
    if engine["cuda"]:
        llm.wake_up(tags=["kv_cache"])
    llm.reset_prefix_cache()  # cached prompt blocks hold keys/values computed with the old weights


def close(engine):
    """Shut the vLLM engine down while the process group it shares still exists."""
    if engine["kind"] == "vllm":
        engine["llm"].llm_engine.engine_core.shutdown()


def sleep(engine):
    """On GPU, free the engine's memory (weights and KV cache) for training; sync_weights wakes it. The engine is
    marked asleep everywhere (vLLM's sleep is a no-op on CPU), so that generate() refuses it on CPU as on GPU."""
    engine["asleep"] = True
    if engine["kind"] == "vllm" and engine["cuda"]:
        engine["llm"].sleep(level=2)  # level 2 drops the weights too: sync_weights reloads them anyway
