"""Tests for rewards.py: correct, wrong and malformed answers, TinyZero's exploits, hostile input, doctests."""
import doctest
import os
import re
import sys
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402
from rewards import countdown_reward, evaluate_expression, extract_answer, multiply_reward, score  # noqa: E402

BOUND_S = 0.010  # the promise: any response is scored within 10 ms


def cd(answer_text, target, numbers):
    return countdown_reward(f"<think>reasoning</think> {answer_text}", target, numbers)


@pytest.mark.parametrize('answer, target, numbers, expected', [
    ("<answer>(44 + 19) + 35</answer>", 98, [44, 19, 35], 1.0),
    ("<answer>8/(3-8/3)</answer>", 24, [8, 3, 8, 3], 1.0),  # a fraction on the way, exact arithmetic
    ("<answer>\n  8 / ( 3 -\n 8 / 3 )  \n</answer>", 24, [8, 3, 8, 3], 1.0),  # newlines and spaces
    ("<answer>3 - 8 + 29</answer>", 24, [3, 8, 29], 1.0),  # a negative on the way
    ("<answer>-3 + 27</answer>", 24, [3, 27], 1.0),  # a sign, as Python reads it
    ("<answer>19 + 35 + 44</answer>", 98, [44, 19, 35], 1.0),  # any order
    ("<answer>44 + 19 - 35</answer>", 98, [44, 19, 35], 0.1),  # wrong value
    ("<answer>44 + 54</answer>", 98, [44, 19, 35], 0.1),  # wrong numbers, right value
    ("<answer>44 + 19 + 35 + 0</answer>", 98, [44, 19, 35], 0.1),  # an extra number
    ("<answer>44 + 44 + 10</answer>", 98, [44, 19, 35], 0.1),  # a number used twice
    ("<answer>8 * 3</answer>", 24, [8, 3, 8, 3], 0.1),  # numbers unused
    ("<answer>44 + 19 + 35 = 98</answer>", 98, [44, 19, 35], 0.1),  # '=' is not allowed
    ("<answer></answer>", 98, [44, 19, 35], 0.1),  # empty
    ("<answer>(44 + 19 + 35</answer>", 98, [44, 19, 35], 0.1),  # unbalanced
    ("<answer>44 + 19 + 35)</answer>", 98, [44, 19, 35], 0.1),
    ("<answer>44 19 35</answer>", 98, [44, 19, 35], 0.1),  # no operators
    ("<answer>44 + (19) () + 35</answer>", 98, [44, 19, 35], 0.1),
    ("<answer>abs(44) + 19 + 35</answer>", 98, [44, 19, 35], 0.1),  # a call
    ("<answer>x + 19 + 35</answer>", 98, [44, 19, 35], 0.1),  # a name
    ("<answer>44 + 19 + 3٥</answer>", 98, [44, 19, 35], 0.1),  # a non-ASCII digit
    ("<answer>44 + 19 + 35</answer>", 98, [44.0, 19, 35], 1.0),  # float-valued numbers still match
    ("<answer>8 / (3 - 3) + 24</answer>", 24, [8, 3, 3, 24], 0.1),  # division by zero
    ("<answer>98</answer>", 98, [98], 1.0),
    # TinyZero's eval()-based check pays 1.0 for these three
    ("<answer>3**2*1</answer>", 9, [3, 2, 1], 0.1),
    ("<answer>(7//2)*4</answer>", 12, [7, 2, 4], 0.1),
    ("<answer>1.5*10</answer>", 15, [1, 5, 10], 0.1),
    ("<answer>44**19**35</answer>", 98, [44, 19, 35], 0.1),  # and this one hangs it
    ("<answer>1e1 + 0</answer>", 10, [1, 1, 0], 0.1),  # exponent notation
    ("<answer>0x1 + 9</answer>", 10, [0, 1, 9], 0.1),  # hex
    ("<answer>1_0</answer>", 10, [1, 0], 0.1),  # underscores
    ("<answer>3 ^ 2</answer>", 1, [3, 2], 0.1),  # any other operator
    ("<answer>7 % 4</answer>", 3, [7, 4], 0.1),
    # no complete answer block
    ("44 + 19 + 35", 98, [44, 19, 35], 0.0),
    ("<answer>44 + 19 + 35", 98, [44, 19, 35], 0.0),
    ("44 + 19 + 35</answer>", 98, [44, 19, 35], 0.0),
    ("<Answer>44 + 19 + 35</Answer>", 98, [44, 19, 35], 0.0),
    # several blocks: the last complete one counts
    ("<answer>1 + 1</answer> no, <answer>44 + 19 + 35</answer>", 98, [44, 19, 35], 1.0),
    ("<answer>44 + 19 + 35</answer> no, <answer>1 + 1</answer>", 98, [44, 19, 35], 0.1),
    ("<answer>44 + 19 + 35</answer> and then <answer> 1 +", 98, [44, 19, 35], 1.0),
    ("<answer>44 + 19 + 35</answer></answer>", 98, [44, 19, 35], 1.0),
    ("<answer>oops <answer>44 + 19 + 35</answer>", 98, [44, 19, 35], 1.0),  # innermost opening tag
])
def test_countdown_reward(answer, target, numbers, expected):
    assert cd(answer, target, numbers) == expected


