"""RL with rule-based rewards on Countdown and multiplication, top to bottom.

    torchrun --nproc_per_node=2 train.py                       # built-in default: assets/countdown-base, CPU
    torchrun --nproc_per_node=8 train.py --model /models/Qwen2.5-3B --data data/countdown --algo grpo

Each step: every rank samples its share of the batch's prompts, generates --group-size responses per prompt
(rollout.py), scores them (rewards.py), turns scores into advantages (grpo.py, or ppo.py's critic and GAE),
runs the clipped update over micro-batches, and copies the new weights into its rollout engine. The policy
(and reference, and critic) are sharded with FSDP2. The algorithm is a module, grpo or ppo, picked once below
the flags: both provide advantages(batch, scores, ...) and loss(logp, values, mb, ...); the loop is the same.
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import aha
import checkpoint
import cli
import data
import evaluate
import grpo
import memory
import ppo
import pretrain
import prime
import rollout

def die(msg):
    """One clear line, then exit: bad input must fail before any heavy work."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # on every node: each torchrun shows why
        print(f"train.py: error: {msg}", file=sys.stderr, flush=True)
    else:
        time.sleep(3)  # let local rank 0 print first: torchrun stops the other ranks as soon as one exits
    sys.exit(2)


# ----------------------------------------------------------------------------------------------------------
# flags: every one has a default that runs on a laptop CPU. "auto" picks per model: our small models (the
# built-in base, tiny) take the CPU values measured for the built-in base (README), any other TinyZero's.
SMALL = dict(lr=1.5e-4, critic_lr=1e-4, kl_coef=0.1)
TINYZERO = dict(lr=1e-6, critic_lr=1e-5, kl_coef=1e-3)
RUN_DEFINING = ("algo", "model", "data", "seed", "batch_prompts", "group_size")  # --resume refuses changes
POSITIVE, COUNT, SHARE = cli.number(int, 1), cli.number(int, 0), cli.number(float, 0, 1, above=True)
RATE, COEF, UNIT = cli.number(float, 0, above=True, auto=True), cli.number(float, 0), cli.number(float, 0, 1)
ABOVE_0 = cli.number(float, 0, above=True)


p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
p.error = die  # argparse's own errors too: one line, no usage screen
g = p.add_argument_group("model and data")
g.add_argument("--model", default="assets/countdown-base", help="a local transformers model folder (default: "
               "the built-in 0.6M base made by pretrain.py), or 'tiny': a random Qwen2 built in OUT/tiny_model")
g.add_argument("--data", default="", help="folder with train and test files from data.py (jsonl or parquet); "
               "empty: small Countdown tasks generated into OUT/data")
g.add_argument("--max-prompt-len", type=POSITIVE, default=768, help="prompt tokens; see --long-prompts")
g.add_argument("--long-prompts", default="fail", choices=["fail", "drop"], help="longer prompts: stop, or drop them")
g.add_argument("--seed", type=int, default=0, help="seed of data order, sampling and the tiny model")
g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="training and rollout "
               "dtype; auto: bfloat16 on CUDA, float32 on CPU (bfloat16 on CPU: autocast, fp32 master weights)")
g = p.add_argument_group("rollout")
g.add_argument("--algo", default="grpo", choices=["ppo", "grpo", "rloo", "reinforce++", "prime"], help="ppo: critic "
               "+ GAE (TinyZero's); grpo: group-relative; rloo: leave-one-out; reinforce++: whitened returns of "
               "score - KL; prime: + an implicit process reward model (docs/algorithms.md)")
g.add_argument("--batch-prompts", type=POSITIVE, default=8, help="prompts per step over all ranks (TinyZero: 256)")
g.add_argument("--group-size", type=POSITIVE, default=16, help="responses sampled per prompt (GRPO's group)")
g.add_argument("--max-response-len", type=POSITIVE, default=384, help="response tokens; longer ones are cut")
g.add_argument("--temperature", type=COEF, default=1.0, help="sampling temperature; log-probs use the same")
g.add_argument("--top-p", type=SHARE, default=1.0, help="nucleus sampling (not in the log-probs: keep 1.0)")
g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end a response where its text first "
               "holds TEXT, kept in it (repeatable; e.g. '</answer>': no text after the answer)")
g.add_argument("--dynamic-sampling", type=COUNT, default=0, help="DAPO: drop groups whose scores are all equal and "
               "sample that many more prompts, up to this many extra rounds a step (0: off)")
