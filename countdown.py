"""The Countdown numbers game: solvable tasks drawn by seed, and the brute-force solver behind them (every value
reachable from the numbers, each used once, + - * / with integer steps; one expression for a target, kept as the
row's "solution"). data.py's make_countdown runs draw() chunk by chunk. Standard library only.
"""
import random


def key(target, numbers):
    """What makes two Countdown tasks the same task (the order of the numbers does not)."""
    return ("countdown", int(target), tuple(sorted(int(x) for x in numbers)))


def draw(args):
    """One chunk of data.make_countdown's tasks: args = (seed, chunk, n, num_counts, num_range, target_range,
    exclude, max_failed). n tasks {"target", "numbers", "solution"}, a function of (seed, chunk) and the options;
    keys in exclude (key()) are never drawn. ValueError after max_failed useless draws in a row."""
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