def test_format_score_and_multiline_response():
    assert countdown_reward("<answer>1 + 1</answer>", 98, [44, 19, 35], format_score=0.25) == 0.25
    assert countdown_reward("<answer>1</answer>", 98, [44, 19, 35], format_score=0) == 0.0
    text = "<think>\nfirst 44 + 19 = 63\nthen 63 + 35 = 98\n</think>\n<answer>\n(44 + 19) + 35\n</answer>\n"
    assert countdown_reward(text, 98, [44, 19, 35]) == 1.0  # TinyZero only read the last line


@pytest.mark.parametrize('answer, product, expected', [
    ("<answer>5535</answer>", 5535, 1.0), ("<answer>\n 5535 \n</answer>", 5535, 1.0),
    ("<answer>05535</answer>", 5535, 1.0), ("<answer>-12</answer>", -12, 1.0), ("<answer>0</answer>", 0, 1.0),
    ("<answer>5534</answer>", 5535, 0.1), ("<answer>5,535</answer>", 5535, 0.1), ("<answer>+5535</answer>", 5535, 0.1),
    ("<answer>5535.0</answer>", 5535, 0.1), ("<answer>5_535</answer>", 5535, 0.1),
    ("<answer>55 35</answer>", 5535, 0.1),
    ("<answer>123*45</answer>", 5535, 0.1), ("<answer>٥٥٣٥</answer>", 5535, 0.1), ("<answer>-</answer>", 5535, 0.1),
    ("<answer></answer>", 5535, 0.1), ("<answer>5535</answer> <answer>1</answer>", 5535, 0.1),
    ("5535", 5535, 0.0), ("<answer>5535", 5535, 0.0),
])
def test_multiply_reward(answer, product, expected):
    assert multiply_reward(answer, product) == expected


def test_score_dispatches_on_data_source():
    row = {'data_source': 'countdown', 'reward_model': {'style': 'rule',
                                                        'ground_truth': {'target': 24, 'numbers': (8, 3, 8, 3)}}}
    assert score(row, "<answer>8/(3-8/3)</answer>") == 1.0
    assert score(row, "<answer>8*3</answer>", format_score=0.2) == 0.2
    for source in ('multiply', 'yolo/multiply-3_digit'):  # TinyZero's name for its multiply data
        assert score({'data_source': source, 'reward_model': {'ground_truth': 5535}}, "<answer>5535</answer>") == 1.0
    with pytest.raises(ValueError, match="countdown"):
        score({'data_source': 'gsm8k', 'reward_model': {'ground_truth': 1}}, "<answer>1</answer>")


def test_extract_and_evaluate():
    assert extract_answer("<answer> a </answer>") == 'a' and extract_answer(None) is None
    assert extract_answer("</answer><answer>") is None and extract_answer(b"<answer>1</answer>") is None
    assert evaluate_expression("2 * 3 + 4 * 5") == 26 and evaluate_expression("2 * (3 + 4) * 5") == 70
    assert evaluate_expression("8 - 3 - 2") == 3 and evaluate_expression("8 / 4 / 2") == 1  # left-associative
    assert evaluate_expression("--3") == 3 and evaluate_expression("(" * 100 + "1" + ")" * 100) == 1
    assert evaluate_expression("(" * 101 + "1" + ")" * 101) is None  # deeper than MAX_DEPTH
    assert evaluate_expression("9" * 100) == int("9" * 100) and evaluate_expression("9" * 101) is None
    assert rewards.validate_numbers("3 3 3", [3, 3, 3]) and not rewards.validate_numbers("3.0", [3, 0])


def test_python_parser_differences_are_closed():
    """The parser is Python's (ast): what it accepts beyond arithmetic is rejected, what it rejects that the
    rules accept is accepted, and its tree's depth counts the parentheses and signs around a number."""
    for text in ("()", "(1)(2)", "1 (2)", "(1)()", "3**2", "7//2", "+", "* 2", "1 * * 2"):  # not arithmetic
        assert evaluate_expression(text) is None and rewards.parse_expression(text) is None, text
    assert evaluate_expression("08 + 007") == 15 and evaluate_expression("00") == 0  # leading zeros, as int()
    assert rewards.validate_numbers("08 * 3", [8, 3]) and cd("<answer>08 * 3</answer>", 24, [8, 3]) == 1.0
    assert evaluate_expression("1 +\n2") == 3 and evaluate_expression("\u20031\u2003+\t1\x0b") == 2  # any whitespace
    assert evaluate_expression("-" * 100 + "1") == 1 and evaluate_expression("-" * 101 + "1") is None
    assert evaluate_expression("-(" * 50 + "1" + ")" * 50) == 1  # 50 signs and 50 parentheses
    assert evaluate_expression("-(" * 50 + "(1)" + ")" * 50) is None  # 101
    assert evaluate_expression("1+" + "(" * 100 + "2" + ")" * 100) == 3  # the depth of each number counts
    # a long chain is a tree as deep as it is long: evaluated without recursion
    assert evaluate_expression("+".join(["1"] * 500)) == 500 and evaluate_expression("-".join(["1"] * 500)) == -498

