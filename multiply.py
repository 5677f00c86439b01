"""Multiplication tasks as TinyZero's multiply.py draws them: each factor has d digits half the time, d-1 or d-2
otherwise (or exactly d digits), drawn by seed (make); and their prompt texts. Standard library only, but for
make()'s progress bar (chunks.py).
"""
import random

import chunks

# The prompt texts (data.py renders them), character for character as in TinyZero's
# examples/data_preprocess/multiply.py, and ours.
QUESTION = ("Give me the answer of the following equation: {a} * {b} = ? Show your work in <think> </think> "
            "tags. And return only the final number in <answer> </answer> tags.")
PROMPTS = {
    "base": "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
            "The assistant first thinks about the reasoning process in the mind and then provides the user with "
            "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
            "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> RESULT_NUMBER "
            "</answer>. User: Give me the answer of the following equation: {a} * {b} = Assistant: Ok let me "
            "think about it.\n<think>",
    # ours, not TinyZero's: the same instructions phrased as a user turn, with no example answer (SmolLM2 copied the
    # '<answer> 42 </answer>' an earlier version showed); 'chat-think' adds a worked example (data.CHAT_THINK_DEMOS)
    "chat": QUESTION,
    "chat-think": QUESTION,
    "chat-demo": QUESTION,
}


def key(a, b):
    """What makes two multiplication tasks the same task: 3 * 5 and 5 * 3 are."""
    return ("multiply", min(int(a), int(b)), max(int(a), int(b)))


def make(n, seed, digits=(3, 3), exact=False, exclude=None, workers=1, progress=False):
    """n multiplication tasks [{'a', 'b', 'product'}] (draw()); digits=(a_digits, b_digits) are the maximum
    digit counts (TinyZero's mix of shorter factors), or the exact ones with exact=True."""
    digits = tuple(digits)
    if not (len(digits) == 2 and all(1 <= d <= 100 for d in digits)):
        raise ValueError(f"multiply: digits must be two counts in 1..100, got {digits}")
    args = (seed, digits, exact, frozenset(exclude or ()), chunks.MAX_FAILED_DRAWS)
    return chunks.run(draw, n, args, workers, progress, "multiply")


def draw(args):
    """One chunk of make()'s tasks: args = (seed, chunk, n, digits, exact, exclude, max_failed). n tasks
    {"a", "b", "product"}, a function of (seed, chunk) and the options; keys in exclude (key()) are never drawn.
    ValueError after max_failed excluded draws in a row."""
    seed, chunk, n, digits, exact, exclude, max_failed = args
    rng = random.Random(f"multiply:{seed}:{chunk}")

    def factor(d):
        if exact:  # exactly d digits
            return rng.randint(10 ** (d - 1), 10 ** d - 1)
        r = rng.randint(0, 3)  # TinyZero: 0 -> d-2 digits, 1 -> d-1, 2 or 3 -> d; all ranges start at 0
        return rng.randint(0, 10 ** max(d - 2 if r == 0 else d - 1 if r == 1 else d, 0) - 1)

    tasks, failed = [], 0
    while len(tasks) < n:
        a, b = factor(digits[0]), factor(digits[1])
        if exclude and key(a, b) in exclude:
            failed += 1
            if failed > max_failed:
                raise ValueError(f"multiply: {max_failed} draws in a row were all excluded tasks (digits={digits}, "
                                 f"{len(exclude)} excluded): use more digits or fewer test tasks")
            continue
        failed = 0
        tasks.append({"a": a, "b": b, "product": a * b})
    return tasks
