"""
"Aha" metrics: what the think trace of a Countdown response does, beyond its score. Standard library only.

Why: TinyZero's "aha moment" is the model learning to check its attempts: it tries combinations of the numbers
in its think trace, compares each result with the target, stops at the first attempt that hits and gives that
attempt as its answer. The score cannot tell this skill from luck (a trace that stops anywhere is sometimes
right), so train.py's validation and pretrain.py's evaluation also log, as means over Countdown responses:
  attempts        the attempts per response (steps 'a op b=r' joined by ',', attempts joined by ';': the format
                  of pretrain.py's corpus);
  answer_hits     whether the final answer repeats an attempt of the trace that hits (a complete, correct
                  solution), i.e. the answer comes from the checked work;
  stop_after_hit  whether the trace stops right after its first hit: the skill itself.
Before the aha moment a trace runs on past its hits; after it, stop_after_hit and answer_hits rise with the
accuracy and the attempts per response fall.

Model output is hostile input here too: the response is cut at MAX_TRACE_CHARS, steps are read with str
methods and regexes that match in linear time, the answer with rewards.parse_expression (with its bounds),
and nothing raises.
"""

import ast
import re
from fractions import Fraction

import rewards

MAX_TRACE_CHARS = 20_000  # responses are cut here (a CPU run's are < 2,000 characters; 1,024 tokens ~ 4,000)
KEYS = ("attempts", "answer_hits", "stop_after_hit")  # what train.py and pretrain.py log (means over responses)
SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
INT = f"([0-9]{{1,{rewards.MAX_DIGITS}}})"
# '[-]a op b' and '[-]r' around a step's '='. Each run of spaces sits between different characters, so the regex
# never tries two ways to match the same text: linear time.
LEFT = re.compile(f" *(- *)?{INT} *([-+*/]) *{INT} *")
RIGHT = re.compile(f" *(- *)?{INT} *")


def _steps_of(answer):
    """The operations that the expression `answer` performs, as a sorted tuple of steps (a, op, b, result) with
    exact values, operands of + and * in ascending order; None when `answer` is not an expression that
    rewards.parse_expression accepts, uses a sign, or divides by zero."""
    tree = rewards.parse_expression(answer)
    if tree is None:
        return None
    value, steps = {}, []
    for node in reversed(list(ast.walk(tree))):  # children before their parents, as in rewards.evaluate_expression
        if isinstance(node, ast.UnaryOp):
            return None  # the attempts never write signs
        if isinstance(node, ast.Constant):
            value[node] = Fraction(node.value)
        elif isinstance(node, ast.BinOp):
            a, op, b = value[node.left], SYMBOLS[type(node.op)], value[node.right]
            if op == "/" and b == 0:
                return None
            value[node] = rewards.OPERATORS[type(node.op)](a, b)
            steps.append((min(a, b), op, max(a, b), value[node]) if op in "+*" else (a, op, b, value[node]))
    return tuple(sorted(steps))


def _step(text):
    """The step in text: 'so 14+1=15' -> (14, '+', 1, 15), '3-8=-5' -> (3, '-', 8, -5); None unless the text
    around its first '=' reads [-]INT OP INT = [-]INT (spaces allowed; anything before or after is ignored)."""
    lhs, eq, rhs = text.partition("=")
    lhs = lhs[len(lhs.rstrip("0123456789+-*/ ")):]  # the arithmetic just before '=' ...
    rhs = rhs[:len(rhs) - len(rhs.lstrip("0123456789- "))]  # ... and the number just after it
    left, right = LEFT.fullmatch(lhs), RIGHT.fullmatch(rhs)
    if not eq or not left or not right or max(len(lhs), len(rhs)) > rewards.MAX_ANSWER_CHARS:
        return None
    sign, a, op, b = left.groups()
    return -int(a) if sign else int(a), op, int(b), -int(right[2]) if right[1] else int(right[2])