g.add_argument("--rollout", default="vllm", choices=["vllm", "hf"], help="in-process vLLM, or transformers")
g.add_argument("--rollout-tp", type=POSITIVE, default=1, help="tensor parallel size of the vLLM engine (GPU)")
g.add_argument("--kv-cache-gib", type=ABOVE_0, default=0.25, help="vLLM's KV cache on CPU")
g.add_argument("--gpu-memory-utilization", type=SHARE, default=0.3, help="vLLM's share of GPU memory")
g = p.add_argument_group("optimisation")
g.add_argument("--steps", type=POSITIVE, default=40, help="RL steps (one batch of prompts each)")
g.add_argument("--lr", type=RATE, default="auto", help=f"policy learning rate; auto: {SMALL['lr']:g} for our "
               f"small models, {TINYZERO['lr']:g} (TinyZero) for any other")
g.add_argument("--mini-batch-prompts", type=COUNT, default=0, help="prompts per optimizer step; 0: the batch")
g.add_argument("--micro-batch-tokens", type=cli.number(int, 1, auto=True), default="auto", help="tokens per "
               "packed forward/backward on a rank (memory; a prompt counts once per group; longer sequences alone); "
               "auto: 8192 on CUDA, 384 on CPU (there attention under a packing mask costs the square of the row)")
g.add_argument("--keep-gathered", default="auto", choices=["auto", "on", "off"], help="FSDP2 keeps a model's "
               "parameters gathered through a whole pass (a forward-only pass; a mini-batch, whose gradients are then "
               "reduce-scattered once) rather than gathering and reduce-scattering per micro-batch: fewer collectives, "
               "a full copy of parameters and gradients per rank meanwhile; auto: on on CPU (a gloo collective costs "
               "milliseconds), off on CUDA (memory)")
g.add_argument("--epochs-per-batch", type=POSITIVE, default=1, help="passes over each batch of rollouts")
g.add_argument("--warmup", type=COUNT, default=0, help="steps of linear learning-rate warm-up, then constant")
g.add_argument("--weight-decay", type=COEF, default=0.0, help="AdamW weight decay")
g.add_argument("--grad-clip", type=COEF, default=1.0, help="clip the global gradient norm to this (0: off)")
g.add_argument("--clip-low", type=UNIT, default=0.2, help="ratio clip: ratio >= 1 - clip_low")
g.add_argument("--clip-high", type=COEF, default=0.2, help="ratio clip: ratio <= 1 + clip_high (DAPO: 0.28)")
g.add_argument("--loss-agg", default="token-mean", choices=list(ppo.LOSS_AGG_MODES), help="see ppo.aggregate")
g.add_argument("--tis-cap", type=COEF, default=0.0, help="truncated importance sampling: weigh each token by "
               "min(pi_old / pi_sampler, cap), cap > 1 (0: off)")
g.add_argument("--mask-truncated", action="store_true", help="leave truncated responses out of the loss")
g.add_argument("--kl-coef", type=cli.number(float, 0, auto=True), default="auto", help=f"KL to the reference; auto: "
               f"{SMALL['kl_coef']:g} for our small models, {TINYZERO['kl_coef']:g} (TinyZero) for any other; 0: "
               "no reference model. PPO puts k1 in the reward, GRPO --kl-estimator in the loss")
g.add_argument("--entropy-coef", type=COEF, default=0.0, help="entropy bonus (TinyZero: 0.001)")
g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (memory)")
g.add_argument("--max-skipped-steps", type=POSITIVE, default=3, help="stop after this many steps in a row whose "
               "updates all had a non-finite loss or gradient (skipped: nothing applied)")
g = p.add_argument_group("PPO")
g.add_argument("--critic-lr", type=RATE, default="auto", help=f"critic learning rate; auto: {SMALL['critic_lr']:g} "
               f"for our small models, {TINYZERO['critic_lr']:g} (TinyZero) for any other")
