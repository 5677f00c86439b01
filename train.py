"""RL with rule-based rewards on Countdown and multiplication, top to bottom.

    torchrun --nproc_per_node=2 train.py                       # built-in default: assets/countdown-base, CPU
    torchrun --nproc_per_node=8 train.py --model /models/Qwen2.5-3B --data data/countdown --algo ppo
    torchrun --nproc_per_node=2 train.py --algo my_ppo.py      # your copy of ppo.py (its docstring: the contract)

Each step: every rank samples its share of the batch's prompts, generates --group-size responses per prompt
(rollout.py) and scores them (rewards.py); the algorithm (--algo: a module, ppo.py or grpo.py and its siblings)
turns scores into advantages; the update runs the algorithm's loss over packed micro-batches (passes.py); the new
weights go into the rollout engine. The policy (and reference, and critic) are sharded with FSDP2.
"""
import json
import math
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import aha
import checkpoint
import cli
import data
import evaluate
import flags
import logs
import memory
import passes
import pretrain
import rollout


args = flags.parse(__doc__)
algo = flags.load_algorithm(args.algo)  # all the loop knows of the algorithm: flags.CONTRACT's names
die = flags.die  # one clear line, then exit

# ----------------------------------------------------------------------------------------------------------
# process group: torchrun sets RANK/WORLD_SIZE; plain `python train.py` runs as a world of one
if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: die with it (a kill -9 of it leaves no orphans)
    checkpoint.exit_with_parent()
if "RANK" not in os.environ:  # plain `python train.py`: a world of one
    cli.world_of_one()
T_START = time.time()
rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
master = rank == 0
cuda = torch.cuda.is_available()
device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
dtype = torch.bfloat16 if args.dtype == "bfloat16" or (args.dtype == "auto" and cuda) else torch.float32
if args.micro_batch_tokens == "auto":  # CPU: short rows, see README
    args.micro_batch_tokens = 8192 if cuda else 384
args.keep_gathered = args.keep_gathered == "on" or (args.keep_gathered == "auto" and not cuda)

# ----------------------------------------------------------------------------------------------------------
# check the input before anything heavy: each problem is one line, before any model loads
mini_batch_prompts = args.mini_batch_prompts or args.batch_prompts
for bad, msg in (
    (args.batch_prompts % world, f"--batch-prompts {args.batch_prompts} does not split over {world} ranks"),
    (args.batch_prompts % mini_batch_prompts or mini_batch_prompts % world, f"--mini-batch-prompts "
     f"{mini_batch_prompts} must divide --batch-prompts {args.batch_prompts} and split over {world} ranks"),
    (args.dynamic_sampling and args.group_size < 2, "--dynamic-sampling drops groups of equal scores: a group of one"),
    (0 < args.tis_cap <= 1, f"--tis-cap {args.tis_cap:g} must be > 1 (min(ratio, cap) <= 1 only ever down-weighs)"),
    (args.tis_cap and args.top_p < 1, "--tis-cap with --top-p < 1: the trainer's log-probs leave the nucleus out"),
    (world % args.rollout_tp, f"--rollout-tp {args.rollout_tp} must divide the number of ranks {world}"),
    (args.temperature == 0 and args.group_size > 1, "--temperature 0 is greedy: the same response n times"),
    ("" in args.stop, "--stop '': an empty string is in every text: each response would end at its first token"),
    (True, algo.check(args)),  # the algorithm's own problem, or None (GRPO: a group of one has no baseline)
):
    if bad and msg:
        die(msg)
try:
    os.makedirs(args.out, exist_ok=True)
except OSError as e:
    die(f"--out {args.out!r}: cannot make the folder ({e.strerror})")

if cuda:
    torch.cuda.set_device(device)
dist.init_process_group("nccl" if cuda else "gloo")  # the backend's default timeout (NCCL: 10 minutes), except in
disk_waits = dist.new_group(timeout=checkpoint.SAVE_TIMEOUT)  # the collectives that wait on rank 0's disk
mesh = init_device_mesh(device.type, (world,))
ckpt_root, metrics_path = os.path.join(args.out, "checkpoints"), os.path.join(args.out, "metrics.jsonl")


def once_per_node(make):
    """make() on rank 0, then on the local rank 0 of each other node, one after the other: never two writers. Where
    OUT is node-local, make() writes each node's copy; where it is shared, make() finds rank 0's and skips."""
    for my_turn in (master, local_rank == 0 and not master):
        if my_turn:
            make()
        dist.barrier()


