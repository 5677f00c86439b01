"""
Rows, prompts and data files for the Countdown and multiplication tasks; the tasks themselves (drawn by seed) and
their prompt texts are in countdown.py and multiply.py. Imports no torch.

    python data.py countdown --out data/countdown --train 327680 --test 1024 --seed 0
    python data.py countdown --out data/cpu --train 20000 --test 500 --num-counts 3 --num-range 1 9 \
        --target-range 10 50 --template tiny     # what the built-in base model (assets/countdown-base) knows
    python data.py multiply --out data/multiply --digits 3 3

Every file holds rows in TinyZero's schema, so TinyZero's own parquet files load unchanged:
    {"data_source": "countdown" | "multiply",
     "prompt": [{"role": "user", "content": <prompt text, or the bare question for the 'chat' template>}],
     "ability": "math",
     "reward_model": {"style": "rule", "ground_truth": {"target": 24, "numbers": [8, 3, 8, 3]} | <product>},
     "extra_info": {"split": "train" | "test", "index": <int>, "template": <name>[, "solution": <str>]}}
"""

import argparse
import json
import os
import time
from numbers import Integral

import numpy as np

import countdown
import multiply

MAX_LINE = 1 << 20  # bytes: a longer jsonl line is refused unparsed (a row is ~1 KB)


def _need(ok, problem):
    if not ok:
        raise ValueError(problem)


PROMPTS = {"countdown": countdown.PROMPTS, "multiply": multiply.PROMPTS}  # task -> template name -> text
# 'chat-think' (ours, for instruct models; docs/smollm2.md): rendered with the tokenizer's chat template, one solved
# task (a worked example), then the question, then the assistant turn prefilled with THINK_PREFILL (TinyZero's
# qwen-instruct idea): the response starts inside <think>. 'chat-demo': the same without the prefill (the model
# writes the block 3 times in 4 and learns the rest: docs/smollm2.md). SmolLM2-135M-Instruct sampled no answer
# block in 48 without the example, 36 in 48 with it (1-digit factors). Its small answer is rarely right when copied.
THINK_PREFILL = "Let me solve this step by step.\n<think>"
CHAT_THINK_DEMOS = {  # task -> (the example task, its reasoning and answer after THINK_PREFILL)
    "countdown": ({"target": 9, "numbers": [1, 2, 3]}, " 1 + 2 = 3, 3 * 3 = 9 </think>\n<answer> (1+2)*3 </answer>"),
    "multiply": ({"a": 2, "b": 3}, " 2 * 3 = 6 </think>\n<answer> 6 </answer>"),
}
CHAT_TEMPLATES = ("chat", "chat-think", "chat-demo")  # rendered by the tokenizer's own chat template (prompt_text)
TASKS = tuple(PROMPTS)


def task_key(task):
    """What makes two tasks the same task (used so train and test never share one)."""
    if "numbers" in task:
        return countdown.key(task["target"], task["numbers"])
    return multiply.key(task["a"], task["b"])


# ----------------------------------------------------------------------------------------------------------
# Rows and prompts

def _prompt(task, template):
    """The prompt text of one of a task's templates; ValueError lists the known ones."""
    known = tuple(PROMPTS[task])
    _need(template in known, f"unknown {task} template {template!r}; known: {', '.join(known)}")
    return PROMPTS[task][template]


def _row(task, template, content, truth, split, index, **extra):
    prompt = [{"role": "user", "content": content}]
    if template in ("chat-think", "chat-demo"):  # the worked example, the question (chat-think: a prefill)
        demo, solution = CHAT_THINK_DEMOS[task]
        prompt = [{"role": "user", "content": PROMPTS[task][template].format(**demo)},
                  {"role": "assistant", "content": THINK_PREFILL + solution}, *prompt]
        prompt += [{"role": "assistant", "content": THINK_PREFILL}] if template == "chat-think" else []
    return {"data_source": task, "prompt": prompt, "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": truth},
            "extra_info": {"split": split, "index": int(index), "template": template, **extra}}