g.add_argument("--gamma", type=UNIT, default=1.0, help="GAE discount (TinyZero: 1)")
g.add_argument("--lam", type=UNIT, default=1.0, help="GAE lambda (TinyZero: 1)")
g.add_argument("--value-clip", type=ABOVE_0, default=0.5, help="clip each value's change")
g.add_argument("--kl-ctrl", default="fixed", choices=["fixed", "adaptive"], help="adaptive: toward --kl-target")
g.add_argument("--kl-target", type=ABOVE_0, default=0.1, help="adaptive KL: target per token")
g.add_argument("--kl-horizon", type=POSITIVE, default=10000, help="adaptive KL: horizon in samples")
g = p.add_argument_group("GRPO")
g.add_argument("--no-std-scale", action="store_true", help="do not divide by the group's std (Dr. GRPO)")
g.add_argument("--kl-estimator", default="k3", choices=list(ppo.KL_ESTIMATORS), help="the KL loss estimator")
g.add_argument("--prm-beta", type=ABOVE_0, default=0.05, help="PRIME: implicit reward beta * log(pi_prm / pi_ref)")
g.add_argument("--prm-lr", type=RATE, default="auto", help="PRIME: the PRM's learning rate; auto: --lr's")
g = p.add_argument_group("validation and logs")
g.add_argument("--eval-every", type=COUNT, default=10, help="validate every K steps, first and last (0: off)")
g.add_argument("--eval-prompts", type=COUNT, default=500, help="test prompts per validation (0: all)")
g.add_argument("--eval-sampled", action="store_true", help="validate sampled at --temperature too (val_*)")
g.add_argument("--log-samples", type=COUNT, default=4, help="responses written to OUT/samples at validation")
g.add_argument("--wandb", default="", help="wandb project name; logs there too when wandb is installed")
g = p.add_argument_group("checkpoints")
g.add_argument("--out", default="runs/default", help="run folder: metrics.jsonl, samples/, checkpoints/")
g.add_argument("--save-every", type=COUNT, default=0, help="checkpoint every K steps and at the end (0: the end)")
g.add_argument("--keep-checkpoints", type=POSITIVE, default=2, help="newest checkpoints to keep")
g.add_argument("--resume", action="store_true", help="continue from the newest whole checkpoint in OUT")
g.add_argument("--force-resume", action="store_true", help="resume even where flags that define the run "
               f"({', '.join('--' + k.replace('_', '-') for k in RUN_DEFINING)}) differ from the checkpoint's")
args = p.parse_args()
# the algorithm: advantages() and loss(); the loop is shared. grpo.py holds RLOO and REINFORCE++ too
algo = {"ppo": ppo, "grpo": grpo, "rloo": grpo, "reinforce++": grpo, "prime": prime}[args.algo]


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
mini = args.mini_batch_prompts or args.batch_prompts
for bad, msg in (
    (args.batch_prompts % world, f"--batch-prompts {args.batch_prompts} does not split over {world} ranks"),
    (args.batch_prompts % mini or mini % world, f"--mini-batch-prompts {mini} must divide --batch-prompts "
     f"{args.batch_prompts} and split over {world} ranks"),
    (args.algo in ("grpo", "rloo", "prime") and args.group_size < 2, f"--group-size 1 with --algo {args.algo}: a "
     "group of one has no relative advantage (use >= 2, or --algo ppo or reinforce++)"),
    (args.dynamic_sampling and args.group_size < 2, "--dynamic-sampling drops groups of equal scores: a group of one"),
    (0 < args.tis_cap <= 1, f"--tis-cap {args.tis_cap:g} must be > 1 (min(ratio, cap) <= 1 only ever down-weighs)"),
    (args.tis_cap and args.top_p < 1, "--tis-cap with --top-p < 1: the trainer's log-probs leave the nucleus out"),
    (world % args.rollout_tp, f"--rollout-tp {args.rollout_tp} must divide the number of ranks {world}"),
    (args.temperature == 0 and args.group_size > 1, "--temperature 0 is greedy: the same response n times"),
    (args.kl_ctrl == "adaptive" and args.algo != "ppo", "--kl-ctrl adaptive steers PPO's KL reward: use --algo ppo"),
    ("" in args.stop, "--stop '': an empty string is in every text: each response would end at its first token"),
):
    if bad:
        die(msg)
try:
    os.makedirs(args.out, exist_ok=True)
except OSError as e:
    die(f"--out {args.out!r}: cannot make the folder ({e.strerror})")

if cuda:
    torch.cuda.set_device(device)
dist.init_process_group("nccl" if cuda else "gloo", timeout=checkpoint.SAVE_TIMEOUT)
mesh = init_device_mesh(device.type, (world,))
ckpt_root, metrics_path = os.path.join(args.out, "checkpoints"), os.path.join(args.out, "metrics.jsonl")

