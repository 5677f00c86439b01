"""RL with rule-based rewards on Countdown and multiplication, top to bottom.

    torchrun --nproc_per_node=2 train.py                       # built-in default: assets/countdown-base, CPU
    torchrun --nproc_per_node=8 train.py --model /models/Qwen2.5-3B --data data/countdown --algo grpo

Each step: every rank samples its share of the batch's prompts, generates --group-size responses per prompt
(rollout.py), scores them (rewards.py), turns scores into advantages (grpo.py, or ppo.py's critic and GAE),
recomputes log-probs under the current policy, runs the clipped update over micro-batches, and copies the
new weights into its rollout engine. The policy (and reference, and critic) are sharded with FSDP2.
"""
import argparse
import glob
import json
import math
import os
import random
import resource
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import data
import grpo
import ppo
import pretrain
import rewards
import rollout

# ----------------------------------------------------------------------------------------------------------
# flags: every one has a default that runs on a laptop CPU
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


# The defaults are the CPU defaults measured for the built-in base (README, "The built-in default"); the README
# gives TinyZero's flags for Qwen2.5 on GPUs.
SMALL_LR, SMALL_KL = 1.5e-4, 0.1
p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
a = p.add_argument
a("--model", default="assets/countdown-base", help="a local transformers model folder (the default: the "
  "built-in 0.6M base model made by pretrain.py), or 'tiny': a tiny random Qwen2 built under OUT/tiny_model")
a("--data", default="", help="folder with train and test files from data.py (jsonl or parquet); empty: "
  "generate small Countdown tasks into OUT/data")
a("--algo", default="grpo", choices=["ppo", "grpo"], help="ppo: critic + GAE (TinyZero's default); grpo: "
  "group-relative advantages, no critic")
a("--out", default="runs/default", help="run folder: metrics.jsonl, samples/, checkpoints/")
a("--steps", type=int, default=40, help="RL steps (one batch of prompts each)")
a("--batch-prompts", type=int, default=8, help="prompts per step over all ranks (TinyZero: 256)")
a("--group-size", type=int, default=16, help="responses sampled per prompt (GRPO's group)")
a("--mini-batch-prompts", type=int, default=0, help="prompts per optimizer step; 0: the whole batch "
  "(TinyZero: 64 of 256)")
a("--micro-batch", type=int, default=32, help="sequences per forward/backward on one rank (memory knob; "
  "gradients accumulate, the result does not depend on it)")
a("--epochs-per-batch", type=int, default=1, help="passes over each batch of rollouts (PPO epochs)")
a("--max-prompt-len", type=int, default=768, help="prompt tokens; longer prompts are reported, see "
  "--long-prompts")
a("--long-prompts", default="fail", choices=["fail", "drop"], help="what to do with prompts longer than "
  "--max-prompt-len")
a("--max-response-len", type=int, default=384, help="response tokens; longer responses are cut (truncated)")
a("--mask-truncated", action="store_true", help="leave truncated responses out of the loss (they still "
  "count in the reward metrics)")
a("--temperature", type=float, default=1.0, help="sampling temperature; log-probs use the same")
a("--top-p", type=float, default=1.0, help="nucleus sampling; the trainer's log-probs ignore it, so keep "
  "1.0 for exact on-policy ratios")
a("--lr", type=float, default=0.0, help=f"policy learning rate; 0: {SMALL_LR:g} for our small models (built-in "
  "base, tiny), TinyZero's 1e-6 for any other")
a("--critic-lr", type=float, default=0.0, help="PPO critic learning rate; 0: 1e-4 for our small models, "
  "TinyZero's 1e-5 for any other")
a("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up, then constant")
a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")
a("--clip-low", type=float, default=0.2, help="PPO ratio clip below: ratio >= 1 - clip_low")
a("--clip-high", type=float, default=0.2, help="PPO ratio clip above: ratio <= 1 + clip_high (DAPO: 0.28)")
a("--loss-agg", default="token-mean", choices=list(ppo.LOSS_AGG_MODES), help="how per-token losses become "
  "one number: token-mean over the batch, seq-mean (GRPO paper), token-sum / constant (Dr. GRPO)")