def countdown_row(task, template, split, index):
    """A TinyZero-schema row for a Countdown task {'target', 'numbers'[, 'solution']}."""
    text = _prompt("countdown", template)
    target, numbers = int(task["target"]), [int(x) for x in task["numbers"]]  # plain ints: "[8, 3]" in the text
    return _row("countdown", template, text.format(numbers=numbers, target=target),
                {"target": target, "numbers": numbers}, split, index, solution=task.get("solution"))


def multiply_row(task, template, split, index):
    """A TinyZero-schema row for a multiplication task {'a', 'b'[, 'product']}."""
    a, b = int(task["a"]), int(task["b"])
    return _row("multiply", template, _prompt("multiply", template).format(a=a, b=b), a * b, split, index)


def prompt_text(row, tokenizer=None):
    """The exact string to feed the model for a row.

    'chat', 'chat-think' and 'chat-demo' rows hold messages and are rendered with the tokenizer's own chat template:
    a last user turn gets the assistant header after it, a last assistant turn (a prefill) is continued, not closed.
    Every other row (ours, or TinyZero's, which have no extra_info.template) holds the rendered prompt already.
    """
    template = (row.get("extra_info") or {}).get("template")
    if template in CHAT_TEMPLATES:
        if tokenizer is None:
            raise ValueError(f"a {template!r} template row needs a tokenizer (its chat template renders the prompt)")
        prefilled = row["prompt"][-1]["role"] == "assistant"
        return tokenizer.apply_chat_template(list(row["prompt"]), tokenize=False, **(
            {"continue_final_message": True} if prefilled else {"add_generation_prompt": True}))
    return "".join(m["content"] for m in row["prompt"])


def make_splits(task, n_train, n_test, seed, template="base", workers=1, progress=False, **options):
    """(train_rows, test_rows) that never share a task: test is drawn first, train excludes its tasks.
    options go to countdown.make / multiply.make (num_counts, num_range, target_range | digits, exact)."""
    _need(task in TASKS, f"unknown task {task!r}; known: {', '.join(TASKS)}")
    make, to_row = (countdown.make, countdown_row) if task == "countdown" else (multiply.make, multiply_row)
    _prompt(task, template)  # an unknown template fails before the work
    test = make(n_test, f"{seed}:test", workers=workers, progress=progress, **options)
    train = make(n_train, f"{seed}:train", exclude={task_key(t) for t in test}, workers=workers,
                 progress=progress, **options)
    return ([to_row(t, template, "train", i) for i, t in enumerate(train)],
            [to_row(t, template, "test", i) for i, t in enumerate(test)])


def default_splits(folder, seed, pretrained=None):
    """train.py's built-in default tasks, written to folder/train.jsonl and test.jsonl unless test.jsonl is there:
    2,048 train and 500 test tasks. A base model made by pretrain.py (pretrained: its pretrain.json "args") gets
    the Countdown tasks and the "tiny" template it was pretrained on; any other model small Countdown tasks in
    TinyZero's prompt."""
    if os.path.exists(os.path.join(folder, "test.jsonl")):
        return
    kw = dict(num_counts=(3,), num_range=(1, 20), target_range=(10, 50), template="base")
    if pretrained:
        kw = dict(num_counts=pretrained["num_counts"], num_range=pretrained["num_range"],
                  target_range=pretrained["target_range"], template="tiny")
    train, test = make_splits("countdown", 2048, 500, seed=seed, workers=1, **kw)
    write_rows(train, os.path.join(folder, "train.jsonl"))
    write_rows(test, os.path.join(folder, "test.jsonl"))


# ----------------------------------------------------------------------------------------------------------
# Files: jsonl and parquet, with every row checked on the way in and out

def _int(x, what):
    # numbers.Integral also covers numpy integers from parquet readers; bool is an int in Python, not here
    if type(x) is int or isinstance(x, Integral) and not isinstance(x, bool):
        return int(x)
    raise ValueError(f"{what}: expected an integer, got {x!r}")


def _seq(x, what):
    x = x.tolist() if hasattr(x, "tolist") else x  # numpy arrays from parquet readers
    if not isinstance(x, (list, tuple)):
        raise ValueError(f"{what}: expected a list, got {x!r}")
    return x