# Rank 0 locks OUT for the run's life (one trainer per OUT) and, with --resume, picks the newest whole checkpoint
# of this run; every rank learns the outcome before anything heavy happens.
claim = [checkpoint.claim(args.out, vars(args), RUN_DEFINING) if master else None]
dist.broadcast_object_list(claim, src=0)
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

# The default data (OUT/data) and tiny model: made by rank 0, then by the local rank 0 of each node still missing
# them (a node-local OUT); a shared OUT has them by then, so there are never two writers at once.
data_dir = args.data or os.path.join(args.out, "data")
model_path = os.path.join(args.out, "tiny_model") if args.model == "tiny" else args.model
for turn in (master, local_rank == 0 and not master):
    if turn and not args.data:
        data.default_splits(data_dir, args.seed, pretrained)
    dist.barrier()
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
for turn in (master, local_rank == 0 and not master):  # after the data checks: nothing heavy before them
    if turn and args.model == "tiny" and not os.path.exists(model_path):
        pretrain.build_tiny_model(model_path, seed=args.seed)
    dist.barrier()
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
# models: policy (trained), reference (frozen, only for the KL term), critic (PPO); FSDP2 shards all three
mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
# On CPU, bf16 is autocast around an fp32 model (FSDP2's mixed precision is a CUDA path).
autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=not cuda and dtype == torch.bfloat16)


def load_model(path, trainable, critic=False, dtype=torch.float32):
    # fp32 master weights (a frozen reference: the run's dtype); the critic: a value head on path's backbone
    model = (ppo.build_critic if critic else AutoModelForCausalLM.from_pretrained)(path, dtype=dtype).to(device)
    if trainable and args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    if not trainable:
        model.requires_grad_(False).eval()
    for layer in model.model.layers:  # one FSDP unit per decoder layer: gathered just in time, then the root
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=not args.keep_gathered)
    return fully_shard(model, mesh=mesh, mp_policy=mp_policy)


defaults = SMALL if args.model == "tiny" or pretrained is not None else TINYZERO  # our small models, or not
lr, critic_lr, kl_coef = (defaults[k] if getattr(args, k) == "auto" else getattr(args, k)
                          for k in ("lr", "critic_lr", "kl_coef"))  # PPO's adaptive controller changes kl_coef
prm_lr = lr if args.prm_lr == "auto" else args.prm_lr
init_path = resume_dir or model_path
if cuda and (problem := memory.check_run(model_path, args, world, kl_coef, dtype, device, master)):
    die(f"memory: {problem}")  # before anything is allocated on the GPU
torch.manual_seed(args.seed)
policy = load_model(init_path, trainable=True)
ref = load_model(model_path, trainable=False, dtype=dtype if cuda else torch.float32) if kl_coef > 0 or \
    args.algo == "prime" else None
saved_or = lambda name: os.path.join(resume_dir, name) if resume_dir else model_path  # noqa: E731
critic = load_model(saved_or("critic"), trainable=True, critic=True) if args.algo == "ppo" else None
prm = load_model(saved_or("prm"), trainable=True) if args.algo == "prime" else None  # PRIME: from the policy's start
warmup = lambda s: min(1.0, (s + 1) / (args.warmup + 1))  # noqa: E731
trained = []  # what is trained and checkpointed: (model, optimizer, schedule, name)
for model, model_lr, name in ((policy, lr, "policy"), (critic, critic_lr, "critic"), (prm, prm_lr, "prm")):
    if model is not None:
        optim = torch.optim.AdamW(model.parameters(), lr=model_lr, weight_decay=args.weight_decay)
        trained.append((model, optim, torch.optim.lr_scheduler.LambdaLR(optim, warmup), name))
if resume_dir:
    kl_coef = checkpoint.load_training(resume_dir, trained)["kl_coef"]
updated = [t for t in trained if t[3] != "prm"]  # what update() steps; prime.py steps the PRM
if prm is not None:
    prime.use(*trained[-1][:3], autocast)

engine = rollout.make_engine(args.rollout, init_path, dtype=dtype, device=device, seed=args.seed,
                             max_model_len=args.max_prompt_len + args.max_response_len, tp=args.rollout_tp,
                             kv_cache_gib=args.kv_cache_gib, gpu_memory_utilization=args.gpu_memory_utilization)