a("--no-std-scale", action="store_true", help="GRPO: do not divide advantages by the group std (Dr. GRPO)")
a("--kl-coef", type=float, default=-1.0, help=f"KL-to-reference coefficient; negative: {SMALL_KL:g} for our small "
  "models, TinyZero's 0.001 for any other; 0 skips the reference model. PPO puts k1 in the reward, GRPO adds "
  "--kl-estimator to the loss")
a("--kl-estimator", default="k3", choices=list(ppo.KL_ESTIMATORS), help="GRPO's KL loss estimator")
a("--kl-ctrl", default="fixed", choices=["fixed", "adaptive"], help="PPO: keep --kl-coef, or steer it toward "
  "--kl-target (TinyZero's kl_ctrl)")
a("--kl-target", type=float, default=0.1, help="PPO adaptive KL: target KL per token")
a("--kl-horizon", type=int, default=10000, help="PPO adaptive KL: horizon in samples")
a("--entropy-coef", type=float, default=0.0, help="entropy bonus coefficient (TinyZero: 0.001); 0 skips it")
a("--gamma", type=float, default=1.0, help="PPO GAE discount (TinyZero: 1)")
a("--lam", type=float, default=1.0, help="PPO GAE lambda (TinyZero: 1)")
a("--value-clip", type=float, default=0.5, help="PPO value loss: clip each value's change to this "
  "(TinyZero's cliprange_value: 0.5)")
a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="compute dtype of training and "
  "rollout; auto: bfloat16 on CUDA, float32 on CPU (bfloat16 on CPU = autocast, fp32 master weights)")