# Rank 0 locks OUT for the run's life (one trainer per OUT) and, with --resume, picks the newest whole checkpoint
# of this run; every rank learns the outcome before anything heavy happens.
claim = [checkpoint.claim(args.out, vars(args), flags.RUN_DEFINING) if master else None]
dist.broadcast_object_list(claim, src=0, group=disk_waits)  # rank 0 may hash a large checkpoint meanwhile
problem, resume_dir, start_step = claim[0]
if problem:
    die(problem)
if resume_dir and start_step == args.steps:
    if master:
        print(f"train.py: {resume_dir} is step {start_step} of --steps {args.steps}: nothing left to do")
    sys.exit(0)
# A model made by pretrain.py says what it was pretrained on: the tasks to generate, and our small-model defaults.
made = os.path.join(args.model, "pretrain.json")
pretrained = json.load(open(made))["args"] if os.path.isfile(made) else None
data_dir = args.data or os.path.join(args.out, "data")  # the default data: made once per node, in OUT/data
model_path = os.path.join(args.out, "tiny_model") if args.model == "tiny" else args.model
if not args.data:
    once_per_node(lambda: data.default_splits(data_dir, args.seed, pretrained))  # skipped where it exists
try:  # every rank holds every row, compactly; the first problem of any rank (nodes can differ) stops them all
    train, test = (data.Split(data.find_split(data_dir, split)) for split in ("train", "test"))
    problem = resume_dir and not os.path.isdir(resume_dir) and f"--resume: {resume_dir} is not on this node (rank 0 " \
        "writes checkpoints into its own --out): give every node one shared --out, or copy it to each"
except (FileNotFoundError, ValueError) as e:
    problem = f"--data {data_dir!r}: {e}"
if args.model != "tiny" and (why := checkpoint.model_problem(args.model)):  # named first
    problem = f"--model {args.model!r} {why}; give a local transformers folder or 'tiny'"
dist.all_gather_object(found := [None] * world, problem and f"rank {rank} ({os.uname()[1]}): " * (rank > 0) + problem)
if any(found):
    die(next(filter(None, found)))
if args.model == "tiny":  # after the data checks: nothing heavy before them
    once_per_node(lambda: os.path.exists(model_path) or pretrain.build_tiny_model(model_path, seed=args.seed))
from transformers import AutoModelForCausalLM, AutoTokenizer, logging  # noqa: E402 (a slow import: after the checks)

logging.disable_progress_bar()
tokenizer = AutoTokenizer.from_pretrained(model_path)
pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
try:  # prompt tokens against --max-prompt-len: each rank counts a 1/world share of the rows, summed over ranks
    for split in (train, test):
        dist.all_reduce(counts := torch.from_numpy(split.count_tokens(tokenizer, rank, world)).to(device))
        split.keep_short(counts.cpu().numpy(), args.max_prompt_len, args.long_prompts == "drop", master and print)
except ValueError as e:
    die(str(e))
if len(train) < args.batch_prompts:
    die(f"{len(train)} train prompts are fewer than --batch-prompts {args.batch_prompts}")

# ----------------------------------------------------------------------------------------------------------
# models: policy (trained), reference (frozen, for the KL term), the algorithm's critic or PRM; FSDP2 shards them all
mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
# On CPU, bf16 is autocast around an fp32 model (FSDP2's mixed precision is a CUDA path).
autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=not cuda and dtype == torch.bfloat16)


def load_model(path, trainable, build=AutoModelForCausalLM.from_pretrained, dtype=torch.float32):
    """build(path) on the device (fp32 master weights; a frozen reference: the run's dtype), sharded by FSDP2."""
    model = passes.prepare(build(path, dtype=dtype).to(device), trainable, args.grad_checkpointing)
    for layer in model.model.layers:  # one FSDP unit per decoder layer: gathered just in time, then the root
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=not args.keep_gathered)
    return fully_shard(model, mesh=mesh, mp_policy=mp_policy)


def starts_from(name):
    """The folder a trained model other than the policy starts from: its copy in the checkpoint, else the base."""
    return os.path.join(resume_dir, name) if resume_dir else model_path


