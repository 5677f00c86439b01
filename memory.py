"""The start-up memory plan of a CUDA run: bytes per rank for what train.py keeps on the GPU, against the GPU's
memory, so that a run that cannot fit stops in one line before anything is allocated (vLLM checks free memory
only when it starts, before AdamW allocates its state lazily: the shortfall would surface at the end of step 1).

Per rank, with N parameters (the critic: the backbone without the LM head, plus a value head), `world` ranks:
    weights    4 N / world        fp32 master weights, sharded by FSDP2
    optimizer  8 N / world        AdamW's two fp32 moments
    gradients  4 N / world        fp32, reduce-scattered after each micro-batch; with --keep-gathered on, 4 N
                                  (unsharded) while a mini-batch's micro-batches accumulate them without sync
    gathered   b N                with --keep-gathered on: a model's unsharded copy through each pass (the policy's;
                                  the critic's adds its own)
    reference  b N / world        frozen, in the run's dtype (b bytes a parameter), when the KL term is on
    critic     weights, optimizer and gradients of the critic as above (PPO)
    rollout    vLLM: --gpu-memory-utilization of the GPU (weights and KV cache; asleep during the update);
               hf: an unsharded copy of the policy in the run's dtype (its KV cache not counted)
Two peaks: the rollout (resident state + the rollout's share; gradients were freed by zero_grad) and the update
(resident state + gradients; vLLM sleeps). Activations are not counted: the plan is a floor, and it refuses
only runs that cannot fit even without them.
"""
import math

GIB = 2**30


def param_counts(model_path):
    """(policy, critic) parameter counts of a transformers model folder, from its config (on the meta device:
    nothing is allocated). Tied embeddings count once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return n, n - lm_head + cfg.hidden_size + 1  # the critic's value head: hidden -> 1, with a bias


def plan(n_policy, n_critic, *, world, dtype_bytes, reference, critic, unsharded_grads, rollout, vllm_share,
         device_bytes, gathered=False):
    """Bytes per rank of each part (see the module docstring) and of the two peaks; n_critic is used with critic."""
    grad_share = 1 if unsharded_grads else 1 / world
    n_c = n_critic if critic else 0
    p = {"weights": 4 * n_policy / world, "optimizer": 8 * n_policy / world, "gradients": 4 * n_policy * grad_share,
         "reference": dtype_bytes * n_policy / world if reference else 0,
         "critic": 12 * n_c / world + 4 * n_c * grad_share, "gathered": dtype_bytes * (n_policy + n_c) * gathered,
         "rollout": vllm_share * device_bytes if rollout == "vllm" else dtype_bytes * n_policy}
    resident = p["weights"] + p["optimizer"] + p["reference"] + 12 * n_c / world + p["rollout"] * (rollout == "hf")
    p["rollout_peak"] = resident + p["rollout"] * (rollout == "vllm")
    p["update_peak"] = resident + p["gradients"] + 4 * n_c * grad_share + p["gathered"]
    p["need"] = max(p["rollout_peak"], p["update_peak"])
    return p


def check(n_policy, n_critic, *, world, dtype_bytes, critic, kl_coef, rollout, vllm_share, micro_batch_tokens,
          mini_batch_tokens, device_bytes, gathered=False):
    """(the plan's line, None) when the run fits, else (the plan's line, one line naming the flags that would
    fit, each on its own). mini_batch_tokens: the most tokens a mini-batch can hold on one rank (more than
    micro_batch_tokens with --keep-gathered: the gradients accumulate unsharded over its micro-batches)."""
    def run(**kw):
        kw = {**dict(world=world, reference=kl_coef > 0, critic=critic, vllm_share=vllm_share,
                     unsharded_grads=gathered and mini_batch_tokens > micro_batch_tokens, gathered=gathered), **kw}
        return plan(n_policy, n_critic, dtype_bytes=dtype_bytes, rollout=rollout, device_bytes=device_bytes, **kw)

    p = run()
    line = (f"memory plan per rank (GiB, before activations): {', '.join(f'{k} {p[k] / GIB:.1f}' for k in p)}; "
            f"GPU {device_bytes / GIB:.1f}")
    if p["need"] <= device_bytes:
        return line, None
    fixes = []
    if gathered:
        fixes.append(("--keep-gathered off", run(gathered=False, unsharded_grads=False)))
    if p["reference"]:
        fixes.append(("--kl-coef 0", run(reference=False)))
    if p["critic"]:
        fixes.append(("--algo grpo", run(critic=False)))
    if rollout == "vllm":  # the largest share that fits, in steps of 0.05
        share = math.floor((device_bytes - p["rollout_peak"] + p["rollout"]) / device_bytes * 20) / 20
        if share >= 0.05:
            fixes.append((f"--gpu-memory-utilization {share:.2f}", run(vllm_share=share)))
    ranks = next((w for w in (2**k for k in range(1, 11)) if w > world and run(world=w)["need"] <= device_bytes), None)
    if ranks:
        fixes.append((f"{ranks} GPUs", run(world=ranks)))
    fits = [flag for flag, q in fixes if q["need"] <= device_bytes]
    return line, (f"needs {p['need'] / GIB:.1f} GiB per rank before activations, the GPU has "
                  f"{device_bytes / GIB:.1f} GiB; would fit: {' or '.join(fits) or 'none of the single changes'}")


def check_run(model_path, args, world, kl_coef, critic, dtype, device, master):
    """check() for train.py's flags on this rank's GPU (critic: the algorithm's CRITIC): rank 0 prints the plan;
    returns the failure line or None."""
    import torch
    gpu = torch.cuda.get_device_properties(device).total_memory
    line, problem = check(*param_counts(model_path), world=world, dtype_bytes=dtype.itemsize, critic=critic,
                          kl_coef=kl_coef, rollout=args.rollout, vllm_share=args.gpu_memory_utilization,
                          micro_batch_tokens=args.micro_batch_tokens, device_bytes=gpu, gathered=args.keep_gathered,
                          mini_batch_tokens=(args.mini_batch_prompts or args.batch_prompts) // world * args.group_size
                          * (args.max_prompt_len + args.max_response_len))
    if master:
        print(line, flush=True)
    return problem
