"""Multiplication tasks as TinyZero's multiply.py draws them: each factor has d digits half the time, d-1 or d-2
otherwise (or exactly d digits). data.py's make_multiply runs draw() chunk by chunk. Standard library only.
"""
import random


def key(a, b):
    """What makes two multiplication tasks the same task: 3 * 5 and 5 * 3 are."""
    return ("multiply", min(int(a), int(b)), max(int(a), int(b)))


def draw(args):
    """One chunk of data.make_multiply's tasks: args = (seed, chunk, n, digits, exact, exclude, max_failed). n tasks
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
