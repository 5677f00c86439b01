r"""Build a small base model from nothing: a byte-level tokenizer, a small Qwen2, and (optionally) a short
pretraining on synthetic text that teaches arithmetic and the answer format, but never how to solve Countdown.
The result is a transformers folder that train.py, transformers and vLLM load as is (no download anywhere).

    python pretrain.py --out assets/tiny --steps 0      # a random-init tiny model (as `train.py --model tiny`)
    python pretrain.py --out assets/countdown-base      # the built-in base model (see README for the flags)

The corpus is a stream of documents, each followed by the EOS token <|endoftext|>:
  * Countdown traces (1 - --arith-frac of them). A task is drawn as countdown.py draws them (--num-counts numbers
    uniform in --num-range, a target reachable from them in --target-range), its prompt is data.py's 'tiny'
    template, exactly as the RL data renders it, and the response is a think trace of attempts, each followed
    by a check against the target, that stops at a random point, then the LAST attempt as the answer, e.g.
        Using the numbers [3, 7, 2], create an equation that equals 20.\n<think>3+7=10,10+2=12:20>;
        3+7=10,10-2=8:20>;3+7=10,10*2=20:20=;3+7=10,10/2=5:20></think>\n<answer>(3+7)/2</answer>
    (one line in the corpus). An attempt combines two numbers of the pool at a time, with a non-negative
    integer result (+ and * keep the order, - and / put the larger number first, / only when it divides),
    until one number is left; steps are joined by ',', the check 'T<' / 'T=' / 'T>' (the target, and how it
    compares with the result) follows ':', attempts are joined by ';'. all_attempts() lists every distinct
    attempt in one fixed order (pairs by position, operations + - * /; 23-47 for 3 numbers); a trace is the
    first K of that list, where after each attempt it stops with probability --stop-prob (K ~ 10 on average).
    Where a trace stops and what it answers never depend on the target: a check that reads 'T=' is followed
    by more attempts as often as any other. So the model learns to copy the numbers, try every combination in
    order, compute, compare with the target and answer in the reward's format; it never sees a check used:
    no trace stops because of a hit or answers with it (the answer hits in ~6% of traces, the luck of where
    the trace stops). RL has to discover that: stop at the first '=' and answer with that attempt.
    Except for --hit-stop-frac: that share of the traces stop at the first hit (when there is one) and answer
    it, a faint prior of the skill, like the rare self-checks of a real base model, for RL to amplify. The
    built-in base has 0.2 (its third stage, see the README): at this size, RL did not find the skill within
    100 steps from 0, nor from 0.1 within 10 minutes.
    Why the checks are there: without them (the target appears only in the prompt) this 0.6M model could not
    learn to compare a result with the target far back in the prompt, not even by supervised fine-tuning on
    3,200 traces that stop at the first hit (greedy accuracy stayed ~1%); see the README.
  * Arithmetic drills (--arith-frac of them): lines 'a op b=r' (a in 0..99, b in 1..9, the same operations
    and rules), 8 to 16 lines per document, the kind of steps that traces take.
"""
import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

import torch

import aha
import cli
import countdown
import data
import rewards

BUCKET = 16  # batches drawn together and sorted by length