def metrics(response, target, numbers):
    """Parse the think trace of a Countdown response into attempts and say how the answer relates to them.

    The trace is the text before the first '</think>' (before '<answer>' when there is no '</think>'; after a
    '<think>' in it, if any). Attempts are separated by ';', the steps of an attempt by ',', and a step is
    'a op b=r' with integers a, b, r and op in + - * / (the format of pretrain.py's corpus). Pieces that are
    not steps are ignored; an attempt is a ';'-separated piece with at least one step.

    An attempt HITS when it is a complete, correct solution: every step's arithmetic is exact (a / b only
    when b divides a), each step's operands are given numbers or results of earlier steps of the same
    attempt (each used once), all given numbers are used, and the last step's result equals the target.

    Args:
        response: the text the model generated after the prompt (anything that is not a str counts as empty).
        target: the Countdown target.
        numbers: the given numbers.
    Returns:
        {'attempts': number of attempts,
         'hits': number of attempts that hit,
         'answer_hits': True when the final answer (rewards.extract_answer) performs the same operations as an
             attempt that hit: the same steps a op b = r (operands of + and * in either order), whatever the
             order they are written in and the parentheses (so '(3+7)*2' and '2*(7+3)', not '3+7*2'),
         'stop_after_hit': True when some attempt hits and the first one that does is the trace's last
             attempt}.
    Linear in the length of the response, which is cut at MAX_TRACE_CHARS; never raises.

    >>> metrics("7-3=4,4*2=8;3*2=6,6+7=13;3+7=10,10*2=20</think>\\n<answer>(3+7)*2</answer>", 20, [3, 7, 2])
    {'attempts': 3, 'hits': 1, 'answer_hits': True, 'stop_after_hit': True}
    >>> metrics("3+7=10,10*2=20;7-2=5,5*3=15</think>\\n<answer>(7-2)*3</answer>", 20, [3, 7, 2])
    {'attempts': 2, 'hits': 1, 'answer_hits': False, 'stop_after_hit': False}
    """
    text = response[:MAX_TRACE_CHARS] if isinstance(response, str) else ""
    end = text.find("</think>")
    trace = text[:end] if end >= 0 else text.split(rewards.OPEN, 1)[0]
    trace = trace.rsplit("<think>", 1)[-1]
    target, given = int(target), [int(x) for x in numbers]
    attempts, hits, hit_steps, first_hit = 0, 0, set(), None
    for piece in trace.split(";"):
        steps = [s for s in map(_step, piece.split(",") if "=" in piece else ()) if s is not None]
        if not steps:
            continue
        attempts += 1
        pool = list(given)  # the values this attempt can still use: given numbers, then step results
        for a, op, b, r in steps:
            exact = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else (
                a // b if b and a % b == 0 else None)
            if exact != r or a not in pool:
                break
            pool.remove(a)
            if b not in pool:
                break
            pool.remove(b)
            pool.append(r)
        else:  # every step was exact and used values that were available
            if len(pool) == 1 and pool[0] == target:
                hits += 1
                first_hit = attempts if first_hit is None else first_hit
                hit_steps.add(tuple(sorted((min(a, b), op, max(a, b), r) if op in "+*" else (a, op, b, r)
                                           for a, op, b, r in steps)))
    return {"attempts": attempts, "hits": hits, "answer_hits": _steps_of(rewards.extract_answer(text)) in hit_steps,
            "stop_after_hit": first_hit is not None and first_hit == attempts}


def row_metrics(row, response):
    """metrics of a response to a Countdown data row (its target and numbers); None for other tasks.

    >>> row = {"data_source": "countdown", "reward_model": {"ground_truth": {"target": 20, "numbers": [3, 7, 2]}}}
    >>> row_metrics(row, "3+7=10,10*2=20</think>\\n<answer>(3+7)*2</answer>")["answer_hits"]
    True
    """
    if not rewards.is_countdown(row):
        return None
    truth = row["reward_model"]["ground_truth"]
    return metrics(response, truth["target"], truth["numbers"])