def _check(row):
    """Validate one row and return it normalised (plain ints and lists); ValueError names the field. Messages are
    built only on failure (this runs for every row); _check_all adds the file and the line or row."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    source = row.get("data_source")
    if not isinstance(source, str):
        raise ValueError(f"data_source: expected a string, got {source!r}")
    # matched as substrings, as TinyZero does (its multiply data is 'yolo/multiply-3_digit')
    task = ("countdown" if "countdown" in source else
            "multiply" if "multiply" in source or "arithmetic" in source else "")
    if not task:
        raise ValueError(f"data_source {source!r} is not a known task ({', '.join(TASKS)})")
    prompt = _seq(row.get("prompt"), "prompt")
    if not prompt or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and
                             isinstance(m.get("content"), str) for m in prompt):
        raise ValueError("prompt: expected a non-empty list of {role: str, content: str}")
    reward = row.get("reward_model")
    if not isinstance(reward, dict) or "ground_truth" not in reward:
        raise ValueError("reward_model: expected {style, ground_truth}")
    truth = reward["ground_truth"]
    if task == "countdown":
        if not isinstance(truth, dict):
            raise ValueError(f"reward_model.ground_truth: expected {{target, numbers}}, got {truth!r}")
        what = "reward_model.ground_truth.numbers"
        truth = {"target": _int(truth.get("target"), "reward_model.ground_truth.target"),
                 "numbers": [_int(x, what) for x in _seq(truth.get("numbers"), what)]}
        if not truth["numbers"]:
            raise ValueError(f"{what}: empty")
    else:
        truth = _int(truth, "reward_model.ground_truth")
    extra = row.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"extra_info: expected an object, got {extra!r}")
    known = tuple(PROMPTS[task])
    if extra.get("template") not in known + (None,):
        raise ValueError(f"extra_info.template {extra['template']!r} is unknown for {task}; known: {', '.join(known)}")
    if extra.get("index") is not None:
        extra = {**extra, "index": _int(extra["index"], "extra_info.index")}
    ability = row.get("ability", "math")
    if not isinstance(ability, str):
        raise ValueError(f"ability: expected a string, got {ability!r}")
    return {"data_source": source, "prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
            "ability": ability, "reward_model": {"style": reward.get("style") or "rule", "ground_truth": truth},
            "extra_info": extra}


def _check_all(path, unit, records, parse=None):
    """_check() each (number, record), after parse(record, index) if given; errors name file, line/row, problem."""
    for index, (n, r) in enumerate(records):
        try:
            yield _check(parse(r, index) if parse else r)
        except ValueError as e:
            raise ValueError(f"{path}: {unit} {n}: {e}") from None


def iter_rows(path):
    """Rows from a .jsonl or .parquet file, one at a time, never the whole file in memory: our rows, TinyZero's, or
    raw Countdown-Tasks-3to4 (target, nums; turned into base-template rows). Every row is checked. Errors are one
    line naming the file, the line or row, and the problem: ValueError, or FileNotFoundError for a missing file."""
    path = str(path)
    _need(path.endswith((".jsonl", ".parquet")), f"{path}: unknown file type; expected .jsonl or .parquet")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    split = "test" if os.path.basename(path).startswith("test") else "train"  # for raw rows only

    def parse(r, index):
        if isinstance(r, bytes):  # a jsonl line
            if len(r) > MAX_LINE and not r.endswith(b"\n"):  # readline() stopped at MAX_LINE + 1 bytes
                raise ValueError(f"longer than {MAX_LINE:,} bytes")
            try:
                r = json.loads(r.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"invalid UTF-8 at byte {e.start + 1} ({e.reason})") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"invalid JSON: {e}") from None
            except RecursionError:  # [[[[...]]]] thousands deep
                raise ValueError("invalid JSON: nested too deeply") from None
        if isinstance(r, dict) and "data_source" not in r and "target" in r and "nums" in r:  # raw dataset
            nums = [_int(x, "nums") for x in _seq(r["nums"], "nums")]
            r = countdown_row({"target": _int(r["target"], "target"), "numbers": nums}, "base", split, index)
        return r

    try:
        if path.endswith(".jsonl"):  # read as bytes, line by line
            with open(path, "rb") as f:
                lines = enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1)
                yield from _check_all(path, "line", ((n, line) for n, line in lines if line.strip()), parse)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq  # lazily: pyarrow takes ~0.3 s to import
        try:  # in batches of 65,536 rows: a whole table as Python dicts would cost ~3 KB a row
            batches = pq.ParquetFile(path).iter_batches(65536) if os.path.getsize(path) else []
            rows = (r for batch in batches for r in batch.to_pylist())
            yield from _check_all(path, "row", enumerate(rows), parse)
        except (pa.ArrowException, OSError) as e:  # not parquet, truncated, damaged
            why = " ".join(str(e).replace(f"Could not open Parquet input source '{path}': ", "").split())
            raise ValueError(f"{path}: not a readable parquet file: {why}") from None
    except OSError as e:  # a folder, no permission, a disk error
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None


def load_rows(path):
    """iter_rows(path) as a list; ValueError for a file without rows."""
    rows = list(iter_rows(path))
    _need(rows, f"{path}: no rows")
    return rows


class Split:
    """A split as train.py holds it, read from a file (iter_rows: its checks and errors): each row as compact JSON
    in one buffer (~0.85 KB a TinyZero Countdown row, where a dict costs ~3 KB), its dict built when asked for. Token
    ids are made per batch (a few ms a step), not held, so every rank can hold every row (docs/benchmarks.md)."""

    def __init__(self, path):
        self.name, buf, ends = os.path.basename(str(path)).split(".")[0], bytearray(), [0]
        for row in iter_rows(path):
            buf += json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode()
            ends.append(len(buf))
        _need(len(ends) > 1, f"{path}: no rows")
        self.buf, self.ends, self.keep = buf, np.array(ends), np.arange(len(ends) - 1)  # keep: see keep_short

    def __len__(self):
        return len(self.keep)

    def batch(self, idx, tokenizer, kept=True):
        """(row dicts, prompt token ids) at positions idx of the kept rows (of all the file's rows with kept=False).
        The ids come from the tokenizer's Rust backend where it has one: the ids of calling the tokenizer (no special
        tokens added), in half the time (no offsets, no masks, no BatchEncoding)."""
        rows = [json.loads(self.buf[self.ends[j]:self.ends[j + 1]]) for j in (self.keep[idx] if kept else idx)]
        texts, fast = [prompt_text(r, tokenizer) for r in rows], getattr(tokenizer, "backend_tokenizer", None)
        if fast is None or fast.padding or fast.truncation:  # as a tokenizer.json may set; calling the tokenizer
            return rows, tokenizer(texts, add_special_tokens=False)["input_ids"]  # unsets them (for the next batch)
        return rows, [e.ids for e in fast.encode_batch_fast(texts, add_special_tokens=False)]

    def count_tokens(self, tokenizer, shard=0, shards=1, chunk=4096):
        """The prompt token count of every row, counted only for every shards-th row from shard (0 elsewhere: the
        shards' counts sum to all counts), chunk by chunk."""
        counts = np.zeros(len(self.ends) - 1, dtype=np.int32)
        for c in range(shard, len(counts), chunk * shards):
            js = np.arange(c, min(c + chunk * shards, len(counts)), shards)
            counts[js] = [len(x) for x in self.batch(js, tokenizer, kept=False)[1]]
        return counts

    def keep_short(self, counts, max_len, drop_long=False, say=None):
        """Keep the rows whose prompts have at most max_len tokens (counts: count_tokens' of all shards); longer
        ones raise ValueError (how many, the longest) or, with drop_long, are dropped, and say(a line) says so."""
        long = counts > max_len
        _need(not long.any() or drop_long, f"{long.sum()} of {len(counts)} {self.name} prompts are longer than "
              f"--max-prompt-len {max_len} (longest {counts.max()} tokens); raise it or pass --long-prompts drop")
        self.keep = np.flatnonzero(~long)
        if long.any() and say:
            say(f"dropping {long.sum()} of {len(counts)} {self.name} prompts longer than {max_len} tokens")


def write_rows(rows, path):
    """Write rows to .jsonl or .parquet (by suffix), checking each; creates the folder. The file appears whole or
    not at all (written beside it, then renamed), so a killed writer leaves no half file to be read later."""
    path = str(path)
    _need(path.endswith((".jsonl", ".parquet")), f"{path}: unknown file type; expected .jsonl or .parquet")
    rows = list(_check_all(path, "row", enumerate(rows)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    if path.endswith(".jsonl"):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(tmp, path)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:  # in batches of 65,536 rows: one big table would double peak memory
        first = pa.Table.from_pylist(rows[:65536])
        with pq.ParquetWriter(tmp, first.schema) as writer:
            writer.write_table(first)
            for i in range(65536, len(rows), 65536):
                writer.write_table(pa.Table.from_pylist(rows[i:i + 65536], schema=first.schema))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:  # e.g. Countdown and multiplication rows in one file
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ValueError(f"{path}: rows do not fit one parquet schema ({e}); write each task to its own "
                         f"file or use .jsonl") from None
    os.replace(tmp, path)


def find_split(data_dir, split):
    """The path of DIR/{split}.jsonl or DIR/{split}.parquet. FileNotFoundError names what was looked for;
    ValueError where both exist (which one to read would be a guess)."""
    paths = [os.path.join(str(data_dir), f"{split}{ext}") for ext in (".jsonl", ".parquet")]
    found = [p for p in paths if os.path.exists(p)]
    if not found:
        raise FileNotFoundError(f"no {split} data: looked for {' and '.join(paths)}")
    if len(found) > 1:
        raise ValueError(f"both {found[0]} and {found[1]} exist: keep one of them (move or delete the other)")
    return found[0]


def main(argv=None):
    p = argparse.ArgumentParser(description="Write train/test files of Countdown or multiplication tasks.")
    sub = p.add_subparsers(dest="task", required=True, metavar="{countdown,multiply}")
    for task in TASKS:
        s = sub.add_parser(task, help=f"{task} tasks")
        s.add_argument("--out", required=True, help="output folder for train.* and test.*")
        s.add_argument("--train", type=int, default=327_680, help="train tasks (TinyZero: 327,680)")
        s.add_argument("--test", type=int, default=1024, help="test tasks, never shared with train (TinyZero: 1,024)")
        s.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files")
        s.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl", help="file format")
        s.add_argument("--workers", type=int, default=None, help="processes (default: all cores for large N)")
        s.add_argument("--template", choices=tuple(PROMPTS[task]), default="base",
                       help="prompt template; 'chat': the question, for the tokenizer's chat template; "
                            "'chat-think': a worked example, the question, the assistant turn prefilled to <think>; "
                            "'chat-demo': chat-think without the prefill")
        if task == "countdown":
            s.add_argument("--num-counts", type=int, nargs="+", default=[3, 4], help="how many numbers per task")
            s.add_argument("--num-range", type=int, nargs=2, default=[1, 99], metavar=("LO", "HI"),
                           help="numbers are drawn from LO..HI")
            s.add_argument("--target-range", type=int, nargs=2, default=[10, 100], metavar=("LO", "HI"),
                           help="targets are in LO..HI")
        else:
            s.add_argument("--digits", type=int, nargs=2, default=[3, 3], metavar=("A", "B"),
                           help="digits of the two factors (at most, TinyZero's mix; exactly with --exact)")
            s.add_argument("--exact", action="store_true", help="factors have exactly the given digits")
    a = vars(p.parse_args(argv))  # what is left after these pops goes to make_splits as keywords
    task, out, fmt, n_train, n_test = (a.pop(k) for k in ("task", "out", "format", "train", "test"))
    t0 = time.time()
    try:
        for split, rows in zip(("train", "test"), make_splits(task, n_train, n_test, progress=True, **a)):
            path = os.path.join(out, f"{split}.{fmt}")
            write_rows(rows, path)
            print(f"wrote {len(rows):,} rows to {path}")
    except (ValueError, OSError) as e:  # bad options, an --out that cannot be written
        p.exit(2, f"data.py: error: {e}\n")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
