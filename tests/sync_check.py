"""Weight-sync check, run by tests/test_sync.py under torchrun (2 ranks, gloo, CPU):

    torchrun --nproc_per_node=2 tests/sync_check.py {vllm,hf} MODEL_DIR

On every rank: a float32 policy sharded with FSDP2 (as train.py shards it) and a rollout engine built by
rollout.make_engine. Checks, each a max abs difference of per-token log-probs over the generated tokens:
  1. fresh:  the engine's own sampling log-probs vs the trainer's, same weights         -> < TOL
  2. one optimizer step on the policy, no sync yet: the engine's log-probs of the same tokens vs the
     trainer's new ones                                                                 -> > MIN_CHANGE
     (the step moved the weights enough that a missing sync would show)
  3. rollout.sync_weights: the engine's log-probs of the same tokens vs the trainer's     -> < TOL
  4. after the sync, sample anew from the same (long, prefix-cached) prompts: the engine's sampling
     log-probs vs the trainer's on the new samples                                      -> < TOL
     (a stale prefix cache would keep the old weights' keys and values for the prompt)
The engine's log-probs of given tokens come from vLLM's prompt_logprobs (raw, temperature 1.0, hence
temperature 1.0 throughout), or, for the "hf" engine, from its own unsharded model.
Rank 0 prints one line `SYNC_RESULT {json}` with the numbers (max over ranks); exit code 1 on failure.
"""
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine, before vllm is imported
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

import data  # noqa: E402
import passes  # noqa: E402
import pretrain  # noqa: E402
import rollout  # noqa: E402

TOL = 1e-4          # float32: sampler and trainer agree to ~1e-6
MIN_CHANGE = 1e-3   # what the optimizer step must move the log-probs by
TEMPERATURE = 1.0   # vLLM's prompt_logprobs are raw (temperature 1)
N = 2               # samples per prompt
MAX_TOKENS = 12


def engine_logprobs(engine, batch, prompts, samples):
    """The engine's current log-probs [B, T] of the responses already in batch (0 on padding)."""
    if engine["kind"] == "hf":
        with torch.no_grad():
            return passes.response_logprobs(engine["model"], batch, TEMPERATURE) * batch["valid"]
    import vllm
    out = torch.zeros_like(batch["valid"])
    reqs = [{"prompt_token_ids": prompts[k // N] + s["token_ids"]} for k, s in enumerate(samples)]
    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
    for k, (req, res) in enumerate(zip(reqs, engine["llm"].generate(reqs, params, use_tqdm=False))):
        ids, plp = req["prompt_token_ids"], res.prompt_logprobs  # plp[i]: {token_id: Logprob} for ids[i]
        assert len(plp) == len(ids) and plp[0] is None
        P = len(prompts[k // N])
        for t, tok in enumerate(samples[k]["token_ids"]):
            out[k, t] = plp[P + t][tok].logprob
    return out


def main():
    kind, path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0 and not os.path.exists(path):
        pretrain.build_tiny_model(path, seed=0)
    dist.barrier()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    eos_id, pad_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    policy.config.use_cache = False
    mesh = init_device_mesh("cpu", (world,))
    for layer in policy.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)

    # Real Countdown prompts (~560 tokens each: several full prefix-cache blocks), different on each rank.
    rows, _ = data.make_splits("countdown", 4, 1, seed=0, num_counts=(3,), num_range=(1, 20),
                               target_range=(10, 50))
    prompts = [tok(data.prompt_text(r), add_special_tokens=False)["input_ids"] for r in rows[2 * rank:2 * rank + 2]]
    max_len = max(map(len, prompts)) + MAX_TOKENS + 8
    engine = rollout.make_engine(kind, path, dtype=torch.float32, device=torch.device("cpu"),
                                 max_model_len=max_len, seed=0)

    def sample(seed):
        samples = rollout.generate(engine, prompts, n=N, temperature=TEMPERATURE, top_p=1.0,
                                   max_tokens=MAX_TOKENS, seed=seed, eos_token_id=eos_id, pad_token_id=pad_id)
        return samples, rollout.to_batch(prompts, samples, N, pad_id, torch.device("cpu"))

    def trainer_logprobs(batch):
        with torch.no_grad():
            return passes.response_logprobs(policy, batch, TEMPERATURE) * batch["valid"]

    def gap(a, b, batch):
        return ((a - b).abs() * batch["valid"]).max().item()

    res = {}
    samples, batch = sample(seed=100 + rank)
    res["tokens"] = batch["valid"].sum().item()
    res["fresh_sampler_vs_trainer"] = gap(batch["sampler_logp"], trainer_logprobs(batch), batch)
    res["fresh_engine_vs_trainer"] = gap(engine_logprobs(engine, batch, prompts, samples),
                                         trainer_logprobs(batch), batch)

    # One optimizer step that moves every weight: Adam's first step is ~lr * sign(grad).
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    logp = passes.response_logprobs(policy, batch, TEMPERATURE)
    (-(logp * batch["valid"]).sum() / batch["valid"].sum()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    new = trainer_logprobs(batch)
    res["stale_engine_vs_trainer"] = gap(engine_logprobs(engine, batch, prompts, samples), new, batch)

    rollout.sync_weights(engine, policy)
    res["synced_engine_vs_trainer"] = gap(engine_logprobs(engine, batch, prompts, samples), new, batch)
    samples2, batch2 = sample(seed=200 + rank)  # the same prompts: their blocks were cached before the sync
    res["synced_sampler_vs_trainer"] = gap(batch2["sampler_logp"], trainer_logprobs(batch2), batch2)

    keys = sorted(res)
    t = torch.tensor([res[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    res = dict(zip(keys, t.tolist()))
    ok = (res["tokens"] > 0 and res["fresh_sampler_vs_trainer"] < TOL and res["fresh_engine_vs_trainer"] < TOL
          and res["stale_engine_vs_trainer"] > MIN_CHANGE and res["synced_engine_vs_trainer"] < TOL
          and res["synced_sampler_vs_trainer"] < TOL)
    if rank == 0:
        print("SYNC_RESULT " + json.dumps({"kind": kind, "ok": ok, **res}), flush=True)
    rollout.close(engine)
    if dist.is_initialized():  # vLLM's shutdown may already have destroyed the group it shares
        dist.barrier()  # no rank tears gloo down while its peer still talks to it (a rare abort at exit)
        dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