# ----------------------------------------------------------------------------------------------------------
# helpers of the loop
def allreduce(d, op=dist.ReduceOp.SUM):
    """Sum (or max) a dict of floats over ranks, in one collective."""
    keys = sorted(d)
    t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64, device="cuda" if cuda else "cpu")
    dist.all_reduce(t, op=op)
    return dict(zip(keys, t.tolist()))


def sample(idx, seed):
    """group-size responses to each of this rank's prompts idx, scored: (prompts, samples, scores, seconds scoring)."""
    rows, prompts = train.batch(idx, tokenizer)
    samples, _, scores, seconds = rollout.sample_and_score(
        engine, tokenizer, rows, prompts, n=args.group_size, temperature=args.temperature, top_p=args.top_p,
        max_tokens=args.max_response_len, seed=seed, stop=args.stop)
    return prompts, samples, scores, seconds


def batch_indices(step):
    """This rank's prompt indices at a step: a fresh permutation of the train set each epoch, by seed. A function of
    (seed, step) alone, so resuming at step N replays the same data order."""
    epoch, k = divmod(step, len(train) // args.batch_prompts)
    order = np.random.default_rng([args.seed, epoch]).permutation(len(train))
    per_rank = args.batch_prompts // world
    start = k * args.batch_prompts + rank * per_rank
    return order[start:start + per_rank].tolist()


def update(batch):
    """Epochs x mini-batches x micro-batches: one optimizer step per mini-batch, gradients accumulated over its
    micro-batches. Returns the rank's sums and weights of the algorithm's stats (means: sum over ranks of the
    sums / of the weights), the number of optimizer steps skipped for a non-finite loss or gradient, and the
    sampler/trainer log-prob gap: its max and sum."""
    n_local, per_mini = len(batch["mask"]), mini // world * args.group_size  # sequences of a mini-batch here
    sums, n_skipped, gap_max, gap_sum = {}, 0, 0.0, 0.0

    def add(k, v, w=1.0):  # weighted sums, and the weights as k/w
        sums[k], sums[k + "/w"] = sums.get(k, 0.0) + float(v) * w, sums.get(k + "/w", 0.0) + w

    for epoch in range(args.epochs_per_batch):
        n_groups = n_local // args.group_size  # mini-batches of whole groups: a group's prompt is computed once
        groups = torch.randperm(n_groups) if args.epochs_per_batch > 1 or per_mini < n_local else torch.arange(n_groups)
        perm = (groups[:, None] * args.group_size + torch.arange(args.group_size)).flatten()
        for start in range(0, n_local, per_mini):
            rows = perm[start:start + per_mini]
            # Every micro-batch's loss is its share of the loss of the whole mini-batch over all ranks: the
            # divisor is the mini-batch's, summed over ranks, over world, since FSDP averages the gradients.
            n_tokens = batch["mask"][rows].sum().item()
            local = {"token-mean": n_tokens, "seq-mean": len(rows),
                     "token-sum": len(rows) * args.max_response_len}[args.loss_agg]
            denom = allreduce({"d": local})["d"] / world
            if skip_zero:  # rows of advantage 0 add nothing to the loss or its gradient: no passes for them
                rows = rows[(batch["advantages"][rows] != 0).any(-1)]
            mbs, loss_sum = list(ppo.micro_batches(batch, rows, args.micro_batch_tokens)), 0.0
            n_live, mb_losses = batch["mask"][rows].sum().item(), {}
            for j, mb in enumerate(mbs):
                for model, *_ in updated:  # --keep-gathered: gather and reduce-scatter once per mini-batch
                    ppo.sync_after_backward(model, j == len(mbs) - 1 or not args.keep_gathered)
                logp, ent = ppo.response_logprobs(policy, mb, args.temperature, autocast, with_entropy=True,
                                                    entropy_grad=args.entropy_coef > 0)
                # With one epoch and one mini-batch the policy that sampled is this one: old = new, detached.
                mb.setdefault("old_logp", logp.detach())
                values = ppo.critic_values(critic, mb, autocast) if critic else None
                loss, stats = algo.loss(logp, values, mb, args, kl_coef=kl_coef, denom=denom)
                if args.entropy_coef:  # a bonus: maximising entropy keeps exploration alive
                    loss = loss - args.entropy_coef * ppo.aggregate(ent, mb["mask"], args.loss_agg,
                                                                    args.max_response_len, denom)
                loss.backward()
                # losses are each micro-batch's share of the mini-batch's (summed); other stats are token means
                w, value = mb["mask"].sum().item() / max(n_live, 1.0), loss.item()
                loss_sum += value
                for k, v in (("loss", value), ("entropy", ppo.masked_mean(ent.detach(), mb["mask"])), *stats.items()):
                    if k.endswith("loss"):
                        mb_losses[k] = mb_losses.get(k, 0.0) + float(v)
                    else:
                        add(k, v, w)
                if epoch == 0:  # the trainer's log-probs of the sampling policy against the sampler's own
                    gap = (mb["sampler_logp"] - mb["old_logp"]).abs() * mb["valid"]
                    gap_max, gap_sum = max(gap_max, gap.max().item()), gap_sum + gap.sum().item()
            for k, v in mb_losses.items():
                add(k, v)
            norms = [torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
                     for model, *_ in updated]
            norms = [float(x.full_tensor() if hasattr(x, "full_tensor") else x) for x in norms]
            # A non-finite loss or gradient on any rank skips this optimizer step on all of them: NaN never
            # reaches the weights or the optimizer state.
            skip = allreduce({"bad": not math.isfinite(sum(norms) + loss_sum)}, op=dist.ReduceOp.MAX)["bad"]
            for (model, optim, _, name), norm in zip(updated, norms):
                add("grad_norm" if name == "policy" else f"{name}_grad_norm", norm)
                if not skip:
                    optim.step()
                optim.zero_grad(set_to_none=True)
            n_skipped += skip
    for model, optim, sched, name in updated:
        sched.step()
    return sums, n_skipped, gap_max, gap_sum


def save_checkpoint(step):
    """OUT/checkpoints/step_N, whole or absent whatever happens meanwhile; never with weights that are not finite."""
    if not checkpoint.save_training(os.path.join(ckpt_root, f"step_{step}"), trained, tokenizer,
                                    {"step": step, "kl_coef": kl_coef}, {"step": step, "args": vars(args)}):
        die(f"step {step}: the weights are not finite; not saved (the newest checkpoint is intact)")
    if master:
        checkpoint.prune(ckpt_root, args.keep_checkpoints)


wandb = checkpoint.start_wandb(args.wandb, vars(args)) if master and args.wandb else None


def log(m):
    """One line per step, with the wall time so far: stdout, OUT/metrics.jsonl and wandb (rank 0)."""
    if master:
        checkpoint.log(metrics_path, {**m, "elapsed": time.time() - T_START}, wandb)


# ----------------------------------------------------------------------------------------------------------
# the loop
from tqdm import tqdm  # noqa: E402 (the progress bar)

# With one epoch and one mini-batch the update's own forward gives the old log-probs (see update()); otherwise
# they are computed before it. PPO's and REINFORCE++'s KL rewards read them before the update too.
old_logp_first = args.epochs_per_batch > 1 or mini < args.batch_prompts or (
    args.algo in ("ppo", "reinforce++") and ref is not None)
# Rows whose advantages are all 0 (GRPO's and RLOO's groups of equal scores) add exactly nothing to a loss that is
# the policy term alone (no KL term, no entropy bonus): update() runs no passes for them, but counts their tokens.
skip_zero = args.algo in ("grpo", "rloo") and kl_coef == 0 and not args.entropy_coef
updates_per_step, skipped_steps = args.epochs_per_batch * args.batch_prompts // mini, 0
if master and resume_dir:
    checkpoint.trim_log(metrics_path, start_step)  # the lines of steps after the checkpoint are redone
elif master and os.path.exists(metrics_path):
    os.remove(metrics_path)  # a fresh run starts a fresh log
if args.eval_every and start_step == 0:
    log({"step": 0, **evaluate.validate(engine, tokenizer, test, 0, args, allreduce)})  # the baseline
bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=not master,
           dynamic_ncols=True)