a("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
a("--rollout", default="vllm", choices=["vllm", "hf"], help="generation engine: in-process vLLM, or "
  "transformers generate where vLLM is not installed")
a("--rollout-tp", type=int, default=1, help="tensor parallel size of the vLLM engine (GPU)")
a("--kv-cache-gib", type=float, default=0.25, help="vLLM KV cache on CPU, GiB per rank")
a("--gpu-memory-utilization", type=float, default=0.3, help="vLLM's share of GPU memory")
a("--eval-every", type=int, default=10, help="validate every K steps (and at the start and the end); 0: off")
a("--eval-prompts", type=int, default=500, help="test prompts per validation (0: the whole test split)")
a("--eval-sampled", action="store_true", help="validate with sampling at --temperature too (val_*), not only "
  "greedy (val_greedy_*)")
a("--save-every", type=int, default=0, help="checkpoint every K steps (and at the end); 0: only at the end")
a("--keep-checkpoints", type=int, default=2, help="newest checkpoints to keep")
a("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
a("--seed", type=int, default=0, help="seed of data order, sampling and the tiny model")
a("--wandb", default="", help="wandb project name; logs there too when wandb is installed")
a("--log-samples", type=int, default=4, help="prompts and responses written to OUT/samples at validation")
args = p.parse_args()


def die(msg):
    """One clear line, then exit: bad input must fail before any heavy work."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train.py: error: {msg}", file=sys.stderr, flush=True)
    else:
        time.sleep(3)  # let rank 0 print first: torchrun stops the other ranks as soon as one exits
    sys.exit(2)


# ----------------------------------------------------------------------------------------------------------
# helpers of the loop
def micro_batches(batch, idx, size):
    """Split the rows idx of batch into micro-batches of at most size rows."""
    for s in range(0, len(idx), size):
        yield {k: v[idx[s:s + size]] for k, v in batch.items()}


def allreduce_sums(d):
    """Sum a dict of floats over ranks (one collective)."""
    keys = sorted(d)
    t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def plot_curves(metrics_path, png_path):
    """PNG of the run's curves from metrics.jsonl, when matplotlib is installed (the run never needs it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in open(metrics_path)]
    keys = [k for k in ("reward_mean", "acc", "response_len", "val_greedy_acc", "val_acc", "val_greedy_response_len",
                        *(f"val_greedy_{a}" for a in rewards.AHA_KEYS)) if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2 * len(keys)), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        ax.plot(*zip(*pts), marker="." if k.startswith("val") else None)
        ax.set_ylabel(k, fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return True


def allreduce_max(xs):
    """Element-wise max of a list of floats over ranks."""
    t = torch.tensor(xs, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def shard(model, mesh, mp_policy):
    """FSDP2: one unit per decoder layer (its parameters are gathered just in time), then the root."""
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    return model


# ----------------------------------------------------------------------------------------------------------
# process group: torchrun sets RANK/WORLD_SIZE; plain `python train.py` runs as a world of one
if "RANK" not in os.environ:  # plain `python train.py`: a world of one, on a free port
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        os.environ.setdefault(k, v)
T_START = time.time()
rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
cuda = torch.cuda.is_available()
device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "float32": torch.float32,
         "bfloat16": torch.bfloat16}[args.dtype]
master = rank == 0

# ----------------------------------------------------------------------------------------------------------
# check the input before anything heavy
if args.batch_prompts % world:
    die(f"--batch-prompts {args.batch_prompts} does not split over {world} ranks")
mini = args.mini_batch_prompts or args.batch_prompts
if args.batch_prompts % mini or mini % world:
    die(f"--mini-batch-prompts {mini} must divide --batch-prompts {args.batch_prompts} and split over "
        f"{world} ranks")
if args.algo == "grpo" and args.group_size < 2:
    die("--group-size 1 with --algo grpo: a group of one has no relative advantage (use >= 2, or --algo ppo)")
if args.rollout_tp < 1 or world % args.rollout_tp:
    die(f"--rollout-tp {args.rollout_tp} must divide the number of ranks {world}")
if min(args.steps, args.micro_batch, args.max_prompt_len, args.max_response_len, args.epochs_per_batch) < 1:
    die("--steps, --micro-batch, --max-prompt-len, --max-response-len, --epochs-per-batch must be >= 1")
if not 0 <= args.temperature or (args.temperature == 0 and args.group_size > 1):
    die(f"--temperature {args.temperature}: use > 0 for sampling (0 is greedy, the same response n times)")
if args.model != "tiny" and not os.path.isfile(os.path.join(args.model, "config.json")):
    die(f"--model {args.model!r} is not a model folder (no config.json there); give a local transformers "
        "folder or 'tiny'")
try:
    if args.data:
        train_path, test_path = data.find_split(args.data, "train"), data.find_split(args.data, "test")
except FileNotFoundError as e:
    die(f"--data {args.data!r}: {e}")
os.makedirs(args.out, exist_ok=True)
ckpt_root = os.path.join(args.out, "checkpoints")
resume_dir = None
if args.resume:
    done = sorted(glob.glob(os.path.join(ckpt_root, "step_*[0-9]")), key=lambda d: int(d.rsplit("_", 1)[1]))
    if not done:
        die(f"--resume: no checkpoint in {ckpt_root}")
    resume_dir = done[-1]

if cuda:
    torch.cuda.set_device(device)
dist.init_process_group("nccl" if cuda else "gloo")
mesh = init_device_mesh(device.type, (world,))

# A model made by pretrain.py says what it was pretrained on: the tasks to generate, and our small-model defaults.
made = os.path.join(args.model, "pretrain.json")
pretrained = json.load(open(made))["args"] if os.path.isfile(made) else None

# data: generated on rank 0 when --data is empty, then read by every rank
if not args.data:
    args.data = os.path.join(args.out, "data")
    if master and not os.path.exists(os.path.join(args.data, "test.jsonl")):
        # A base model made by pretrain.py gets the tasks and the prompt template it was pretrained on; any
        # other model small Countdown tasks in TinyZero's prompt. 500 test tasks: the validation set.
        kw = dict(num_counts=(3,), num_range=(1, 20), target_range=(10, 50), template="base")
        if pretrained:
            kw = dict(num_counts=pretrained["num_counts"], num_range=pretrained["num_range"],
                      target_range=pretrained["target_range"], template="tiny")
        tr, te = data.make_splits("countdown", 2048, 500, seed=args.seed, workers=1, **kw)
        data.write_rows(tr, os.path.join(args.data, "train.jsonl"))
        data.write_rows(te, os.path.join(args.data, "test.jsonl"))
    dist.barrier()
    train_path, test_path = data.find_split(args.data, "train"), data.find_split(args.data, "test")
try:
    train_rows, test_rows = data.load_rows(train_path), data.load_rows(test_path)
except ValueError as e:
    die(str(e))

model_path = os.path.join(args.out, "tiny_model") if args.model == "tiny" else args.model
if args.model == "tiny" and master and not os.path.exists(model_path):
    pretrain.build_tiny_model(model_path, seed=args.seed)
dist.barrier()

import transformers  # noqa: E402 (a slow import: after the checks)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

transformers.utils.logging.disable_progress_bar()
tokenizer = AutoTokenizer.from_pretrained(model_path)
eos_id = tokenizer.eos_token_id
pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id


def encode(rows, split):
    """Prompt token ids for rows; too-long prompts fail or are dropped (--long-prompts)."""
    ids = tokenizer([data.prompt_text(r, tokenizer) for r in rows], add_special_tokens=False)["input_ids"]
    long = [i for i, x in enumerate(ids) if len(x) > args.max_prompt_len]
    if long and args.long_prompts == "fail":
        die(f"{len(long)} of {len(rows)} {split} prompts are longer than --max-prompt-len "
            f"{args.max_prompt_len} (longest {max(len(ids[i]) for i in long)} tokens); raise it or pass "
            "--long-prompts drop")
    if long and master:
        print(f"dropping {len(long)} of {len(rows)} {split} prompts longer than {args.max_prompt_len} tokens")
    keep = sorted(set(range(len(rows))) - set(long))
    return [rows[i] for i in keep], [ids[i] for i in keep]


train_rows, train_ids = encode(train_rows, "train")
test_rows, test_ids = encode(test_rows, "test")
if len(train_rows) < args.batch_prompts:
    die(f"{len(train_rows)} train prompts are fewer than --batch-prompts {args.batch_prompts}")

# ----------------------------------------------------------------------------------------------------------
# models: policy (trained), reference (frozen, only for the KL term), critic (PPO)
init_path = resume_dir or model_path
mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
# On CPU, bf16 is autocast around an fp32 model (FSDP2's mixed precision is a CUDA path).
autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=not cuda and dtype == torch.bfloat16)


def load_model(path, trainable, critic=False):
    if critic:  # the policy's architecture with a scalar value head, backbone from path
        m = ppo.build_critic(path, torch.float32).to(device)
    else:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)  # fp32 master weights
    if trainable and args.grad_checkpointing:
        m.gradient_checkpointing_enable()
    m.config.use_cache = False
    if not trainable:
        m.requires_grad_(False).eval()
    return shard(m, mesh, mp_policy)


# a model of ours (random tiny, or made by pretrain.py) takes the CPU learning rates and KL coefficient measured
# for the built-in base (README), any other TinyZero's
small = args.model == "tiny" or pretrained is not None
lr, critic_lr = args.lr or (SMALL_LR if small else 1e-6), args.critic_lr or (1e-4 if small else 1e-5)
kl_coef = args.kl_coef if args.kl_coef >= 0 else SMALL_KL if small else 1e-3  # PPO's adaptive controller changes it
torch.manual_seed(args.seed)
policy = load_model(init_path, trainable=True)
ref = load_model(model_path, trainable=False) if kl_coef > 0 else None
critic = load_model(os.path.join(resume_dir, "critic") if resume_dir else model_path, trainable=True,
                    critic=True) if args.algo == "ppo" else None
opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=args.weight_decay)
critic_opt = torch.optim.AdamW(critic.parameters(), lr=critic_lr, weight_decay=args.weight_decay) if critic else None
warmup = lambda s: min(1.0, (s + 1) / (args.warmup + 1))  # noqa: E731
sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
critic_sched = torch.optim.lr_scheduler.LambdaLR(critic_opt, warmup) if critic else None
start_step = 0
if resume_dir:
    for model, optim, name in ((policy, opt, "optimizer.pt"), (critic, critic_opt, "critic_optimizer.pt")):
        if model is not None:
            osd = torch.load(os.path.join(resume_dir, name), map_location="cpu", weights_only=False)
            set_optimizer_state_dict(model, optim, osd, options=StateDictOptions(full_state_dict=True))
    state = torch.load(os.path.join(resume_dir, "trainer_state.pt"), weights_only=False)
    sched.load_state_dict(state["scheduler"])
    if critic:
        critic_sched.load_state_dict(state["critic_scheduler"])
    start_step, kl_coef = state["step"], state["kl_coef"]
    rng = state["rng"][rank]
    torch.set_rng_state(rng["torch"]), np.random.set_state(rng["numpy"]), random.setstate(rng["python"])

