"""train.py's flags, each with its default (every one runs on a laptop CPU) and its help (`python train.py --help`
prints them all), and --algo's loader: an algorithm is a module that provides CONTRACT (ppo.py's docstring).
"auto" values pick per model: our small models (the built-in base, tiny) take the CPU values measured for the
built-in base (README), any other TinyZero's."""
import argparse
import importlib
import importlib.util
import os
import sys
import time

import cli
from ppo import KL_ESTIMATORS, LOSS_AGG_MODES  # the names ppo.aggregate and ppo.kl_penalty know


def die(msg):
    """One clear line, then exit: bad input must fail before any heavy work."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # on every node: each torchrun shows why
        print(f"train.py: error: {msg}", file=sys.stderr, flush=True)
    else:
        time.sleep(3)  # let local rank 0 print first: torchrun stops the other ranks as soon as one exits
    sys.exit(2)


SMALL = dict(lr=1.5e-4, critic_lr=1e-4, kl_coef=0.1)
TINYZERO = dict(lr=1e-6, critic_lr=1e-5, kl_coef=1e-3)
RUN_DEFINING = ("algo", "model", "data", "seed", "batch_prompts", "group_size")  # --resume refuses changes
ALGOS = {"ppo": "ppo", "grpo": "grpo", "rloo": "rloo", "reinforce++": "reinforce_pp", "prime": "prime"}  # -> module
CONTRACT = ("CRITIC", "PRM", "KL_IN_REWARD", "check", "skip_zero_rows", "advantages", "loss", "next_kl_coef")
POSITIVE_INT, COUNT, POSITIVE = cli.number(int, 1), cli.number(int, 0), cli.number(float, 0, above=True)
NON_NEGATIVE, ZERO_TO_ONE, ABOVE_ZERO_TO_ONE = cli.number(float, 0), cli.number(float, 0, 1), \
    cli.number(float, 0, 1, above=True)  # [0, inf), [0, 1], (0, 1]
RATE = cli.number(float, 0, above=True, auto=True)

parser = argparse.ArgumentParser(prog="train.py", formatter_class=cli.HelpFormatter)
parser.error = die  # argparse's own errors too: one line, no usage screen
flag = parser.add_argument_group("model and data").add_argument
flag("--model", default="assets/countdown-base", help="a local transformers model folder (default: the built-in "
     "0.6M base made by pretrain.py), or 'tiny': a random Qwen2 built in OUT/tiny_model")
flag("--data", default="", help="folder with train and test files from data.py (jsonl or parquet); empty: small "
     "Countdown tasks generated into OUT/data")
flag("--max-prompt-len", type=POSITIVE_INT, default=768, help="prompt tokens; see --long-prompts")
flag("--long-prompts", default="fail", choices=["fail", "drop"], help="longer prompts: stop, or drop them")
flag("--seed", type=int, default=0, help="seed of data order, sampling and the tiny model")
flag("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="training and rollout dtype; auto: "
     "bfloat16 on CUDA, float32 on CPU (bfloat16 on CPU: autocast, fp32 master weights)")
flag = parser.add_argument_group("algorithm and rollout").add_argument
flag("--algo", default="grpo", help=f"built in: {', '.join(ALGOS)} (ppo: critic + GAE, TinyZero's; grpo: group-"
     "relative; rloo: leave-one-out; reinforce++: whitened returns of score - KL; prime: + an implicit process "
     "reward model; docs/algorithms.md); or your own: a .py file, or a module beside train.py, that provides what "
     "ppo.py's docstring lists (copy ppo.py or grpo.py)")
flag("--batch-prompts", type=POSITIVE_INT, default=8, help="prompts per step over all ranks (TinyZero: 256)")
flag("--group-size", type=POSITIVE_INT, default=16, help="responses sampled per prompt (GRPO's group)")
flag("--max-response-len", type=POSITIVE_INT, default=384, help="response tokens; longer ones are cut")
flag("--temperature", type=NON_NEGATIVE, default=1.0, help="sampling temperature; log-probs use the same")
flag("--top-p", type=ABOVE_ZERO_TO_ONE, default=1.0, help="nucleus sampling (not in the log-probs: keep 1.0)")
flag("--stop", action="append", default=[], metavar="TEXT", help="end a response where its text first holds TEXT, "
     "kept in it (repeatable; e.g. '</answer>': no text after the answer)")
flag("--dynamic-sampling", type=COUNT, default=0, help="DAPO: drop groups whose scores are all equal and sample "
     "that many more prompts, up to this many extra rounds a step (0: off)")
flag("--rollout", default="vllm", choices=["vllm", "hf"], help="in-process vLLM, or transformers")
flag("--rollout-tp", type=POSITIVE_INT, default=1, help="tensor parallel size of the vLLM engine (GPU)")
flag("--kv-cache-gib", type=POSITIVE, default=0.25, help="vLLM's KV cache on CPU")
flag("--gpu-memory-utilization", type=ABOVE_ZERO_TO_ONE, default=0.3, help="vLLM's share of GPU memory")
flag = parser.add_argument_group("optimisation").add_argument
flag("--steps", type=POSITIVE_INT, default=40, help="RL steps (one batch of prompts each)")
flag("--lr", type=RATE, default="auto", help=f"policy learning rate; auto: {SMALL['lr']:g} for our small models, "
     f"{TINYZERO['lr']:g} (TinyZero) for any other")
flag("--mini-batch-prompts", type=COUNT, default=0, help="prompts per optimizer step; 0: the batch")
flag("--micro-batch-tokens", type=cli.number(int, 1, auto=True), default="auto", help="tokens per packed "
     "forward/backward on a rank (memory; a prompt counts once per group; longer sequences alone); auto: 8192 on "
     "CUDA, 384 on CPU (there attention under a packing mask costs the square of the row)")
flag("--keep-gathered", default="auto", choices=["auto", "on", "off"], help="FSDP2 keeps a model's parameters "
     "gathered through a whole pass (a forward-only pass; a mini-batch, whose gradients are then reduce-scattered "
     "once) rather than gathering and reduce-scattering per micro-batch: fewer collectives, a full copy of "
     "parameters and gradients per rank meanwhile; auto: on on CPU (a gloo collective costs milliseconds), off on "
     "CUDA (memory)")
flag("--epochs-per-batch", type=POSITIVE_INT, default=1, help="passes over each batch of rollouts")
flag("--warmup", type=COUNT, default=0, help="steps of linear learning-rate warm-up, then constant")
flag("--weight-decay", type=NON_NEGATIVE, default=0.0, help="AdamW weight decay")
flag("--grad-clip", type=NON_NEGATIVE, default=1.0, help="clip the global gradient norm to this (0: off)")
flag("--clip-low", type=ZERO_TO_ONE, default=0.2, help="ratio clip: ratio >= 1 - clip_low")
flag("--clip-high", type=NON_NEGATIVE, default=0.2, help="ratio clip: ratio <= 1 + clip_high (DAPO: 0.28)")
flag("--loss-agg", default="token-mean", choices=LOSS_AGG_MODES, help="see ppo.aggregate")
flag("--tis-cap", type=NON_NEGATIVE, default=0.0, help="truncated importance sampling: weigh each token by "
     "min(pi_old / pi_sampler, cap), cap > 1 (0: off)")
flag("--mask-truncated", action="store_true", help="leave truncated responses out of the loss")
flag("--kl-coef", type=cli.number(float, 0, auto=True), default="auto", help=f"KL to the reference; auto: "
     f"{SMALL['kl_coef']:g} for our small models, {TINYZERO['kl_coef']:g} (TinyZero) for any other; 0: no "
     "reference model. PPO puts k1 in the reward, GRPO --kl-estimator in the loss")
flag("--entropy-coef", type=NON_NEGATIVE, default=0.0, help="entropy bonus (TinyZero: 0.001)")
flag("--grad-checkpointing", action="store_true", help="recompute activations in backward (memory)")
flag("--max-skipped-steps", type=POSITIVE_INT, default=3, help="stop after this many steps in a row whose updates "
     "all had a non-finite loss or gradient (skipped: nothing applied)")
flag = parser.add_argument_group("PPO").add_argument
flag("--critic-lr", type=RATE, default="auto", help=f"critic learning rate; auto: {SMALL['critic_lr']:g} for our "
     f"small models, {TINYZERO['critic_lr']:g} (TinyZero) for any other")
flag("--gamma", type=ZERO_TO_ONE, default=1.0, help="GAE discount (TinyZero: 1)")
flag("--lam", type=ZERO_TO_ONE, default=1.0, help="GAE lambda (TinyZero: 1)")
flag("--value-clip", type=POSITIVE, default=0.5, help="clip each value's change")
flag("--kl-ctrl", default="fixed", choices=["fixed", "adaptive"], help="adaptive: toward --kl-target")
flag("--kl-target", type=POSITIVE, default=0.1, help="adaptive KL: target per token")
flag("--kl-horizon", type=POSITIVE_INT, default=10000, help="adaptive KL: horizon in samples")
flag = parser.add_argument_group("GRPO and PRIME").add_argument
flag("--no-std-scale", action="store_true", help="do not divide by the group's std (Dr. GRPO)")
flag("--kl-estimator", default="k3", choices=KL_ESTIMATORS, help="the KL loss estimator (ppo.kl_penalty)")
flag("--prm-beta", type=POSITIVE, default=0.05, help="PRIME: implicit reward beta * log(pi_prm / pi_ref)")
flag("--prm-lr", type=RATE, default="auto", help="PRIME: the PRM's learning rate; auto: --lr's")
flag = parser.add_argument_group("validation and logs").add_argument
flag("--eval-every", type=COUNT, default=10, help="validate every K steps, first and last (0: off)")
flag("--eval-prompts", type=COUNT, default=500, help="test prompts per validation (0: all)")
flag("--eval-sampled", action="store_true", help="validate sampled at --temperature too (val_*)")
flag("--log-samples", type=COUNT, default=4, help="responses written to OUT/samples at validation")
flag("--wandb", default="", help="wandb project name; logs there too when wandb is installed")
flag = parser.add_argument_group("checkpoints").add_argument
flag("--out", default="runs/default", help="run folder: metrics.jsonl, samples/, checkpoints/")
flag("--save-every", type=COUNT, default=0, help="checkpoint every K steps and at the end (0: the end)")
flag("--keep-checkpoints", type=POSITIVE_INT, default=2, help="newest checkpoints to keep")
flag("--resume", action="store_true", help="continue from the newest whole checkpoint in OUT")
flag("--force-resume", action="store_true", help="resume even where flags that define the run "
     f"({', '.join('--' + k.replace('_', '-') for k in RUN_DEFINING)}) differ from the checkpoint's")


def parse(description):
    """train.py's flags from the command line; --help shows description (train.py's docstring) first."""
    parser.description = description
    return parser.parse_args()


def load_algorithm(name):
    """--algo's module: a built-in name, a .py file, or a module beside train.py; it must provide the CONTRACT."""
    try:
        if name.endswith(".py"):
            if not os.path.isfile(name):
                die(f"--algo {name!r}: no such file")
            spec = importlib.util.spec_from_file_location(os.path.basename(name)[:-3], name)
            spec.loader.exec_module(module := importlib.util.module_from_spec(spec))
        else:
            module = importlib.import_module(ALGOS.get(name, name))
    except ModuleNotFoundError as e:
        die(f"--algo {name!r}: {e}; built in: {', '.join(ALGOS)}, or a .py file")
    needs = CONTRACT + ("build_critic",) * bool(getattr(module, "CRITIC", False)) + \
        ("use",) * bool(getattr(module, "PRM", False))  # a critic's builder, a PRM's receiver
    if missing := [k for k in needs if not hasattr(module, k)]:
        die(f"--algo {name!r}: {module.__file__} lacks {', '.join(missing)} (ppo.py's docstring lists what an "
            "algorithm provides)")
    return module


