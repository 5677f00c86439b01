"""The Countdown numbers game: its prompt texts, solvable tasks drawn by seed (make), and the brute-force solver
behind them (every value reachable from the numbers, each used once, + - * / with integer steps; one expression for
a target, kept as the row's "solution"). Standard library only, but for make()'s progress bar (chunks.py).
"""
import random

import chunks

# The prompt texts (data.py renders them), character for character as in TinyZero's
# examples/data_preprocess/countdown.py, and ours.
QUESTION = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.")
PROMPTS = {
    "base": "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
            "The assistant first thinks about the reasoning process in the mind and then provides the user with "
            "the answer.\nUser: " + QUESTION + "\nAssistant: Let me solve this step by step.\n<think>",
    "qwen-instruct": "<|im_start|>system\nYou are a helpful assistant. You first thinks about the reasoning "
                     "process in the mind and then provides the user with the answer.<|im_end|>\n<|im_start|>user"
                     "\n " + QUESTION + "<|im_end|>\n<|im_start|>assistant\nLet me solve this step by step."
                     "\n<think>",
    "chat": QUESTION,  # the user turn only; data.prompt_text() renders it with the tokenizer's template
    # ours, not TinyZero's: the question's first sentence only (~70 bytes instead of ~565), for small CPU
    # models; pretrain.py's corpus uses exactly this text, so the built-in base model knows it
    "tiny": "Using the numbers {numbers}, create an equation that equals {target}.\n<think>",
    "chat-think": QUESTION.split(", for example")[0] + ".",  # see data.CHAT_THINK_DEMOS
    "chat-demo": QUESTION.split(", for example")[0] + ".",
}


def key(target, numbers):
    """What makes two Countdown tasks the same task (the order of the numbers does not)."""
    return ("countdown", int(target), tuple(sorted(int(x) for x in numbers)))


def make(n, seed, num_counts=(3, 4), num_range=(1, 99), target_range=(10, 100), exclude=None, workers=1,
         progress=False):
    """n solvable Countdown tasks [{'target', 'numbers', 'solution'}], deterministic in (n, seed, options).

    Like Countdown-Tasks-3to4: a count drawn from num_counts, that many numbers uniform in num_range, then a
    target drawn uniformly among the values in target_range that +, -, *, / with exact integer steps reach
    using each number once. Tasks whose key() is in `exclude` are never returned. workers=None uses
    every available core for n >= 20,000 (the CLI does; inside a trainer, forking is best avoided).
    """
    num_counts, num_range, target_range = tuple(num_counts), tuple(num_range), tuple(target_range)
    if not (num_counts and all(1 <= k <= 5 for k in num_counts)):
        raise ValueError(f"countdown: counts must be in 1..5, got {num_counts}")
    if not (len(num_range) == 2 and 1 <= num_range[0] <= num_range[1]):
        raise ValueError(f"countdown: number range must be 1 <= lo <= hi, got {num_range}")
    if not (len(target_range) == 2 and 0 <= target_range[0] <= target_range[1]):
        raise ValueError(f"countdown: target range must be 0 <= lo <= hi, got {target_range}")
    top = max(max(k * num_range[1], num_range[1] ** k) for k in num_counts)  # the largest value any task reaches
    if not target_range[0] <= top:
        raise ValueError(f"countdown: no target in {target_range} can be reached: numbers in {num_range} "
                         f"with counts {num_counts} reach at most {top}")
    args = (seed, num_counts, num_range, target_range, frozenset(exclude or ()), chunks.MAX_FAILED_DRAWS)
    return chunks.run(draw, n, args, workers, progress, "countdown")


