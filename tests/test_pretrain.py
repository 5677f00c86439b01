"""Tests for pretrain.py: the synthetic corpus never teaches the Countdown solve skill, every attempt in it is
correct arithmetic in the reward's format, and the CLI writes a model folder that transformers loads."""
import argparse
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import REPO, python  # noqa: E402

sys.path.insert(0, REPO)
import aha  # noqa: E402
import data  # noqa: E402
import pretrain  # noqa: E402
import rewards  # noqa: E402

OPTS = argparse.Namespace(seed=0, arith_frac=0.2, num_counts=[3], num_range=[1, 9], target_range=[10, 50],
                          stop_prob=0.1, hit_stop_frac=0.0)


@pytest.mark.parametrize('numbers', [[3, 7, 2], [9, 9, 8], [5, 5, 5], [1, 2, 3, 4]])
def test_all_attempts_are_distinct_correct_and_use_every_number(numbers):
    every = pretrain.all_attempts(numbers)
    assert len({t for t, _ in every}) == len(every) > 0
    for text, expr in every:
        result = int(text.rsplit('=', 1)[1])
        assert rewards.evaluate_expression(expr) == result and rewards.validate_numbers(expr, numbers)
        # the reward and the aha metrics read the attempt as a correct solution for its own result
        response = f"{text}</think>\n<answer>{expr}</answer>"
        assert rewards.countdown_reward(response, result, numbers) == 1.0
        assert aha.metrics(response, result, numbers) == {
            'attempts': 1, 'hits': 1, 'answer_hits': True, 'stop_after_hit': True}
    assert len(pretrain.all_attempts([3, 7, 2])) == 31


def test_trace_stops_and_answers_whatever_the_target():
    """Where a trace stops and what it answers are a function of the numbers and the random state only: the
    target enters the checks' arithmetic, never a decision, so no trace stops or answers because of a hit."""
    every = pretrain.all_attempts([4, 6, 2])
    lengths = []
    for seed in range(200):
        texts = [pretrain.trace_response([4, 6, 2], target, random.Random(seed), 0.1) for target in (12, 48)]
        for target, text in zip((12, 48), texts):
            trace, answer = text.split('</think>\n<answer>')
            attempts = [a.split(':') for a in trace.split(';')]
            assert [t for t, _ in attempts] == [t for t, _ in every[:len(attempts)]]  # the first K, in order
            for t, check in attempts:  # each attempt compared with the target: 'T<', 'T=' or 'T>'
                r = int(t.rsplit('=', 1)[1])
                assert check == f"{target}{'<' if target < r else '>' if target > r else '='}"
            assert answer == every[len(attempts) - 1][1] + '</answer>'  # the LAST attempt, hit or not
        same = [[a.split(':')[0] for a in t.split('</think>')[0].split(';')] for t in texts]
        assert same[0] == same[1] and texts[0].split('<answer>')[1] == texts[1].split('<answer>')[1]
        lengths.append(len(same[0]))
    assert 6 < sum(lengths) / len(lengths) < 12 and max(lengths) > 20


def test_hit_stop_frac_is_the_share_of_traces_that_stop_at_the_first_hit():
    """--hit-stop-frac f: a share f of the traces stop at the first attempt that hits and answer it; the rest
    are the target-blind traces above. f = 0 draws nothing more, so an older corpus stays as it was."""
    numbers = [4, 6, 2]
    results = [int(t.rsplit('=', 1)[1]) for t, _ in pretrain.all_attempts(numbers)]
    first_hit = {r: results.index(r) for r in results if 10 <= r <= 50}
    for target in (min(first_hit, key=first_hit.get), max(first_hit, key=first_hit.get)):  # an early, a late hit
        k = first_hit[target]
        texts = [pretrain.trace_response(numbers, target, random.Random(s), 0.1, 0.3) for s in range(2000)]
        at_hit = [t for t in texts if t.split('</think>')[0].count(';') == k]  # stopped after attempt k + 1
        expected = 0.3 + 0.7 * 0.1 * 0.9 ** k  # the checked traces, plus the target-blind ones that stop there
        assert abs(len(at_hit) / len(texts) - expected) < 0.04, (target, k, len(at_hit) / len(texts), expected)
        assert all(rewards.countdown_reward(t, target, numbers) == 1.0 for t in at_hit)
    blind = [pretrain.trace_response(numbers, 12, random.Random(s), 0.1) for s in range(50)]
    assert blind == [pretrain.trace_response(numbers, 12, random.Random(s), 0.1, 0.0) for s in range(50)]


def test_corpus_prompts_are_the_rl_prompts_and_hits_are_chance():
    docs = [d for step in range(pretrain.BUCKET) for d in pretrain.corpus_batch(16, step, OPTS)]  # one bucket
    traces = [d for d in docs if d.startswith('Using the numbers')]
    assert 0.6 < len(traces) / len(docs) < 0.95
    answered = 0
    for d in traces:
        prompt, response = d.split('<think>', 1)
        head = prompt.split('[', 1)[1]
        numbers = [int(x) for x in head.split(']')[0].split(', ')]
        target = int(head.split('equals ')[1].rstrip('.\n'))
        row = data.countdown_row({'target': target, 'numbers': numbers}, 'tiny', 'train', 0)
        assert data.prompt_text(row) == prompt + '<think>'  # exactly the RL prompt text
        answered += rewards.countdown_reward(response, target, numbers) == 1.0
    assert answered / len(traces) < 0.15  # the answer hits only by chance (~6% per attempt)


def test_cli_pretrains_and_saves_a_model_transformers_loads(tmp_path):
    out = tmp_path / "base"
    r = python(os.path.join(REPO, "pretrain.py"), ["--out", out, "--steps", "3", "--batch", "4", "--warmup", "1",
                                                   "--eval-tasks", "4", "--max-new-tokens", "8"], timeout=300)
    assert r.returncode == 0, r.tail()
    assert "eval step 3" in r.stdout and not os.path.exists(f"{out}.tmp")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    text = "Using the numbers [3, 7, 2], create an equation that equals 20.\n<think>3+7=10"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte level: spaces and newlines survive
    assert model.config.hidden_size // model.config.num_attention_heads >= 32  # vLLM's CPU attention
    assert os.path.exists(out / "pretrain.json")