def make_optimizer(model, lr):
    """AdamW and its schedule: linear warm-up over --warmup steps, then constant."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (args.warmup + 1)))


defaults = flags.SMALL if args.model == "tiny" or pretrained is not None else flags.TINYZERO  # our small models, or not
lr, critic_lr, kl_coef = (defaults[k] if getattr(args, k) == "auto" else getattr(args, k)
                          for k in ("lr", "critic_lr", "kl_coef"))  # algo.next_kl_coef may change kl_coef
prm_lr = lr if args.prm_lr == "auto" else args.prm_lr
init_path = resume_dir or model_path
if cuda and (problem := memory.check_run(model_path, args, world, kl_coef, algo.CRITIC, dtype, device, master)):
    die(f"memory: {problem}")  # before anything is allocated on the GPU
torch.manual_seed(args.seed)
policy = load_model(init_path, trainable=True)
ref = load_model(model_path, trainable=False, dtype=dtype if cuda else torch.float32) if kl_coef > 0 or \
    algo.PRM else None  # a PRM's implicit reward is relative to the reference
critic = load_model(starts_from("critic"), trainable=True, build=algo.build_critic) if algo.CRITIC else None
prm = load_model(starts_from("prm"), trainable=True) if algo.PRM else None  # from the policy's start
policy_optimizer, policy_schedule = make_optimizer(policy, lr)
updated = [(policy, policy_optimizer, policy_schedule, "policy")]  # what update() steps: (model, optim, schedule, name)
if critic is not None:
    updated.append((critic, *make_optimizer(critic, critic_lr), "critic"))
trained = list(updated)  # what is checkpointed: and the PRM, which the algorithm steps itself in advantages()
if prm is not None:
    prm_optimizer, prm_schedule = make_optimizer(prm, prm_lr)
    trained.append((prm, prm_optimizer, prm_schedule, "prm"))
    algo.use(prm, prm_optimizer, prm_schedule, autocast)
if resume_dir:
    kl_coef = checkpoint.load_training(resume_dir, trained)["kl_coef"]

engine = rollout.make_engine(args.rollout, init_path, dtype=dtype, device=device, seed=args.seed,
                             max_model_len=args.max_prompt_len + args.max_response_len, tp=args.rollout_tp,
                             kv_cache_gib=args.kv_cache_gib, gpu_memory_utilization=args.gpu_memory_utilization)

# What the loop asks of the algorithm, once. The old log-probs (of the policy that sampled) are computed before the
# update when the algorithm's advantages read them (a KL reward) or when the policy moves before the update has seen
# every row (more than one optimizer step a batch); otherwise the update's own first forward gives them.
updates_per_step = args.epochs_per_batch * args.batch_prompts // mini_batch_prompts
old_logp_first = updates_per_step > 1 or (algo.KL_IN_REWARD and ref is not None)
skip_zero_rows = algo.skip_zero_rows(args, kl_coef)  # GRPO without KL or entropy: no passes for flat groups


# ----------------------------------------------------------------------------------------------------------
# the loop's steps, each a function, in the order the loop calls them
def allreduce(d, op=dist.ReduceOp.SUM):
    """Sum (or max) a dict of floats over ranks, in one collective."""
    keys = sorted(d)
    t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64, device="cuda" if cuda else "cpu")
    dist.all_reduce(t, op=op)
    return dict(zip(keys, t.tolist()))


def optimizer_step(batch, rows, tally, first_epoch):
    """One optimizer step of every updated model on the rows of a mini-batch, gradients accumulated over its
    micro-batches; statistics into tally. Returns 1 if the step was skipped (a non-finite loss or gradient on any
    rank: NaN never reaches the weights or the optimizer state), else 0."""
    # Every micro-batch's loss is its share of the loss of the whole mini-batch over all ranks: the divisor is the
    # mini-batch's, summed over ranks, over world, since FSDP averages the gradients.
    divisor = {"token-mean": batch["mask"][rows].sum().item(), "seq-mean": len(rows),
               "token-sum": len(rows) * args.max_response_len}[args.loss_agg]
    denom = allreduce({"d": divisor})["d"] / world
    if skip_zero_rows:  # rows of advantage 0 add nothing to the loss or its gradient: no passes for them
        rows = rows[(batch["advantages"][rows] != 0).any(-1)]
    micro_batches = list(passes.micro_batches(batch, rows, args.micro_batch_tokens))
    n_live, losses = batch["mask"][rows].sum().item(), {}  # losses: the micro-batches' shares, summed
    for j, mb in enumerate(micro_batches):
        for model, *_ in updated:  # --keep-gathered: gather and reduce-scatter once per mini-batch
            passes.sync_after_backward(model, j == len(micro_batches) - 1 or not args.keep_gathered)
        logp, entropy = passes.response_logprobs(policy, mb, args.temperature, autocast, with_entropy=True,
                                                 entropy_grad=args.entropy_coef > 0)
        values = passes.critic_values(critic, mb, autocast) if critic else None
        loss, stats = algo.loss(logp, entropy, values, mb, args, kl_coef=kl_coef, denom=denom)
        loss.backward()
        share = mb["mask"].sum().item() / max(n_live, 1.0)  # of the mini-batch's tokens: stats are token means
        entropy_mean = (entropy.detach() * mb["mask"]).sum() / mb["mask"].sum().clamp(min=1.0)
        for k, v in (("loss", loss.item()), ("entropy", entropy_mean), *stats.items()):
            if k.endswith("loss"):
                losses[k] = losses.get(k, 0.0) + float(v)
            else:
                tally.add(k, v, share)
        if first_epoch:  # the sampler's log-probs against the trainer's of the same policy (old, or not moved yet)
            gap = (mb["sampler_logp"] - mb.get("old_logp", logp.detach())).abs() * mb["valid"]
            tally.add("logprob_diff_max", gap.max().item())
            tally.add_sum("logprob_diff_mean", gap.sum().item(), mb["valid"].sum().item())
    for k, v in losses.items():
        tally.add(k, v)
    norms = [torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
             for model, *_ in updated]
    norms = [float(x.full_tensor() if hasattr(x, "full_tensor") else x) for x in norms]
    skip = allreduce({"bad": not math.isfinite(sum(norms) + sum(losses.values()))}, op=dist.ReduceOp.MAX)["bad"]
    for (model, optimizer, _, name), norm in zip(updated, norms):
        tally.add("grad_norm" if name == "policy" else f"{name}_grad_norm", norm)
        if not skip:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return int(skip)


def update(batch):
    """Phase 3: --epochs-per-batch x mini-batches of whole groups (a group's prompt is computed once), one
    optimizer step each. Returns the statistics (passes.Tally) and the number of optimizer steps skipped."""
    n_groups, tally, skipped = len(batch["mask"]) // args.group_size, passes.Tally(), 0
    per_mini = mini_batch_prompts // world * args.group_size  # rows of a mini-batch on this rank
    for epoch in range(args.epochs_per_batch):
        shuffled = args.epochs_per_batch > 1 or per_mini < len(batch["mask"])
        groups = torch.randperm(n_groups) if shuffled else torch.arange(n_groups)
        order = (groups[:, None] * args.group_size + torch.arange(args.group_size)).flatten()
        for start in range(0, len(order), per_mini):
            skipped += optimizer_step(batch, order[start:start + per_mini], tally, first_epoch=epoch == 0)
    for model, optimizer, schedule, name in updated:
        schedule.step()
    return tally, skipped


def save_checkpoint(step):
    """OUT/checkpoints/step_N, whole or absent whatever happens meanwhile; never with weights that are not finite."""
    if not checkpoint.save_training(os.path.join(ckpt_root, f"step_{step}"), trained, tokenizer,
                                    {"step": step, "kl_coef": kl_coef}, {"step": step, "args": vars(args)}, disk_waits):
        die(f"step {step}: the weights are not finite; not saved (the newest checkpoint is intact)")
    if master:
        checkpoint.prune(ckpt_root, args.keep_checkpoints)


wandb = logs.start_wandb(args.wandb, vars(args)) if master and args.wandb else None


def log(metrics):
    """One line per step, with the wall time so far: stdout, OUT/metrics.jsonl and wandb (rank 0)."""
    if master:
        logs.log(metrics_path, {**metrics, "elapsed": time.time() - T_START}, wandb)


# ----------------------------------------------------------------------------------------------------------
# the loop
from tqdm import tqdm  # noqa: E402 (the progress bar)

skipped_steps = 0  # in a row, every update of the step skipped
if master and resume_dir:
    logs.trim_log(metrics_path, start_step)  # the lines of steps after the checkpoint are redone
elif master and os.path.exists(metrics_path):
    os.remove(metrics_path)  # a fresh run starts a fresh log
if args.eval_every and start_step == 0:
    log({"step": 0, **evaluate.validate(engine, tokenizer, test, 0, args, allreduce)})  # the baseline
bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=not master,
           dynamic_ncols=True)
for step in bar:
    # 1. rollout: group-size responses for each of this rank's prompts, and their rewards ---------------------
    t0 = time.time()
    prompts, samples, scores, time_reward, dynamic_stats = rollout.rollout_step(engine, tokenizer, train, step, args,
                                                                                rank, world)
    rollout.sleep(engine)
    t1 = time.time()
    # 2. log-probs and advantages -----------------------------------------------------------------------------
    batch = rollout.to_batch(prompts, samples, args.group_size, pad_id, device, args.mask_truncated)
    budget = args.micro_batch_tokens
    if old_logp_first:  # the policy that sampled, recomputed by the trainer
        batch["old_logp"] = passes.batch_logprobs(policy, batch, budget, args.temperature, autocast)
    if ref is not None:  # the reference of the KL term
        batch["ref_logp"] = passes.batch_logprobs(ref, batch, budget, args.temperature, autocast)
    if critic is not None:
        batch["values"] = passes.batch_values(critic, batch, budget, autocast)
    with torch.no_grad():
        algo_stats = algo.advantages(batch, torch.tensor(scores, dtype=torch.float32, device=device), args, kl_coef)
    t2 = time.time()
    # 3. update: the algorithm's loss, epochs x mini-batches x micro-batches ------------------------------------
    tally, skipped = update(batch)
    t3 = time.time()
    # 4. weight sync: the engine wakes and samples the next batch with the new weights -------------------------
    skipped_steps = skipped_steps + 1 if skipped == updates_per_step else 0  # all skipped: the weights as they were
    rollout.sync_weights(engine, policy)  # even so: on GPU the engine's sleep dropped its copy
    t4 = time.time()
    # 5. metrics, validation, checkpoint: sums over ranks, then means ------------------------------------------
    # peak memory of a rank: the accelerator's on GPU, the process's resident set on CPU
    mem = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    totals = allreduce({"n": len(scores), "reward": sum(scores), "acc": sum(x == 1.0 for x in scores),
                        "len": sum(len(x["token_ids"]) for x in samples),
                        "trunc": sum(x["truncated"] for x in samples), **algo_stats, **dynamic_stats})
    n = totals["n"]
    metrics = {"step": step + 1, "reward_mean": totals["reward"] / n, "acc": totals["acc"] / n,
               "response_len": totals["len"] / n, "truncated_frac": totals["trunc"] / n,
               **allreduce({"mem_peak_gib": mem / 2**30}, op=dist.ReduceOp.MAX),
               **{k: totals[k] / world for k in (*algo_stats, *dynamic_stats)},  # the ranks' means
               "skipped_updates": skipped, **tally.over_ranks(allreduce), "lr": policy_schedule.get_last_lr()[0],
               "time_generate": t1 - t0 - time_reward, "time_reward": time_reward, "time_logprob": t2 - t1,
               "time_update": t3 - t2, "time_sync": t4 - t3}
    kl_coef = algo.next_kl_coef(kl_coef, metrics, args)  # PPO's adaptive controller; fixed elsewhere
    if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
        metrics.update(evaluate.validate(engine, tokenizer, test, step + 1, args, allreduce))
    bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['acc']:.2f}")
    log(metrics)  # before the checkpoint: a kill between the two redoes this step on resume; trim_log drops its line
    if skipped_steps >= args.max_skipped_steps:
        die(f"{skipped_steps} steps in a row (to step {step + 1}) had a non-finite loss or gradient norm on every "
            "update, and were skipped; the weights and checkpoints are intact: lower --lr, or resume")
    if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps:
        save_checkpoint(step + 1)
if master and logs.plot_curves(metrics_path, os.path.join(args.out, "curves.png"),
                               [f"val_greedy_{k}" for k in aha.KEYS]):
    print(f"curves: {os.path.join(args.out, 'curves.png')}")
rollout.close(engine)
if dist.is_initialized():  # vLLM's shutdown may already have destroyed the group it shares
    dist.barrier()  # no rank tears gloo down while its peer still talks to it (a rare abort at exit)
    dist.destroy_process_group()
# Everything is on disk. Python's own teardown, with native threads of the engine still alive, rarely aborts
# (exit -6, "terminate called without an active exception", after the last checkpoint of a test run): skip it.
if wandb:
    wandb.finish()
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)