def draw(args):
    """One chunk of make()'s tasks: args = (seed, chunk, n, num_counts, num_range, target_range, exclude,
    max_failed). n tasks {"target", "numbers", "solution"}, a function of (seed, chunk) and the options; keys in
    exclude (key()) are never drawn. ValueError after max_failed useless draws in a row."""
    seed, chunk, n, num_counts, num_range, target_range, exclude, max_failed = args
    rng = random.Random(f"countdown:{seed}:{chunk}")  # str seeds are hashed deterministically (sha512)
    lo, hi = target_range
    tasks, failed = [], 0
    while len(tasks) < n:
        numbers = [rng.randint(*num_range) for _ in range(rng.choice(num_counts))]
        vals = solve_all(numbers)
        full = (1 << len(numbers)) - 1
        # Draw the target among the reachable ones in range: every draw of numbers with any is kept.
        targets = sorted(v for v in vals[full] if lo <= v <= hi)
        if exclude and targets:
            targets = [t for t in targets if key(t, numbers) not in exclude]
        if not targets:
            failed += 1
            if failed > max_failed:
                raise ValueError(f"countdown: {max_failed} draws in a row gave no usable task (num_counts="
                                 f"{num_counts}, num_range={num_range}, target_range={target_range}, {len(exclude)} "
                                 "excluded tasks): the targets are (nearly) unreachable or all excluded; widen the "
                                 "ranges")
            continue
        failed = 0
        target = rng.choice(targets)
        solution = expression(vals, numbers, full, target)
        tasks.append({"target": target, "numbers": numbers, "solution": solution})
    return tasks


def _combine(xs, ys):
    """All values x op y (either order) for x in xs, y in ys with integer steps. Values stay >= 0: any
    expression with negative steps has a mirror image with the signs pushed out, so nothing is lost."""
    out = set()
    for x in xs:  # list comprehensions per operator: ~3x faster than one Python loop over (x, y) pairs
        out.update([x + y for y in ys])
        out.update([x * y for y in ys])
        out.update([x - y if x >= y else y - x for y in ys])
        if x:
            out.update([y // x for y in ys if y % x == 0])
        out.update([x // y for y in ys if y and x % y == 0])
    return out


def solve_all(numbers):
    """Reachable values of every subset of `numbers`: {bitmask: set}. The full mask is (1 << len) - 1.

    Subset dynamic programming: a subset's values combine the values of each split into two halves, which
    covers every expression tree (((a b) c) d), ((a b) (c d)), ... once per split.
    """
    vals = {1 << i: {v} for i, v in enumerate(numbers)}
    for mask in range(1, 1 << len(numbers)):
        if mask in vals:
            continue
        s, sub = set(), (mask - 1) & mask
        while sub:  # enumerate the proper non-empty subsets of mask
            if sub < mask ^ sub:  # each unordered split once
                s |= _combine(vals[sub], vals[mask ^ sub])
            sub = (sub - 1) & mask
        vals[mask] = s
    return vals


def expression(vals, numbers, mask, target):
    """One expression over the numbers in `mask` that equals `target`, walking back through solve_all()."""
    if mask & (mask - 1) == 0:
        return str(numbers[mask.bit_length() - 1])
    sub = (mask - 1) & mask
    while sub:
        other = mask ^ sub
        ys = vals[other]
        for x in vals[sub]:
            # (y, op, y first?) for each way x op y or y op x can equal target, with y from the other half
            cands = [(target - x, "+", False), (x - target, "-", False), (x + target, "-", True)]
            if x:
                cands.append((target * x, "/", True))  # y / x
                if target % x == 0:
                    cands.append((target // x, "*", False))
                if target and x % target == 0:
                    cands.append((x // target, "/", False))  # x / y
            elif target == 0:
                cands.append((next(iter(ys)), "*", False))  # 0 * anything
            for y, op, y_first in cands:
                if y in ys:
                    a, b = expression(vals, numbers, sub, x), expression(vals, numbers, other, y)
                    a = a if sub & (sub - 1) == 0 else f"({a})"  # parenthesise compound operands
                    b = b if other & (other - 1) == 0 else f"({b})"
                    return f"{b} {op} {a}" if y_first else f"{a} {op} {b}"
        sub = (sub - 1) & mask
    raise ValueError(f"{target} is not reachable from {numbers}")


def solve(numbers, target):
    """A solution for `target` from `numbers` (each used once, integer steps), or None.

    >>> solve([44, 19, 35], 98)
    '(35 + 19) + 44'
    >>> solve([8, 3, 8, 3], 24) is None  # 8 / (3 - 8 / 3) needs a fraction on the way
    True
    """
    vals = solve_all(numbers)
    full = (1 << len(numbers)) - 1
    return expression(vals, numbers, full, target) if target in vals[full] else None