def make_tiny(seed=0, hidden=128, layers=4, heads=4, kv_heads=2, intermediate=None):
    """A tiny random Qwen2 and its byte-level tokenizer: (model, tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    # A byte-level BPE with no merges: one token per byte, the same pipeline as Qwen's own tokenizer
    # (transformers loads any qwen2 folder's tokenizer as Qwen2Tokenizer, which imposes that pipeline).
    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|pad|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    # head_dim = hidden / heads must be >= 32: vLLM's CPU attention kernels support no smaller.
    cfg = Qwen2Config(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=0,
                      eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|pad|>"])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = cfg.eos_token_id
    return model, tok


def save(model, tok, path, dtype=torch.float32, info=None):
    """save_pretrained to path.tmp, then rename: a crash never leaves a half-written model folder."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(dtype).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if info:
        with open(os.path.join(tmp, "pretrain.json"), "w") as f:
            json.dump(info, f, indent=1)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def build_tiny_model(path, seed=0, hidden=128, layers=4, heads=4, kv_heads=2):
    """Write a transformers folder (config, safetensors, tokenizer) with a tiny random Qwen2 to path. A rank other
    than 0 of a process group (train.py's on a second node) builds it in a process of its own: there,
    transformers' save_pretrained writes neither config nor weights (only global rank 0 saves)."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        call = f"build_tiny_model({os.path.abspath(path)!r}, {seed}, {hidden}, {layers}, {heads}, {kv_heads})"
        subprocess.run([sys.executable, "-c", "import pretrain; pretrain." + call], check=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
        return
    save(*make_tiny(seed, hidden, layers, heads, kv_heads), path)


# ----------------------------------------------------------------------------------------------------------
# the synthetic corpus (see the module docstring)
def combine(a, b, op):
    """(text, result) of one step on the ordered pair (a, b), or None when op has no non-negative integer
    result: + and * keep the order, - and / put the larger number first, / only when it divides exactly."""
    if op in "-/":
        a, b = max(a, b), min(a, b)
    if op == "/" and (b == 0 or a % b):
        return None
    return f"{a}{op}{b}", {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]


def all_attempts(numbers):
    """Every distinct attempt over numbers, in one fixed order: [(trace text, answer expression)].

    An attempt combines two numbers of the pool (pairs in order of position, operations in the order
    + - * /), puts the result first in the pool, and goes on until one number is left: for [3, 7, 2]
    '3+7=10,10+2=12', '3+7=10,10-2=8', ..., '7/1=7,...'. Its expression puts compound operands in parentheses.
    """
    def rec(pool):  # pool: [(value, expression)]
        if len(pool) == 1:
            yield [], pool[0][1]
            return
        for i in range(len(pool)):
            for j in range(i + 1, len(pool)):
                for op in "+-*/":
                    (a, ea), (b, eb) = pool[i], pool[j]
                    step = combine(a, b, op)
                    if step is None:
                        continue
                    if op in "-/" and b > a:
                        ea, eb = eb, ea
                    wrap = lambda e: e if e.isdigit() else f"({e})"  # noqa: E731
                    rest = [(step[1], f"{wrap(ea)}{op}{wrap(eb)}")] + [p for k, p in enumerate(pool) if k not in (i, j)]
                    for steps, expr in rec(rest):
                        yield [f"{step[0]}={step[1]}"] + steps, expr

    seen, out = set(), []
    for steps, expr in rec([(x, str(x)) for x in numbers]):
        text = ",".join(steps)
        if text not in seen:  # repeated numbers give repeated attempts
            seen.add(text)
            out.append((text, expr))
    return out


def check_text(result, target):
    """The check that follows an attempt's result: the target, then how it compares with the result, e.g.
    check_text(8, 20) == '20>', check_text(27, 20) == '20<'; a hit reads '20='. The relation comes last, right
    before the choice between the next attempt and the answer."""
    return f"{target}{'<' if target < result else '>' if target > result else '='}"


def trace_response(numbers, target, rng, stop_prob, hit_stop_frac=0.0):
    """The response to a Countdown prompt: the first K of all_attempts(numbers), each followed by ':' and its
    check_text against the target, where after each attempt the trace stops with probability stop_prob (and
    after the last one); then the LAST attempt as the answer (no EOS). Where it stops and what it answers
    never depend on the target (the target only enters the checks' arithmetic), except in a share
    hit_stop_frac of the traces, which stop at the first attempt that hits the target, when one does."""
    every = all_attempts(numbers)
    results = [int(t.rsplit("=", 1)[1]) for t, _ in every]
    if hit_stop_frac and target in results and rng.random() < hit_stop_frac:  # no draw at 0: older corpora stay
        k = results.index(target) + 1
    else:
        k = 1
        while k < len(every) and rng.random() >= stop_prob:
            k += 1
    tries = [f"{t}:{check_text(r, target)}" for (t, _), r in zip(every[:k], results)]
    return ";".join(tries) + f"</think>\n<answer>{every[k - 1][1]}</answer>"


def arith_doc(rng):
    lines = []
    for _ in range(rng.randint(8, 16)):
        a, b = rng.randint(0, 99), rng.randint(1, 9)
        step = combine(*((a, b) if rng.random() < 0.5 else (b, a)), rng.choice("+-*/"))
        if step:
            lines.append(f"{step[0]}={step[1]}")
    return "\n".join(lines)


def corpus_batch(n, step, a):
    """n documents (text, without EOS) for a step, a function of (seed, step) alone. Documents are made
    BUCKET batches at a time and sorted by length, so a batch holds documents of similar length (less padding)."""
    chunk, k = divmod(step, BUCKET)
    rng = random.Random(f"pretrain:{a.seed}:{chunk}")
    n_arith = sum(rng.random() < a.arith_frac for _ in range(n * BUCKET))
    tasks = countdown.make(n * BUCKET - n_arith, seed=f"pretrain:{a.seed}:{chunk}", num_counts=a.num_counts,
                           num_range=a.num_range, target_range=a.target_range)
    docs = [data.prompt_text(data.countdown_row(t, "tiny", "train", 0))
            + trace_response(t["numbers"], t["target"], rng, a.stop_prob, a.hit_stop_frac)
            for t in tasks] + [arith_doc(rng) for _ in range(n_arith)]
    rng.shuffle(docs)
    docs.sort(key=len)
    batches = [docs[i * n:(i + 1) * n] for i in range(BUCKET)]
    random.Random(f"order:{a.seed}:{chunk}").shuffle(batches)
    return batches[k]


# ----------------------------------------------------------------------------------------------------------
# evaluation: greedy accuracy on held-out tasks of the RL distribution, with transformers generate
@torch.no_grad()
def evaluate(model, tok, rows, max_new_tokens, batch=128):
    """Greedy decoding of rows (data.py rows); returns mean reward, accuracy, aha metrics, two samples."""
    model.eval()
    tok.padding_side = "left"
    out = dict.fromkeys(("reward", "acc", "len") + aha.KEYS, 0.0)
    samples = []
    for s in range(0, len(rows), batch):
        part = rows[s:s + batch]
        enc = tok([data.prompt_text(r) for r in part], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[:, enc["input_ids"].shape[1]:]
        for r, g in zip(part, gen):
            text = tok.decode(g, skip_special_tokens=True)
            sc = rewards.score(r, text)
            found = aha.row_metrics(r, text)
            n_tok = int((g != tok.pad_token_id).sum())
            for k, v in {"reward": sc, "acc": sc == 1.0, "len": n_tok, **{a: found[a] for a in aha.KEYS}}.items():
                out[k] += float(v) / len(rows)
            if len(samples) < 2:
                samples.append(data.prompt_text(r) + text)
    tok.padding_side = "right"
    model.train()
    return out, samples


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    a = p.add_argument
    a("--out", required=True, help="folder to write the model to (written to OUT.tmp, then renamed)")
    a("--seed", type=int, default=0, help="seed of the initialisation and the corpus")
    a("--hidden", type=int, default=128, help="hidden size (head_dim = hidden / heads >= 32)")
    a("--layers", type=int, default=4, help="decoder layers")
    a("--heads", type=int, default=4, help="attention heads")
    a("--kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    a("--intermediate", type=int, default=0, help="MLP size; 0: 2 x hidden")
    a("--init", default="", help="start from this model folder (weights and tokenizer) instead of a random "
      "model; the size flags are then ignored")
    a("--steps", type=int, default=0, help="optimizer steps of pretraining; 0: save the random model")
    a("--batch", type=int, default=64, help="documents per step")
    a("--lr", type=float, default=3e-3, help="peak learning rate (AdamW), after warm-up, cosine decay")
    a("--min-lr", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    a("--warmup", type=int, default=100, help="steps of linear warm-up")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    a("--bf16", type=int, default=0, help="1: bfloat16 autocast (fast on CPUs with AVX512-BF16/AMX; 10-50x slower "
      "than float32 on AVX2-only CPUs); 0: float32")
    a("--stop-prob", type=float, default=0.1, help="a trace stops after each attempt with this probability")
    a("--hit-stop-frac", type=float, default=0.0, help="share of traces that stop at the first attempt that hits "
      "the target (and answer it): a faint prior of a used check, for RL to amplify")
    a("--arith-frac", type=float, default=0.2, help="share of arithmetic drill documents")
    a("--num-counts", type=int, nargs="+", default=[3], help="numbers per Countdown task")
    a("--num-range", type=int, nargs=2, default=[1, 9], metavar=("LO", "HI"), help="numbers in LO..HI")
    a("--target-range", type=int, nargs=2, default=[10, 50], metavar=("LO", "HI"), help="targets")
    a("--eval-every", type=int, default=0, help="greedy accuracy on --eval-tasks every K steps; 0: end only")
    a("--eval-tasks", type=int, default=200, help="held-out tasks (data.py's test split for --seed)")
    a("--max-new-tokens", type=int, default=320, help="response tokens at evaluation")
    a("--save-dtype", default="bfloat16", choices=["float32", "bfloat16"], help="dtype of the saved weights")
    args = p.parse_args()
    if args.hidden % args.heads or args.hidden // args.heads < 32 or args.heads % args.kv_heads:
        p.error(f"--hidden {args.hidden} / --heads {args.heads} must be a whole head_dim >= 32, and --kv-heads "
                f"{args.kv_heads} must divide --heads")
    if args.init:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(args.init)
    else:
        model, tok = make_tiny(args.seed, args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate)
    n_params = sum(t.numel() for t in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, {torch.get_num_threads()} threads")
    info = {"args": vars(args), "params": n_params}
    if args.init and os.path.isfile(os.path.join(args.init, "pretrain.json")):  # the history of a continuation
        info["init"] = json.load(open(os.path.join(args.init, "pretrain.json")))
    if args.steps:
        test = data.make_splits("countdown", 0, args.eval_tasks, seed=args.seed, template="tiny",
                                num_counts=args.num_counts, num_range=args.num_range,
                                target_range=args.target_range)[1]
        decay = [t for t in model.parameters() if t.dim() >= 2]
        other = [t for t in model.parameters() if t.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": other,
                                 "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

        def lr_at(s):
            if s < args.warmup:
                return (s + 1) / args.warmup
            t = (s - args.warmup) / max(args.steps - args.warmup, 1)
            return args.min_lr + (1 - args.min_lr) * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16))
        model.train()
        t0, loss_avg = time.time(), None
        for step in range(args.steps):
            docs = corpus_batch(args.batch, step, args)
            ids = [x + [tok.eos_token_id] for x in tok(docs, add_special_tokens=False)["input_ids"]]
            T = max(map(len, ids))
            x = torch.full((len(ids), T), tok.pad_token_id)
            for i, seq in enumerate(ids):
                x[i, :len(seq)] = torch.tensor(seq)
            mask = x != tok.pad_token_id
            with autocast:
                logits = model(input_ids=x, attention_mask=mask.long()).logits[:, :-1]
            labels = x[:, 1:].masked_fill(~mask[:, 1:], -100)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
            if (step + 1) % 50 == 0 or step == 0:
                print(f"step {step + 1} loss {loss_avg:.4f} grad_norm {gn:.3f} lr {sched.get_last_lr()[0]:.2e} "
                      f"{time.time() - t0:.0f}s", flush=True)
            if step + 1 == args.steps or args.eval_every and (step + 1) % args.eval_every == 0:
                ev, samples = evaluate(model, tok, test, args.max_new_tokens)
                print(f"eval step {step + 1}: " + " ".join(f"{k} {v:.3f}" for k, v in ev.items()), flush=True)
        print("sample:", samples[0], sep="\n")
        info.update(loss=loss_avg, seconds=round(time.time() - t0), eval=ev)
    save(model, tok, args.out, getattr(torch, args.save_dtype), info)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
