"""Benchmarks of the RL loop's parts, on this machine's CPU or a GPU. What is compared runs in one process,
interleaved and repeated: on a shared machine, read the ratios more than the absolute numbers.

    python bench.py rollout   # tokens/s of the vLLM engine vs transformers generate, fp32 and bf16
    python bench.py sync      # ms to gather the FSDP2 state dict and refresh vLLM; its share of a train.py step
    python bench.py train     # trainer tokens/s (forward + backward + AdamW) per dtype, vs the matmul peak
    python bench.py step      # train.py steps under torchrun (GRPO and PPO), split into phases
    python bench.py step --model qwen2.5-0.5b --rollout hf --dtype bfloat16 --nproc 1 --algo grpo   # on a GPU
    python bench.py gpu       # the first check on a lent GPU (< 10 min); --dry-run: the same on CPU, tiny model

--model: tiny (0.6M: the built-in base's shape, random), medium (32M: hidden 512, 8 layers, MLP 2048),
qwen2.5-0.5b (random init in the shape of Qwen2.5-0.5B, 494M) or a transformers folder; comma-separated.
Built models are cached in runs/bench/models, train.py runs go to runs/bench/step_*. --json: one JSON object on
the last line.
One OpenMP thread per process unless OMP_NUM_THREADS says otherwise: 2 ranks on 2 cores, as train.py runs.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine, before vllm is imported
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its INFO and WARNING lines would bury the tables
import torch  # noqa: E402

import cli  # noqa: E402
import countdown  # noqa: E402
import data  # noqa: E402
import pretrain  # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(REPO, "runs", "bench")
# name: hidden, layers, heads, kv_heads, MLP size, vocabulary (None: the byte tokenizer's 260)
SHAPES = {"tiny": (128, 4, 4, 2, 256, None), "medium": (512, 8, 8, 4, 2048, None),
          "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936)}
PHASES = ("time_generate", "time_reward", "time_logprob", "time_update", "time_sync")  # a train.py step


def model_path(name):
    """A transformers folder: name itself, or built once (random init, seed 0) into CACHE/models."""
    if os.path.isfile(os.path.join(name, "config.json")):
        return name
    if name not in SHAPES:
        sys.exit(f"bench.py: --model {name!r} is neither one of {', '.join(SHAPES)} nor a model folder")
    path = os.path.join(CACHE, "models", name)
    if not os.path.exists(path):
        hidden, layers, heads, kv, mlp, vocab = SHAPES[name]
        pretrain.build_tiny_model(path, seed=0, hidden=hidden, layers=layers, heads=heads, kv_heads=kv)
        if mlp != 2 * hidden or vocab:  # build_tiny_model fixes MLP = 2 * hidden and the vocabulary: redo the model
            from transformers import AutoConfig, Qwen2ForCausalLM
            cfg = AutoConfig.from_pretrained(path)
            cfg.intermediate_size, cfg.vocab_size = mlp, vocab or cfg.vocab_size
            torch.manual_seed(0)
            Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def countdown_prompts(tok, n):
    """n small Countdown prompts (TinyZero's base template) as token-id lists."""
    tasks = countdown.make(n, 0, num_counts=(3,), num_range=(1, 20), target_range=(10, 50))
    texts = [data.prompt_text(data.countdown_row(t, "base", "train", i)) for i, t in enumerate(tasks)]
    return tok(texts, add_special_tokens=False)["input_ids"]


def fwd_flops(cfg, seq_len, lm_head=True):
    """Forward FLOPs of one token: 2 per weight of the layers' matmuls, attention over seq_len positions (PaLM's
    convention: the whole score matrix, not the causal half), the LM head. Forward + backward = 3x forward."""
    d, L, f = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    return 2 * L * (2 * d * d + 2 * d * kv + 3 * d * f) + 4 * L * d * seq_len + 2 * d * cfg.vocab_size * lm_head


def timer(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def matmul_peak(dtype, device):
    """Best FLOP/s of F.linear (what nn.Linear runs) on square sizes, up to one slower than 1 s a call."""
    best = 0.0
    for n in ((512, 1024, 2048) if device.type == "cpu" else (4096, 8192)):
        x, w = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
        for i in range(4):  # call 0 warms up
            t = timer(device)
            torch.nn.functional.linear(x, w)
            s = timer(device) - t
            best = max(best, 2 * n ** 3 / s if i else 0.0)
        if s > 1.0:
            break
    return best


def torchrun(nproc, script_args, log_path, timeout):
    """script_args under torchrun on a free port, output to log_path (vLLM is verbose); the log's text."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr",
           "127.0.0.1", "--master_port", str(cli.free_port()), *map(str, script_args)]
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    log = open(log_path).read()
    if rc:
        sys.exit(f"bench.py: {' '.join(cmd)} failed ({rc}); the end of {log_path}:\n{log[-3000:]}")
    return log


def table(res, cols, pct=()):
    """Print {model: {variant: {col: value}}}, one row per model and variant; pct columns as percentages."""
    fmt = lambda c, x: f"{100 * x:.1f}%" if c in pct else f"{x:.4g}" if isinstance(x, float) else str(x)  # noqa
    rows = [["model", "", *cols]] + [[m, v, *(fmt(c, r.get(c, "-")) for c in cols)]
                                     for m, d in res.items() for v, r in d.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(x.rjust(w) for x, w in zip(r, widths)))


def bench_rollout(a, device):
    """rollout.generate with vLLM and with transformers generate: same model, prompts, sampling settings."""
    import rollout
    from transformers import AutoTokenizer
    cli.world_of_one()
    torch.distributed.init_process_group("gloo")  # a world of one: vLLM's engine comes after it (docs/benchmarks.md)
    res = {}
    for name in a.models:
        path = model_path(name)
        tok = AutoTokenizer.from_pretrained(path)
        prompts = countdown_prompts(tok, a.prompts)
        kw = dict(n=a.n, temperature=1.0, top_p=1.0, max_tokens=a.max_tokens, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
        for dt in a.dtypes:
            engines = {k: rollout.make_engine(k, path, dtype=getattr(torch, dt), device=device, seed=0,
                                              max_model_len=max(map(len, prompts)) + a.max_tokens)
                       for k in ("vllm", "hf")}
            for e in engines.values():  # warm-up: first-call costs are not throughput
                rollout.generate(e, prompts[:1], **{**kw, "n": 1, "max_tokens": 4}, seed=0)
            runs = {k: [] for k in engines}  # (tokens, tokens/s) per repetition
            for r in range(a.reps):  # interleaved: both engines see the same load on a shared machine
                for k, e in engines.items():
                    t = timer(device)
                    tokens = sum(len(s["token_ids"]) for s in rollout.generate(e, prompts, **kw, seed=r))
                    runs[k].append((tokens, tokens / (timer(device) - t)))
            rollout.close(engines["vllm"])
            del engines
            res.setdefault(name, {})[dt] = dict(
                vllm_tok_s=statistics.median(x[1] for x in runs["vllm"]),
                hf_tok_s=statistics.median(x[1] for x in runs["hf"]),
                ratio=statistics.median(v[1] / h[1] for v, h in zip(runs["vllm"], runs["hf"])),
                vllm_tokens=sum(x[0] for x in runs["vllm"]), hf_tokens=sum(x[0] for x in runs["hf"]))
    print(f"{a.prompts} prompts x {a.n} samples x <= {a.max_tokens} tokens, temperature 1; median of {a.reps}")
    table(res, ["vllm_tok_s", "hf_tok_s", "ratio", "vllm_tokens", "hf_tokens"])
    return res


def sync_worker(a):
    """Under torchrun: an FSDP2 policy and a vLLM engine on each rank, as in train.py; times the refresh's parts."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM
    import rollout
    dist, cuda = torch.distributed, torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    policy = AutoModelForCausalLM.from_pretrained(a.models[0], dtype=torch.float32).to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in [*policy.model.layers, policy]:
        fully_shard(module, mesh=mesh)
    engine = rollout.make_engine("vllm", a.models[0], dtype=getattr(torch, a.dtypes[0]), device=device,
                                 max_model_len=1024, seed=0)
    times = []
    for _ in range(10 * a.reps + 1):  # cheap: many repetitions; the first is warm-up
        dist.barrier()
        t0 = timer(device)
        for _ in rollout.full_weights(policy, engine["dtype"]):  # the gather (and cast) alone
            pass
        t1 = timer(device)
        dist.barrier()
        t2 = timer(device)
        rollout.sync_weights(engine, policy)  # what train.py runs: gather streamed into the reload, cache reset
        times.append([t1 - t0, timer(device) - t2])
    t = torch.tensor([statistics.median(x[i] for x in times[1:]) for i in range(2)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    gather, sync = (t * 1e3).tolist()
    if dist.get_rank() == 0:
        print("SYNC " + json.dumps(dict(gather_ms=gather, reload_ms=sync - gather, sync_ms=sync)))
    rollout.close(engine)
    if dist.is_initialized():  # the engine's shutdown may have destroyed it already
        dist.destroy_process_group()


def train_args(a, algo, path, out):
    """train.py's flags for a benchmark run."""
    return ["train.py", "--out", out, "--model", path, "--algo", algo, "--steps", a.steps, "--eval-every", 0,
            "--rollout", a.rollout, "--batch-prompts", a.batch_prompts, "--group-size", a.group_size,
            "--max-response-len", a.max_tokens, *(["--dtype", a.dtypes[0]] if a.dtype else []),
            *(["--micro-batch-tokens", a.micro_batch_tokens] if a.micro_batch_tokens else [])]


def run_train(a, algo, path, out=None, extra=()):
    """train.py under torchrun: the mean of its step metrics after the first (warm-up) step, plus derived ones."""
    from transformers import AutoConfig, AutoTokenizer
    out = out or os.path.join(CACHE, f"step_{algo}_{os.path.basename(path.rstrip('/'))}")
    torchrun(a.nproc, train_args(a, algo, path, out) + list(extra), out + ".log", a.timeout)
    ms = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    ms = ms[1:] or ms
    m = {k: statistics.mean(x[k] for x in ms) for k in ms[0]  # numbers only (train.py logs nan as null)
         if all(isinstance(x.get(k), (int, float)) for x in ms)}
    m["mem_peak_gib"] = max(x["mem_peak_gib"] for x in ms)  # train.py logs the max over ranks
    m["time_step"] = sum(m[k] for k in PHASES)
    m["prompt_len"] = statistics.mean(map(len, countdown_prompts(AutoTokenizer.from_pretrained(path), 256)))
    cfg = AutoConfig.from_pretrained(path)
    seqs, seq_len = a.batch_prompts * a.group_size, m["prompt_len"] + m["response_len"]
    m["tok_s"] = seqs * seq_len / m["time_step"]  # the batch's prompt + response tokens per second of a step
    m["trainer_tok_s"] = seqs * seq_len / (m["time_logprob"] + m["time_update"])  # of its trainer passes alone
    body = seqs * seq_len * fwd_flops(cfg, seq_len, lm_head=False)
    policy = body + seqs * m["response_len"] * 2 * cfg.hidden_size * cfg.vocab_size  # LM head: response only
    m["update_tflop_s"] = 3 * (policy + body * (algo == "ppo")) / m["time_update"] / 1e12  # (+ the critic)
    return m


def bench_sync(a, device):
    res = {}
    for name in a.models:
        path = model_path(name)
        log = torchrun(a.nproc, [__file__, "_sync", "--model", path, "--reps", a.reps, "--dtype", a.dtypes[0]],
                       os.path.join(CACHE, f"sync_{os.path.basename(path)}.log"), a.timeout)
        r = json.loads(log.split("SYNC ", 1)[1].splitlines()[0])
        m = run_train(a, "grpo", path)  # the share of a real step: train.py's own time_sync and step
        r.update(train_sync_ms=m["time_sync"] * 1e3, step_s=m["time_step"], share=m["time_sync"] / m["time_step"])
        res[name] = {a.dtypes[0]: r}
    print(f"{a.nproc} ranks: rollout.sync_weights (sync_ms) and its FSDP2 gather alone; median of {10 * a.reps}."
          f" train.py GRPO: {a.batch_prompts} prompts x {a.group_size}, <= {a.max_tokens} tokens")
    table(res, ["gather_ms", "reload_ms", "sync_ms", "train_sync_ms", "step_s", "share"], pct=["share"])
    return res


def bench_train(a, device):
    """Forward + backward + AdamW step of a loss on passes.response_logprobs over a fixed batch, per dtype."""
    import passes
    from transformers import AutoModelForCausalLM
    res = {}
    peaks = {dt: matmul_peak(getattr(torch, dt), device) for dt in a.dtypes}  # and again at the end: the best
    for name in a.models:
        model = AutoModelForCausalLM.from_pretrained(model_path(name), dtype=torch.float32).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        B, P, T = a.micro_batch, a.prompt_len, a.max_tokens
        ids = torch.randint(0, model.config.vocab_size, (B, P + T), device=device)
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), response_ids=ids[:, P:])
        flops = 3 * B * (P * fwd_flops(model.config, P + T, False) + T * fwd_flops(model.config, P + T))

        def step(dt, batch=batch):
            # bf16: autocast around fp32 master weights, as train.py does on CPU
            ac = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dt == "bfloat16")
            t = timer(device)
            passes.response_logprobs(model, batch, 1.0, ac).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return timer(device) - t

        for dt in a.dtypes:  # warm-up on a small batch (bf16 is slow on CPUs without AVX512-BF16 or AMX)
            step(dt, {k: v[:1, -8:] for k, v in batch.items()} | {"response_ids": ids[:1, -4:]})
        secs = {dt: [] for dt in a.dtypes}
        for _ in range(a.reps):  # interleaved over dtypes
            for dt in a.dtypes:
                secs[dt].append(step(dt))
        for dt, s in ((dt, statistics.median(x)) for dt, x in secs.items()):
            res.setdefault(name, {})[dt] = dict(tok_s=B * (P + T) / s, step_s=s, tflop_s=flops / s / 1e12)
        del model, opt
    peaks = {dt: max(peaks[dt], matmul_peak(getattr(torch, dt), device)) for dt in a.dtypes}
    for r, dt in ((r, dt) for d in res.values() for dt, r in d.items()):
        r["peak_tflop_s"], r["share_of_peak"] = peaks[dt] / 1e12, r["tflop_s"] * 1e12 / peaks[dt]
    where = f"{os.environ['OMP_NUM_THREADS']} thread(s)" if device.type == "cpu" else torch.cuda.get_device_name()
    print(f"{a.micro_batch} x ({a.prompt_len} prompt + {a.max_tokens} response) tokens, {where}, median of {a.reps}; "
          "peak: best square F.linear")
    table(res, ["tok_s", "step_s", "tflop_s", "peak_tflop_s", "share_of_peak"], pct=["share_of_peak"])
    return res


def bench_step(a, device):
    res = {}
    dt = a.dtypes[0] if a.dtype else ("bfloat16" if device.type == "cuda" else "float32")  # train.py's dtype
    peak = matmul_peak(getattr(torch, dt), device) * a.nproc  # one process's peak (1 thread, 1 GPU) x ranks
    for name in a.models:
        for algo in a.algo.split(","):
            m = run_train(a, algo, model_path(name))
            m["update_mfu"] = m["update_tflop_s"] * 1e12 / peak
            m = {k: v for k, v in m.items() if k.startswith("time_") or k in (
                "tok_s", "trainer_tok_s", "update_tflop_s", "update_mfu", "mem_peak_gib", "prompt_len", "response_len")}
            res.setdefault(name, {})[algo] = m | {k.replace("time", "share"): m[k] / m["time_step"] for k in PHASES}
    print(f"train.py, {a.nproc} ranks, {a.batch_prompts} prompts x {a.group_size}, <= {a.max_tokens} tokens, "
          f"--rollout {a.rollout}; seconds, mean of steps 2..{a.steps}; update MFU vs {dt} peak "
          f"{peak / 1e12:.3g} TFLOP/s; time_critic (PPO) is inside time_logprob and time_update")
    table(res, [*PHASES, "time_critic", "time_step", "tok_s", "trainer_tok_s", "update_mfu", "mem_peak_gib"],
          pct=["update_mfu"])
    shares = [k.replace("time", "share") for k in PHASES]
    table(res, shares, pct=shares)
    return res


def bench_gpu(a, device):
    """The first check on a lent GPU: a Qwen2.5-0.5B-shaped random model in bf16, GRPO steps with --rollout hf
    (the engine every GPU has) and a checkpoint after each, then the last step again resumed from the one before
    it; peak memory, tokens/s, update MFU, and whether the resumed step equals the uninterrupted one.
    --dry-run: the same on this machine's CPU with the tiny model, in a couple of minutes (CI runs it)."""
    name = "tiny" if a.dry_run else "qwen2.5-0.5b"
    path, dt = model_path(name), "bfloat16"
    a.dtype, a.dtypes, a.rollout = dt, [dt], "hf"
    out, last = os.path.join(CACHE, f"gpu_{name}"), a.steps
    resumed = out + "_resumed"
    for d in (out, resumed):
        shutil.rmtree(d, ignore_errors=True)
    m = run_train(a, "grpo", path, out, ["--save-every", 1, "--keep-checkpoints", 2])
    # the resume: a fresh run folder with the checkpoint of the step before the last, as after a crash
    for sub in (os.path.join("checkpoints", f"step_{last - 1}"), "data"):  # data: the tasks train.py generated
        shutil.copytree(os.path.join(out, sub), os.path.join(resumed, sub))
    with open(os.path.join(out, "metrics.jsonl")) as f, open(os.path.join(resumed, "metrics.jsonl"), "w") as g:
        g.writelines(line for line in f if json.loads(line)["step"] < last)
    torchrun(a.nproc, train_args(a, "grpo", path, resumed) + ["--save-every", 1, "--resume"], resumed + ".log",
             a.timeout)
    x, y = (json.loads(open(os.path.join(d, "metrics.jsonl")).readlines()[-1]) for d in (out, resumed))
    keys = [k for k in x if isinstance(x[k], (int, float)) and not k.startswith(("time_", "mem_", "elapsed"))]
    num = lambda v: v if isinstance(v, (int, float)) else math.inf  # noqa: E731 (a missing or null number)
    diff = max(abs(x[k] - num(y.get(k))) / max(1.0, abs(x[k])) for k in keys)  # relative; absolute below 1
    peak = matmul_peak(torch.bfloat16, device) * a.nproc
    r = dict(tok_s=m["tok_s"], update_tflop_s=m["update_tflop_s"], update_mfu=m["update_tflop_s"] * 1e12 / peak,
             mem_peak_gib=m["mem_peak_gib"], time_step=m["time_step"], resume_max_rel_diff=diff)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"train.py GRPO, --rollout hf, {dt}, {a.nproc} rank(s) on {where}: {a.batch_prompts} prompts x "
          f"{a.group_size}, <= {a.max_tokens} tokens, {a.steps} steps + step {last} resumed from step {last - 1}; "
          f"update MFU vs the bf16 matmul peak {peak / 1e12:.3g} TFLOP/s")
    table({name: {dt: r}}, list(r), pct=["update_mfu"])
    print(f"resume: step {last} {'equals' if diff <= 1e-5 else 'DIFFERS from'} the uninterrupted run's "
          f"({len(keys)} logged numbers, max relative difference {diff:.2g})")
    return {name: {dt: r}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    add = p.add_argument
    run = {"rollout": bench_rollout, "sync": bench_sync, "train": bench_train, "step": bench_step, "gpu": bench_gpu}
    add("what", choices=[*run, "_sync"], help="what to measure (_sync: sync's worker)")
    add("--model", default="", help="comma-separated tiny, medium, qwen2.5-0.5b or model folders; default: "
      "tiny,medium for rollout and train, tiny for sync and step")
    add("--dtype", default="", help="comma-separated float32, bfloat16; default: both for rollout and train, "
      "train.py's default (float32 on CPU, bfloat16 on CUDA) for sync and step")
    add("--json", action="store_true", help="print one JSON object with the numbers on the last line")
    add("--quick", action="store_true", help="a smoke run of seconds: tiny model, tiny workload, one repetition")
    add("--reps", type=int, default=2, help="timed repetitions after a warm-up (medians are reported)")
    add("--prompts", type=int, default=2, help="rollout: prompts per generate call")
    add("--n", type=int, default=4, help="rollout: samples per prompt")
    add("--max-tokens", type=int, default=0, help="response tokens; 0: 64 for rollout and train, 128 for sync and step")
    add("--micro-batch", type=int, default=1, help="train: sequences per step")
    add("--micro-batch-tokens", type=int, default=0, help="sync, step, gpu: train.py's --micro-batch-tokens (0: its "
      "auto)")
    add("--prompt-len", type=int, default=192, help="train: prompt tokens per sequence")
    add("--algo", default="grpo,ppo", help="step: comma-separated algorithms")
    add("--steps", type=int, default=3, help="sync, step: train.py steps; the first is warm-up, not averaged")
    add("--batch-prompts", type=int, default=8, help="sync, step: train.py's --batch-prompts")
    add("--group-size", type=int, default=8, help="sync, step: train.py's --group-size")
    add("--rollout", default="vllm", choices=["vllm", "hf"], help="sync, step: train.py's --rollout")
    add("--nproc", type=int, default=2, help="sync, step: ranks (processes, GPUs) under torchrun")
    add("--timeout", type=int, default=3600, help="seconds before a torchrun child is killed")
    add("--dry-run", action="store_true", help="gpu: on this machine's CPU, tiny model and workload (CI)")
    a = p.parse_args()
    light = a.what in ("rollout", "train")
    a.dtypes = (a.dtype or ("float32,bfloat16" if light else "float32")).split(",")
    if not set(a.dtypes) <= {"float32", "bfloat16"}:
        p.error(f"--dtype {a.dtype!r}: float32, bfloat16 or both, comma-separated")
    a.models = (a.model or ("tiny,medium" if light and not a.quick else "tiny")).split(",")
    a.max_tokens = a.max_tokens or (16 if a.quick else 64 if light else 128)
    if a.what == "gpu":  # one GPU, a batch that keeps the first GPU check under 10 minutes; dry run: seconds a step
        a.nproc, a.steps = 1, 3
        a.batch_prompts, a.group_size, a.max_tokens = (2, 2, 16) if a.dry_run else (8, 8, 256)
    if a.quick:
        a.reps, a.prompts, a.n, a.prompt_len, a.steps, a.batch_prompts, a.group_size = 1, 2, 2, 32, 2, 2, 2
    if a.what == "_sync":
        return sync_worker(a)
    if a.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA is initialised; torchrun's ranks inherit it
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    os.makedirs(CACHE, exist_ok=True)
    t = time.time()
    if a.what == "rollout" and device.type == "cuda" and len(a.models) * len(a.dtypes) > 1:
        p.error("rollout on CUDA: one --model and one --dtype per process (vLLM's sleep mode allows one engine)")
    res = run[a.what](a, device)
    print(f"{time.time() - t:.0f} s")
    if a.json:
        print(json.dumps({"bench": a.what, "command": " ".join(["python", *sys.argv]), "date": time.strftime(
            "%Y-%m-%d %H:%M"), "device": str(device), "threads": int(os.environ["OMP_NUM_THREADS"]), "results": res}))


if __name__ == "__main__":
    main()