def test_worst_case_arithmetic_is_bounded():
    # The costliest text under MAX_ANSWER_CHARS: sums of 1/p over distinct primes grow a ~400-digit denominator.
    primes = [p for p in range(2, 2000) if all(p % q for q in range(2, int(p ** 0.5) + 1))]
    text = "1"
    for p in primes:
        if len(text) + len(f"+1/{p}") > rewards.MAX_ANSWER_CHARS:
            break
        text += f"+1/{p}"
    times = []
    for _ in range(3):
        t = time.perf_counter()
        assert evaluate_expression(text) is not None
        times.append(time.perf_counter() - t)
    assert min(times) < BOUND_S


HOSTILE = {
    'megabytes of text': "blah " * 1_000_000 + "<answer>44 + 19 + 35</answer>",
    'megabytes inside a block': "<answer>" + "(1+" * 1_000_000 + "</answer>",
    'nested parentheses': "<answer>" + "(" * 5000 + "44 + 19 + 35" + ")" * 5000 + "</answer>",
    'nested parentheses, short': "<answer>" + "(" * 450 + "44 + 19 + 35" + ")" * 450 + "</answer>",
    'signs, short': "<answer>" + "-" * 980 + "44 + 19 + 35</answer>",
    '100,000-digit literal': "<answer>" + "9" * 100_000 + "</answer>",
    'unclosed tags': "<answer>" * 100_000 + "44 + 19 + 35",
    'closing tags': "</answer>" * 100_000,
    'alternating tags': "<answer></answer" * 100_000 + "<answer>1</answer>",
    'power tower': "<answer>44**19**35</answer>",
    'long literal products': "<answer>" + "*".join(["9" * 99] * 10) + "</answer>",
    'many fractions, over the cap': "<answer>" + "+".join(f"1/{p}" for p in range(2, 200)) + "</answer>",
}


@pytest.mark.parametrize('name', HOSTILE)
def test_hostile_inputs_are_fast(name):
    text = HOSTILE[name]
    for fn in (lambda: countdown_reward(text, 98, [44, 19, 35]), lambda: multiply_reward(text, 5535)):
        times = []
        for _ in range(3):  # best of 3: the machine is shared, a single run can be descheduled
            t = time.perf_counter()
            assert fn() in (0.0, 0.1, 1.0)
            times.append(time.perf_counter() - t)
        assert min(times) < BOUND_S, (name, min(times))


PIECES = ['(', ')', '+', '-', '*', '/', '**', '//', ' ', '\n', '.', 'e', 'x', '_', '٣', '44', '19', '35',
          '0', '9' * 120, '<answer>', '</answer>', '<answer', 'answer>', '=', '\x00']


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(st.sampled_from(PIECES), max_size=400).map(''.join)),
       st.booleans())
def test_fuzz_never_raises_and_is_fast(text, wrap):
    text = f"<answer>{text}</answer>" if wrap else text
    t = time.perf_counter()
    results = (countdown_reward(text, 98, [44, 19, 35]), multiply_reward(text, 5535),
               score({'data_source': 'countdown', 'reward_model': {'ground_truth': {'target': 98,
                                                                                    'numbers': [44, 19, 35]}}}, text))
    elapsed = time.perf_counter() - t
    assert all(r in (0.0, 0.1, 1.0) for r in results)
    assert elapsed < 3 * BOUND_S  # three scorings


def tokens():
    return st.lists(st.one_of(st.integers(0, 30).map(str), st.sampled_from('+-*/()')), min_size=1, max_size=15)


@settings(max_examples=300, deadline=None)
@given(tokens())
def test_evaluate_matches_python_on_valid_syntax(toks):
    """Where Python parses the text too, our value equals Python's, computed over Fractions (trusted text)."""
    expr = ' '.join(toks)  # spaced, so '* *' and '/ /' are syntax errors in Python as well
    try:
        expected = eval(re.sub(r'\d+', lambda m: f"Fraction({m.group()})", expr), {'Fraction': Fraction})
        if not isinstance(expected, Fraction):
            expected = None  # e.g. '()' is a tuple in Python
    except (SyntaxError, ZeroDivisionError, TypeError):
        expected = None
    assert evaluate_expression(expr) == expected, expr


def test_doctests():
    assert doctest.testmod(rewards).failed == 0
