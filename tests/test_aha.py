"""Tests for aha.py: attempts, hits and stopping read from the think trace, tolerant parsing, hostile input,
doctests."""
import doctest
import os
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_rewards import BOUND_S, HOSTILE, PIECES  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import aha  # noqa: E402
import data  # noqa: E402


def trace_metrics(trace, answer, target=20, numbers=(3, 7, 2)):
    return aha.metrics(f"{trace}</think>\n<answer>{answer}</answer>", target, list(numbers))


def test_metrics_attempts_hits_and_stopping():
    hit = "3+7=10,10*2=20"
    assert trace_metrics(f"7-3=4,4*2=8;{hit}", "(3+7)*2") == {"attempts": 2, "hits": 1, "answer_hits": True,
                                                              "stop_after_hit": True}
    # the hit is not the last attempt: the answer (the last attempt) misses
    assert trace_metrics(f"{hit};7-2=5,5*3=15", "(7-2)*3") == {"attempts": 2, "hits": 1, "answer_hits": False,
                                                               "stop_after_hit": False}
    # two hits, the answer is the first one: it hits, but the trace did not stop at it
    m = trace_metrics(f"{hit};2*7=14,14+3=17;{hit}", "(3+7)*2")
    assert m == {"attempts": 3, "hits": 2, "answer_hits": True, "stop_after_hit": False}
    # the same tree in another order, or with extra parentheses, is the same answer; another tree is not
    for answer, same in [("2*(7+3)", True), ("((3+7))*2", True), (" ( 3 + 7 ) * 2 ", True), ("3+7*2", False),
                         ("(3+7)*2+0", False), ("", False), ("(3+7)*", False)]:
        assert trace_metrics(hit, answer)["answer_hits"] is same, answer
    assert trace_metrics("", "(3+7)*2") == {"attempts": 0, "hits": 0, "answer_hits": False, "stop_after_hit": False}


@pytest.mark.parametrize("trace", [
    "3+7=11,11*2=22",  # wrong arithmetic (22 is not the target either way)
    "3+7=10,10*2=21",  # wrong arithmetic on the last step: no hit although the claimed result is... not 20
    "3+3=6,6*2=12,12+8=20",  # a number used twice, 8 not given
    "7*3=21,21-1=20",  # 1 is not given, 2 unused
    "3*7=21",  # right value for target 21 below, but 2 is unused
    "7/2=3,3+3=6",  # inexact division
])
def test_metrics_needs_a_correct_complete_solution(trace):
    for target in (20, 21):
        m = trace_metrics(trace, "0", target)
        assert m["attempts"] == 1 and m["hits"] == 0 and not m["stop_after_hit"]


def test_metrics_parsing_is_tolerant():
    # spaces, junk pieces, a '<think>' in the response, no '</think>', division, a negative step
    r = "<think>let me try: 8 / 2 = 4 , 4 * 3 = 12; hmm;;; 3-8=-5,-5+... ; 8/2=4,4*3=12 <answer>(8/2)*3</answer>"
    assert aha.metrics(r, 12, [8, 2, 3]) == {"attempts": 3, "hits": 2, "answer_hits": True, "stop_after_hit": False}
    assert aha.metrics("3-8=-5,-5+8=3;", 3, [3, 8, 8]) == {"attempts": 1, "hits": 1, "answer_hits": False,
                                                           "stop_after_hit": True}
    assert aha.metrics("so 3-8=-5, and -5+8 = 3 ok", 3, [3, 8, 8])["hits"] == 1
    for bad in (None, b"3+7=10", 42):
        assert aha.metrics(bad, 20, [3, 7, 2])["attempts"] == 0


TRACE_HOSTILE = {**HOSTILE,
                 "many steps": "1+1=2," * 200_000,
                 "many attempts": "3+7=10,10*2=20;" * 100_000 + "</think><answer>(3+7)*2</answer>",
                 "long literals in steps": ("9" * 99 + "*" + "9" * 99 + "=1;") * 5000,
                 "separators only": ";," * 500_000}


@pytest.mark.parametrize("name", TRACE_HOSTILE)
def test_metrics_hostile_inputs_are_bounded(name):
    times = []
    for _ in range(3):
        t = time.perf_counter()
        m = aha.metrics(TRACE_HOSTILE[name], 20, [3, 7, 2])
        times.append(time.perf_counter() - t)
    assert set(m) == {"attempts", "hits", "answer_hits", "stop_after_hit"}
    assert min(times) < 20 * BOUND_S, (name, min(times))  # one validation response: well under 0.2 s


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES + [";", ",", "3", "7", "2", "10", "20", "</think>", "<think>"]),
                max_size=300).map("".join))
def test_metrics_fuzz_never_raises(text):
    m = aha.metrics(text, 20, [3, 7, 2])
    assert 0 <= m["hits"] <= m["attempts"] and isinstance(m["answer_hits"], bool)
    assert not m["stop_after_hit"] or m["hits"] >= 1


def test_row_metrics_dispatches_on_data_source_like_score():
    """Countdown rows (data_source containing 'countdown', as score() matches them) get metrics with the
    row's target and numbers; rows of other tasks get None, where score() gives the multiplication reward."""
    response = "3*2=6,6+7=13;3+7=10,10*2=20</think>\n<answer>(3+7)*2</answer>"
    row = data.countdown_row({"target": 20, "numbers": [3, 7, 2]}, "base", "test", 0)
    assert aha.row_metrics(row, response) == aha.metrics(response, 20, [3, 7, 2])
    assert aha.row_metrics(row, response)["answer_hits"] is True
    mult = {"data_source": "multiply", "reward_model": {"ground_truth": 408}}
    assert aha.row_metrics(mult, "<answer>408</answer>") is None


def test_doctests():
    assert doctest.testmod(aha).failed == 0