engine = rollout.make_engine(args.rollout, init_path, dtype=dtype, device=device, seed=args.seed,
                             max_model_len=args.max_prompt_len + args.max_response_len, tp=args.rollout_tp,
                             kv_cache_gib=args.kv_cache_gib, gpu_memory_utilization=args.gpu_memory_utilization)


def save_checkpoint(step):
    """OUT/checkpoints/step_N: a transformers folder plus optimizer, scheduler, RNG, step (and critic/).

    Written to a temporary folder and renamed, so a crash never leaves a half checkpoint behind."""
    final = os.path.join(ckpt_root, f"step_{step}")
    tmp = final + ".tmp"
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only, in CPU memory
    parts = [(policy, opt, tmp, "optimizer.pt")]
    if critic:
        parts.append((critic, critic_opt, os.path.join(tmp, "critic"), "critic_optimizer.pt"))
    saved = [(get_model_state_dict(m, options=full), get_optimizer_state_dict(m, o, options=full), d, name)
             for m, o, d, name in parts]
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    rngs = [None] * world
    dist.all_gather_object(rngs, rng)
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
        for (sd, osd, d, name), (m, *_) in zip(saved, parts):
            m.save_pretrained(d, state_dict=sd)
            torch.save(osd, os.path.join(tmp, name))
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "scheduler": sched.state_dict(), "rng": rngs, "kl_coef": kl_coef,
                    "critic_scheduler": critic_sched.state_dict() if critic else None, "args": vars(args)},
                   os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted(glob.glob(os.path.join(ckpt_root, "step_*[0-9]")), key=lambda d: int(d.rsplit("_", 1)[1]))
        for d in old[:-args.keep_checkpoints]:
            shutil.rmtree(d, ignore_errors=True)
    dist.barrier()