for step in bar:
    # 1. rollout: group-size responses for each of this rank's prompts, and their rewards -------------------
    t0 = time.time()
    prompts, samples, scores, time_reward, dynamic_stats = grpo.dynamic_sample(  # one round without --dynamic-sampling
        lambda idx, r: sample(idx, args.seed + 10**6 * step + 10**4 * rank + r), batch_indices(step), args.group_size,
        args.dynamic_sampling, lambda r, k: np.random.default_rng([args.seed, step, rank, r]).choice(
            len(train), k).tolist(), lambda short: allreduce({"s": short}, op=dist.ReduceOp.MAX)["s"] > 0)
    rollout.sleep(engine)
    t1 = time.time()
    # 2. log-probs and advantages -----------------------------------------------------------------------------
    batch = rollout.to_batch(prompts, samples, args.group_size, pad_id, device, args.mask_truncated)
    with torch.no_grad():
        mb_tokens = args.micro_batch_tokens
        # old: the policy that sampled, recomputed by the trainer; ref: the reference of the KL term
        for key, model in (("old_logp", policy if old_logp_first else None), ("ref_logp", ref)):
            if model is not None:
                batch[key] = ppo.per_micro_batch(lambda mb: ppo.response_logprobs(model, mb, args.temperature,
                                                                                  autocast), batch, mb_tokens, model)
        if critic is not None:
            batch["values"] = ppo.per_micro_batch(lambda mb: ppo.critic_values(critic, mb, autocast), batch, mb_tokens,
                                                  critic)
        score_t = torch.tensor(scores, dtype=torch.float32, device=device)
        algo_stats = algo.advantages(batch, score_t, args, kl_coef=kl_coef)
    t2 = time.time()
    # 3. update: the algorithm's loss, epochs x mini-batches x micro-batches ------------------------------------
    update_sums, skipped, gap_max, gap_sum = update(batch)
    t3 = time.time()
    # 4. weight sync: the engine samples the next batch with the new weights ---------------------------------
    skipped_steps = skipped_steps + 1 if skipped == updates_per_step else 0
    if not skipped_steps:  # a step whose updates were all skipped left the weights as they were
        rollout.sync_weights(engine, policy)
    t4 = time.time()
    # 5. metrics, validation, checkpoint: sums over ranks, then means ------------------------------------------
    # peak memory of a rank: the accelerator's on GPU, the process's resident set on CPU
    mem = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tot = allreduce({"n": len(scores), "reward": sum(scores), "acc": sum(x == 1.0 for x in scores),
                     "len": sum(len(x["token_ids"]) for x in samples), "trunc": sum(x["truncated"] for x in samples),
                     "gap_sum": gap_sum, "gap_n": batch["valid"].sum().item(), **algo_stats, **dynamic_stats,
                     **update_sums})
    peak = allreduce({"logprob_diff_max": gap_max, "mem_peak_gib": mem / 2**30}, op=dist.ReduceOp.MAX)
    n = tot["n"]
    m = {"step": step + 1, "reward_mean": tot["reward"] / n, "acc": tot["acc"] / n, "response_len": tot["len"] / n,
         "truncated_frac": tot["trunc"] / n, **peak, "logprob_diff_mean": tot["gap_sum"] / max(tot["gap_n"], 1),
         **{k: tot[k] / world for k in (*algo_stats, *dynamic_stats)}, "skipped_updates": skipped,  # ranks' means
         **{k: tot[k] / tot[k + "/w"] for k in update_sums if "/" not in k and tot[k + "/w"]},  # none: no row trained
         "lr": trained[0][2].get_last_lr()[0], "time_generate": t1 - t0 - time_reward, "time_reward": time_reward,
         "time_logprob": t2 - t1, "time_update": t3 - t2, "time_sync": t4 - t3}
    if args.kl_ctrl == "adaptive" and "kl" in m:
        kl_coef = ppo.update_kl_coef(kl_coef, m["kl"], args.kl_target, args.kl_horizon,
                                     args.batch_prompts * args.group_size)
    if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
        m.update(evaluate.validate(engine, tokenizer, test, step + 1, args, allreduce))
    bar.set_postfix(reward=f"{m['reward_mean']:.3f}", acc=f"{m['acc']:.2f}")
    log(m)  # before the checkpoint: a kill between the two redoes this step on resume, and trim_log drops its line
    if skipped_steps >= args.max_skipped_steps:
        die(f"{skipped_steps} steps in a row (to step {step + 1}) had a non-finite loss or gradient norm on every "
            "update, and were skipped; the weights and checkpoints are intact: lower --lr, or resume")
    if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps:
        save_checkpoint(step + 1)
if master and checkpoint.plot_curves(metrics_path, os.path.join(args.out, "curves.png"),
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