def batch_indices(step):
    """This rank's prompt indices at a step: a fresh permutation of the train set each epoch, by seed.

    A function of (seed, step) alone, so resuming at step N replays the same data order."""
    per_epoch = len(train_rows) // args.batch_prompts
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([args.seed, epoch]).permutation(len(train_rows))
    glob_idx = order[k * args.batch_prompts:(k + 1) * args.batch_prompts]
    per_rank = args.batch_prompts // world
    return glob_idx[rank * per_rank:(rank + 1) * per_rank].tolist()


def sample_and_score(rows, prompts, n, temperature, seed):
    """Generate n responses per prompt and score them. Returns samples, texts, scores, seconds scoring."""
    samples = rollout.generate(engine, prompts, n=n, temperature=temperature, top_p=args.top_p,
                               max_tokens=args.max_response_len, seed=seed, eos_token_id=eos_id,
                               pad_token_id=pad_id)
    t = time.time()
    texts = tokenizer.batch_decode([s["token_ids"] for s in samples], skip_special_tokens=True)
    scores = [rewards.score(rows[k // n], t) for k, t in enumerate(texts)]
    return samples, texts, scores, time.time() - t


def validate(step):
    """Greedy (and with --eval-sampled, sampled) reward, accuracy and response length on the test split, and
    for Countdown rows the "aha" metrics of rewards.aha_metrics: attempts per response, the share of answers
    that repeat an attempt that hit the target, and the share of responses that stop right after the first hit."""
    idx = list(range(len(test_rows)))[: args.eval_prompts or None][rank::world]
    rows, prompts = [test_rows[i] for i in idx], [test_ids[i] for i in idx]
    out = {}
    for name, temp in (("val", args.temperature), ("val_greedy", 0.0))[0 if args.eval_sampled else 1:]:
        samples, texts, scores, _ = sample_and_score(rows, prompts, 1, temp, seed=10**6 * (step + 1) + rank)
        aha = [a for a in map(rewards.row_aha_metrics, rows, texts) if a is not None]
        s = allreduce_sums({"n": len(scores), "reward": sum(scores), "acc": sum(x == 1.0 for x in scores),
                            "len": sum(len(x["token_ids"]) for x in samples), "n_aha": len(aha),
                            **{k: sum(a[k] for a in aha) for k in rewards.AHA_KEYS}})
        n, n_aha = max(s["n"], 1), s["n_aha"]
        out.update({f"{name}_reward": s["reward"] / n, f"{name}_acc": s["acc"] / n,
                    f"{name}_response_len": s["len"] / n})
        if n_aha:
            out.update({f"{name}_{k}": s[k] / n_aha for k in rewards.AHA_KEYS})
        if master and args.log_samples:
            os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
            with open(os.path.join(args.out, "samples", f"step_{step}_{name}.jsonl"), "w") as f:
                for r, t, sc in list(zip(rows, texts, scores))[: args.log_samples]:
                    f.write(json.dumps({"prompt": data.prompt_text(r, tokenizer), "response": t,
                                        "score": sc}) + "\n")
    out["elapsed"] = time.time() - T_START
    return out


# ----------------------------------------------------------------------------------------------------------
# the loop
from tqdm import tqdm  # noqa: E402

metrics_path = os.path.join(args.out, "metrics.jsonl")
if master and not resume_dir and os.path.exists(metrics_path):
    os.remove(metrics_path)  # a fresh run starts a fresh log; a resumed one appends
wandb = None
if master and args.wandb:
    try:
        import wandb
        wandb.init(project=args.wandb, config=vars(args), resume="allow")
    except ImportError:
        print("--wandb given but wandb is not installed: logging to metrics.jsonl only")
bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=not master,
           dynamic_ncols=True)


def log(m):
    """One line per step: stdout, OUT/metrics.jsonl and wandb (rank 0)."""
    if not master:
        return
    tqdm.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
    m = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in m.items()}  # valid JSON
    with open(metrics_path, "a") as f:
        f.write(json.dumps(m) + "\n")
    if wandb:
        wandb.log(m, step=m["step"])


if args.eval_every and start_step == 0:
    log({"step": 0, **validate(0)})  # the baseline of the validation curve
for step in bar:
    m = {}
    # 1. rollout -----------------------------------------------------------------------------------------
    t0 = time.time()
    idx = batch_indices(step)
    rows, prompts = [train_rows[i] for i in idx], [train_ids[i] for i in idx]
    G = args.group_size
    samples, texts, scores, time_reward = sample_and_score(rows, prompts, G, args.temperature,
                                              seed=args.seed + 10**6 * step + 10**4 * rank)
    rollout.sleep(engine)
    t1 = time.time()
    # 2. log-probs and advantages -------------------------------------------------------------------------
    batch = rollout.to_batch(prompts, samples, G, pad_id, device, args.mask_truncated)
    mask = batch["mask"]
    all_rows = torch.arange(len(samples))
    P = batch["input_ids"].shape[1] - mask.shape[1]  # prompt columns
    # With one epoch and one mini-batch, the policy that sampled is the policy at the only update, so the old
    # log-probs are the update's own, detached (ratio 1): no separate forward. Otherwise they are recomputed here
    # (PPO's KL reward needs them before the update too).
    one_pass = args.epochs_per_batch == 1 and mini == args.batch_prompts and not (critic and ref is not None)
    with torch.no_grad():
        # old log-probs: the policy that sampled, recomputed by the trainer. The sampler's own numbers serve
        # only as a check: a gap between the two means the weight sync (or the alignment) is broken.
        if not one_pass:
            batch["old_logp"] = torch.cat([ppo.response_logprobs(policy, mb, args.temperature, autocast)
                                           for mb in micro_batches(batch, all_rows, args.micro_batch)])
        if ref is not None:
            batch["ref_logp"] = torch.cat([ppo.response_logprobs(ref, mb, args.temperature, autocast)
                                           for mb in micro_batches(batch, all_rows, args.micro_batch)])
        score_t = torch.tensor(scores, dtype=torch.float32, device=device)
        if args.algo == "grpo":
            adv, n_flat = grpo.group_advantages(score_t, G, scale_std=not args.no_std_scale)
            batch["advantages"] = adv.unsqueeze(1).expand_as(mask).contiguous()
        else:
            tc = time.time()
            with autocast:
                batch["values"] = torch.cat([ppo.critic_values(critic, mb["input_ids"], mb["attention_mask"], P,
                                                               mb["position_ids"])
                                             for mb in micro_batches(batch, all_rows, args.micro_batch)])
            time_critic = time.time() - tc
            # TinyZero's PPO: the KL penalty (k1) is part of the per-token reward, not of the loss
            kl = ppo.kl_penalty(batch["old_logp"], batch["ref_logp"], "k1") if ref is not None else None
            rollout_kl = ppo.masked_mean(kl, mask).item() if kl is not None else None
            rew = ppo.token_rewards(score_t, mask, kl, kl_coef)
            adv, batch["returns"] = ppo.gae(rew, batch["values"], mask, args.gamma, args.lam)
            # whiten over the whole batch (all ranks), as TinyZero does on its single controller
            w = allreduce_sums({"n": mask.sum().item(), "s": (adv * mask).sum().item(),
                                "q": (adv ** 2 * mask).sum().item()})
            mean = w["s"] / w["n"]
            var = (w["q"] - w["n"] * mean ** 2) / max(w["n"] - 1, 1)  # unbiased, as ppo.masked_whiten
            batch["advantages"] = (adv - mean) * (var + 1e-8) ** -0.5 * mask
            n_flat = 0
    t2 = time.time()
    # 3. update: epochs x mini-batches x micro-batches (gradient accumulation) --------------------------------
    n_local = len(samples)
    per_mini = mini // world * G  # sequences of one mini-batch on this rank
    stats_sum, n_updates, one_pass_logp = {}, 0, []

    def add(k, v, w=1.0):
        stats_sum[k] = stats_sum.get(k, 0.0) + float(v) * w

    for epoch in range(args.epochs_per_batch):
        perm = torch.randperm(n_local) if args.epochs_per_batch > 1 or per_mini < n_local else all_rows
        for start in range(0, n_local, per_mini):
            rows_idx = perm[start:start + per_mini]
            # Every micro-batch's loss is its share of the loss of the whole mini-batch over all ranks: the
            # divisor is the mini-batch's, summed over ranks, over world, since FSDP averages the gradients.
            local = {"token-mean": mask[rows_idx].sum().item(), "seq-mean": len(rows_idx),
                     "token-sum": len(rows_idx) * args.max_response_len}[args.loss_agg]
            denom = allreduce_sums({"d": local})["d"] / world
            mbs = list(micro_batches(batch, rows_idx, args.micro_batch))
            for j, mb in enumerate(mbs):
                last = j == len(mbs) - 1
                w = len(mb["mask"]) / len(rows_idx)
                policy.set_requires_gradient_sync(last)  # reduce-scatter once per mini-batch, not per micro
                logp, ent = ppo.response_logprobs(policy, mb, args.temperature, autocast, with_entropy=True)
                if one_pass:  # micro-batches come in order: they fill old_logp row by row
                    mb["old_logp"] = logp.detach()
                    one_pass_logp.append(mb["old_logp"])
                if args.algo == "grpo":
                    loss, st = grpo.grpo_loss(logp, mb["old_logp"], mb.get("ref_logp"), mb["advantages"],
                                              mb["mask"], args.clip_low, args.clip_high, kl_coef,
                                              args.kl_estimator, args.loss_agg, args.max_response_len, denom)
                else:
                    loss, st = ppo.policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], args.clip_low,
                                               args.clip_high, args.loss_agg, args.max_response_len, denom)
                if args.entropy_coef:  # a bonus: maximising entropy keeps exploration alive
                    loss = loss - args.entropy_coef * ppo.aggregate(ent, mb["mask"], args.loss_agg,
                                                                    args.max_response_len, denom)
                loss.backward()
                add("loss", loss.item())
                add("entropy", ppo.masked_mean(ent.detach(), mb["mask"]), w)
                for k, v in st.items():
                    add(k, v, w)
                if critic:
                    tc = time.time()
                    critic.set_requires_gradient_sync(last)
                    with autocast:
                        values = ppo.critic_values(critic, mb["input_ids"], mb["attention_mask"], P,
                                                   mb["position_ids"])
                    vloss, vst = ppo.value_loss(values, mb["values"], mb["returns"], mb["mask"], args.value_clip,
                                                args.loss_agg, denom)
                    vloss.backward()
                    add("value_loss", vloss.item())
                    add("vf_clip_frac", vst["vf_clip_frac"], w)
                    time_critic += time.time() - tc
            for model, optim, name in ((policy, opt, "grad_norm"), (critic, critic_opt, "critic_grad_norm")):
                if model is None:
                    continue
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
                add(name, gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
                optim.step()
                optim.zero_grad(set_to_none=True)
            n_updates += 1
    sched.step()
    if critic:
        critic_sched.step()
    if one_pass:
        batch["old_logp"] = torch.cat(one_pass_logp)
    diff = (batch["sampler_logp"] - batch["old_logp"]).abs() * batch["valid"]
    t3 = time.time()
    # 4. weight sync -----------------------------------------------------------------------------------------
    rollout.sync_weights(engine, policy)
    t4 = time.time()
    # 5. metrics, validation, checkpoint --------------------------------------------------------------------
    lens = [len(s["token_ids"]) for s in samples]
    s = allreduce_sums({"n": len(scores), "reward": sum(scores), "acc": sum(x == 1.0 for x in scores),
                        "len": sum(lens), "trunc": sum(x["truncated"] for x in samples), "flat": n_flat,
                        "diff_sum": diff.sum().item(), "diff_n": batch["valid"].sum().item(),
                        **{k: v / n_updates for k, v in stats_sum.items()},
                        **({"v_sum": (batch["values"] * mask).sum().item(), "v_n": mask.sum().item(),
                            "ev": ppo.explained_variance(batch["values"], batch["returns"], mask)} if critic else {}),
                        **({"kl": rollout_kl} if critic and rollout_kl is not None else {})})
    # peak memory of a rank: the accelerator's on GPU, the process's resident set on CPU
    mem = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    diff_max, mem_peak = allreduce_max([diff.max().item(), mem / 2**30])
    m.update({"step": step + 1, "reward_mean": s["reward"] / s["n"], "acc": s["acc"] / s["n"],
              "response_len": s["len"] / s["n"], "truncated_frac": s["trunc"] / s["n"],
              "flat_group_frac": s["flat"] / (args.batch_prompts),
              "logprob_diff_max": diff_max, "mem_peak_gib": mem_peak, "logprob_diff_mean": s["diff_sum"] / max(s["diff_n"], 1),
              **{k: s[k] / world for k in stats_sum if k in s}, **({"kl": s["kl"] / world} if "kl" in s else {}),
              "lr": sched.get_last_lr()[0],
              "time_generate": t1 - t0 - time_reward, "time_reward": time_reward, "time_logprob": t2 - t1, "time_update": t3 - t2, "time_sync": t4 - t3})
    if critic:
        m.update({"value_mean": s["v_sum"] / max(s["v_n"], 1), "explained_var": s["ev"] / world,  # mean of ranks'
                  "kl_coef": kl_coef,
                  "time_critic": time_critic})
        if args.kl_ctrl == "adaptive" and "kl" in m:
            kl_coef = ppo.update_kl_coef(kl_coef, m["kl"], args.kl_target, args.kl_horizon, args.batch_prompts * G)
    if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
        m.update(validate(step + 1))
    if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps:
        save_checkpoint(step + 1)
    bar.set_postfix(reward=f"{m['reward_mean']:.3f}", acc=f"{m['acc']:.2f}")
    log(m)
if master and os.path.exists(metrics_path) and plot_curves(metrics_path, os.path.join(args.out, "curves.png")):
    print(f"curves: {os.path.join(args.out, 'curves.png')}")
rollout.close(engine)
if dist.is_initialized():
    dist.destroy_process_group()
