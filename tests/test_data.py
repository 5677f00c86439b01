"""Tests for data.py, countdown.py and multiply.py: generators (checked by an independent solver), prompt texts, files,
the CLI, bad input."""
import doctest
import json
import os
import re
import sys
from fractions import Fraction

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import chunks  # noqa: E402
import countdown  # noqa: E402
import data  # noqa: E402
import multiply  # noqa: E402
import rewards  # noqa: E402

# TinyZero's prompt texts for numbers [44, 19, 35] and target 98, copied from its countdown.py / multiply.py.
TZ_BASE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer.\n"
    "User: Using the numbers [44, 19, 35], create an equation that equals 98. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. And "
    "return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.\n"
    "Assistant: Let me solve this step by step.\n<think>")
TZ_QWEN = (
    "<|im_start|>system\nYou are a helpful assistant. You first thinks about the reasoning process in the mind "
    "and then provides the user with the answer.<|im_end|>\n<|im_start|>user\n Using the numbers [44, 19, 35], "
    "create an equation that equals 98. You can use basic arithmetic operations (+, -, *, /) and each number can "
    "only be used once. Show your work in <think> </think> tags. And return the final answer in <answer> </answer> "
    "tags, for example <answer> (1 + 2) / 3 </answer>.<|im_end|>\n<|im_start|>assistant\nLet me solve this step "
    "by step.\n<think>")
TZ_MULTIPLY = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> RESULT_NUMBER </answer>. User: Give me "
    "the answer of the following equation: 123 * 45 = Assistant: Ok let me think about it.\n<think>")


def reachable(nums):
    """Independent brute force: every value of every expression over all of nums, integer steps only.
    Pick two, replace them by a result, recurse (negatives allowed, division only when exact)."""
    if len(nums) == 1:
        return {nums[0]}
    out = set()
    for i in range(len(nums)):
        for j in range(i + 1, len(nums)):
            a, b, rest = nums[i], nums[j], nums[:i] + nums[i + 1:j] + nums[j + 1:]
            results = {a + b, a - b, b - a, a * b}
            results |= {a // b} if b and a % b == 0 else set()
            results |= {b // a} if a and b % a == 0 else set()
            for r in results:
                out |= reachable(rest + (r,))
    return out


def test_countdown_tasks_solvable_in_range():
    tasks = countdown.make(300, seed=1)
    assert {len(t['numbers']) for t in tasks} == {3, 4}
    for t in tasks:
        assert 10 <= t['target'] <= 100 and all(1 <= x <= 99 for x in t['numbers'])
        assert t['target'] in reachable(tuple(t['numbers'])), t
        # the reference solution is a correct answer by the reward's rules
        assert rewards.countdown_reward(f"<answer>{t['solution']}</answer>", t['target'], t['numbers']) == 1.0


def test_countdown_options_determinism_and_workers(monkeypatch):
    opts = dict(num_counts=(3,), num_range=(1, 9), target_range=(1, 20))
    tasks = countdown.make(200, seed=5, **opts)
    for t in tasks:
        assert len(t['numbers']) == 3 and 1 <= t['target'] <= 20 and all(1 <= x <= 9 for x in t['numbers'])
        assert t['target'] in reachable(tuple(t['numbers']))
    assert countdown.make(200, seed=5, **opts) == tasks
    assert countdown.make(200, seed=6, **opts) != tasks
    monkeypatch.setattr(chunks, 'CHUNK', 32)  # several chunks: a pool of 2 gives the serial result
    assert countdown.make(100, seed=5, workers=2, **opts) == countdown.make(100, seed=5, workers=1, **opts)


def test_solve_finds_integer_solutions_only():
    assert countdown.solve([8, 3, 8, 3], 24) is None  # needs the fraction 8/3
    sol = countdown.solve([44, 19, 35], 98)
    assert rewards.countdown_reward(f"<answer>{sol}</answer>", 98, [44, 19, 35]) == 1.0
    for nums, target in [((0, 5, 7), 0), ((2, 2, 4), 0), ((6, 2, 3), 1), ((99, 98, 97), 97)]:
        sol = countdown.solve(list(nums), target)
        assert sol and Fraction(rewards.evaluate_expression(sol)) == target, (nums, target, sol)


def test_multiply_tasks():
    tasks = multiply.make(400, seed=0)  # TinyZero's mix: up to 3 digits, often fewer
    assert all(0 <= t['a'] < 1000 and 0 <= t['b'] < 1000 and t['product'] == t['a'] * t['b'] for t in tasks)
    assert any(t['a'] < 100 for t in tasks) and any(t['a'] >= 100 for t in tasks)
    exact = multiply.make(100, seed=0, digits=(2, 4), exact=True)
    assert all(10 <= t['a'] <= 99 and 1000 <= t['b'] <= 9999 for t in exact)
    assert multiply.make(50, seed=3) == multiply.make(50, seed=3)


def test_splits_never_share_a_task():
    train, test = data.make_splits('countdown', 400, 100, seed=0, num_counts=(3,), num_range=(1, 4),
                                   target_range=(1, 12))
    key = lambda r: data.task_key(r['reward_model']['ground_truth'])  # noqa: E731
    assert len(train) == 400 and len(test) == 100
    assert not {key(r) for r in train} & {key(r) for r in test}
    assert [r['extra_info']['index'] for r in test] == list(range(100))
    assert {r['extra_info']['split'] for r in train} == {'train'}
    mtrain, mtest = data.make_splits('multiply', 300, 40, seed=0, digits=(1, 1), exact=True)
    pairs = lambda rows: {data.task_key(dict(zip('ab', map(int, re.search(r'(\d+) \* (\d+)',  # noqa: E731
                                                                         r['prompt'][0]['content']).groups()))))
                          for r in rows}
    assert not pairs(mtrain) & pairs(mtest)


def test_impossible_options_fail_fast():
    with pytest.raises(ValueError, match="no target"):
        countdown.make(5, 0, num_counts=(3,), num_range=(1, 9), target_range=(10**6, 10**6 + 5))
    with pytest.raises(ValueError, match="draws in a row"):  # reachable, but the only task is excluded
        countdown.make(5, 0, num_counts=(1,), num_range=(5, 5), target_range=(5, 5),
                       exclude={('countdown', 5, (5,))})
    with pytest.raises(ValueError, match="draws in a row"):  # e.g. a test set that uses up all 1x1-digit tasks
        data.make_splits('multiply', 10, 2000, seed=0, digits=(1, 1), exact=True)
    for bad in [dict(num_counts=(7,)), dict(num_range=(0, 9)), dict(target_range=(20, 10))]:
        with pytest.raises(ValueError, match="countdown:"):
            countdown.make(5, 0, **bad)
    with pytest.raises(ValueError, match="digits"):
        multiply.make(5, 0, digits=(0, 3))


def test_template_texts():
    task = {'target': 98, 'numbers': [44, 19, 35]}
    assert data.countdown_row(task, 'base', 'train', 0)['prompt'][0]['content'] == TZ_BASE
    assert data.countdown_row(task, 'qwen-instruct', 'train', 0)['prompt'][0]['content'] == TZ_QWEN
    assert data.multiply_row({'a': 123, 'b': 45}, 'base', 'test', 3)['prompt'][0]['content'] == TZ_MULTIPLY
    chat = data.countdown_row(task, 'chat', 'train', 7)
    assert chat['prompt'] == [{'role': 'user', 'content': TZ_BASE.split('User: ')[1].split('\nAssistant')[0]}]
    assert chat['extra_info'] == {'split': 'train', 'index': 7, 'template': 'chat', 'solution': None}
    assert chat['reward_model'] == {'style': 'rule', 'ground_truth': {'target': 98, 'numbers': [44, 19, 35]}}

    class FakeTokenizer:  # the part of a transformers tokenizer that prompt_text uses
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return ''.join(f"<|{m['role']}|>{m['content']}" for m in messages) + '<|assistant|>'

    assert data.prompt_text(chat, FakeTokenizer()) == f"<|user|>{chat['prompt'][0]['content']}<|assistant|>"
    with pytest.raises(ValueError, match="tokenizer"):
        data.prompt_text(chat)
    base = data.countdown_row(task, 'base', 'train', 0)
    assert data.prompt_text(base) == data.prompt_text(base, FakeTokenizer()) == TZ_BASE
    assert base['extra_info']['template'] == 'base'
    tiny = data.countdown_row(task, 'tiny', 'test', 1)
    assert data.prompt_text(tiny) == "Using the numbers [44, 19, 35], create an equation that equals 98.\n<think>"
    assert tiny['extra_info']['template'] == 'tiny'
    with pytest.raises(ValueError, match="base, qwen-instruct, chat, tiny"):
        data.countdown_row(task, 'llama', 'train', 0)
    with pytest.raises(ValueError, match="base, chat"):
        data.multiply_row({'a': 1, 'b': 2}, 'qwen-instruct', 'train', 0)
    with pytest.raises(ValueError, match="countdown, multiply"):
        data.make_splits('sudoku', 1, 1, 0)


@pytest.mark.parametrize('ext', ['jsonl', 'parquet'])
def test_round_trip(tmp_path, ext):
    rows = [data.countdown_row(t, 'base', 'train', i) for i, t in enumerate(countdown.make(20, 0))]
    data.write_rows(rows, tmp_path / f"train.{ext}")
    assert data.load_rows(tmp_path / f"train.{ext}") == rows
    assert data.find_split(tmp_path, 'train') == str(tmp_path / f"train.{ext}")
    mrows = [data.multiply_row(t, 'chat', 'test', i) for i, t in enumerate(multiply.make(10, 0))]
    data.write_rows(mrows, tmp_path / f"m.{ext}")
    assert data.load_rows(tmp_path / f"m.{ext}") == mrows


def test_tinyzero_parquet_and_raw_dataset(tmp_path):
    pa, pq = pytest.importorskip('pyarrow'), pytest.importorskip('pyarrow.parquet')
    # A row as TinyZero's countdown.py writes it: HF datasets' map() keeps the raw columns target and nums.
    tz = {'target': 98, 'nums': [44, 19, 35], 'data_source': 'countdown',
          'prompt': [{'role': 'user', 'content': TZ_BASE}], 'ability': 'math',
          'reward_model': {'style': 'rule', 'ground_truth': {'target': 98, 'numbers': [44, 19, 35]}},
          'extra_info': {'split': 'train', 'index': 0}}
    pq.write_table(pa.Table.from_pylist([tz]), tmp_path / 'train.parquet')
    (row,) = data.load_rows(tmp_path / 'train.parquet')
    assert data.prompt_text(row) == TZ_BASE  # no extra_info.template: already-rendered text
    assert row['reward_model']['ground_truth'] == {'target': 98, 'numbers': [44, 19, 35]}
    assert type(row['reward_model']['ground_truth']['numbers'][0]) is int
    assert rewards.score(row, "<answer>44 + 19 + 35</answer>") == 1.0
    # TinyZero's multiply.py rows: data_source 'yolo/multiply-3_digit', ground truth the product
    mz = {'num1': 123, 'num2': 45, 'result': 5535, 'data_source': 'yolo/multiply-3_digit',
          'prompt': [{'role': 'user', 'content': TZ_MULTIPLY}], 'ability': 'math',
          'reward_model': {'style': 'rule', 'ground_truth': 5535}, 'extra_info': {'split': 'test', 'index': 0}}
    pq.write_table(pa.Table.from_pylist([mz]), tmp_path / 'mz.parquet')
    (mrow,) = data.load_rows(tmp_path / 'mz.parquet')
    assert data.prompt_text(mrow) == TZ_MULTIPLY and rewards.score(mrow, "<answer>5535</answer>") == 1.0
    # The raw Countdown-Tasks-3to4 file: columns target and nums only
    pq.write_table(pa.table({'target': [98, 24], 'nums': [[44, 19, 35], [8, 3, 8, 3]]}),
                   tmp_path / 'test-00000.parquet')
    raw = data.load_rows(tmp_path / 'test-00000.parquet')
    assert raw[0] == data.countdown_row({'target': 98, 'numbers': [44, 19, 35]}, 'base', 'test', 0)
    assert raw[1]['extra_info']['index'] == 1


def test_bad_rows_name_file_row_and_problem(tmp_path):
    good = data.countdown_row({'target': 98, 'numbers': [44, 19, 35]}, 'base', 'train', 0)
    path = tmp_path / 'train.jsonl'
    path.write_text(json.dumps(good) + '\n{"data_source": "countdown", oops\n')
    with pytest.raises(ValueError, match=r"train\.jsonl: line 2: invalid JSON"):
        data.load_rows(path)
    cases = [({**good, 'reward_model': {'ground_truth': {'target': 98}}}, r"numbers: expected a list"),
             ({**good, 'reward_model': {'ground_truth': {'target': '98', 'numbers': [1]}}}, r"target: expected an int"),
             ({**good, 'data_source': 'gsm8k'}, r"not a known task \(countdown, multiply\)"),
             ({**good, 'prompt': 'hi'}, r"prompt: expected a list"),
             ({**good, 'extra_info': {'template': 'llama'}}, r"template 'llama' is unknown.*base, qwen-instruct"),
             ([1, 2], r"expected an object")]
    for bad, msg in cases:
        path.write_text('\n' + json.dumps(good) + '\n' + json.dumps(bad) + '\n')
        with pytest.raises(ValueError, match=r"train\.jsonl: line 3: .*" + msg):
            data.load_rows(path)
    with pytest.raises(ValueError, match=r"bad\.parquet: row 0: .*numbers"):
        data.write_rows([cases[0][0]], tmp_path / 'bad.parquet')
    with pytest.raises(ValueError, match=r"\.csv: unknown file type"):
        data.load_rows(tmp_path / 'x.csv')
    with pytest.raises(FileNotFoundError, match=r"valid\.jsonl and .*valid\.parquet"):
        data.find_split(tmp_path, 'valid')


def one_line_error(kind, fn, *args, match):
    """fn(*args) raises `kind` with a one-line message that matches `match`: what train.py prints, no traceback."""
    with pytest.raises(kind, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value), str(e.value)


def test_bad_files_give_one_line_naming_file_and_line(tmp_path, monkeypatch):
    pa, pq = pytest.importorskip('pyarrow'), pytest.importorskip('pyarrow.parquet')
    good = json.dumps(data.countdown_row({'target': 98, 'numbers': [44, 19, 35]}, 'base', 'train', 0)) + '\n'
    # empty files: no lines, blank lines only, zero bytes (jsonl or parquet), a parquet table with no rows
    (tmp_path / 'blank.jsonl').write_text('\n  \n\n')
    (tmp_path / 'zero.jsonl').write_bytes(b'')
    (tmp_path / 'zero.parquet').write_bytes(b'')
    pq.write_table(pa.table({'target': pa.array([], pa.int64())}), tmp_path / 'norows.parquet')
    data.write_rows([], tmp_path / 'written.parquet')
    for name in ['blank.jsonl', 'zero.jsonl', 'zero.parquet', 'norows.parquet', 'written.parquet']:
        one_line_error(ValueError, data.load_rows, tmp_path / name, match=re.escape(f"{tmp_path / name}: no rows"))
    one_line_error(FileNotFoundError, data.load_rows, tmp_path / 'gone.jsonl', match=r"gone\.jsonl: no such file")
    # both formats of one split: which one to train on would be a guess
    (tmp_path / 'train.jsonl').write_text(good)
    data.write_rows(data.load_rows(tmp_path / 'train.jsonl'), tmp_path / 'train.parquet')
    one_line_error(ValueError, data.find_split, tmp_path, 'train', match=r"train\.jsonl and .*train\.parquet.*keep one")
    # JSON nested 10^5 deep (json.loads raises RecursionError), and a line over the length cap
    path = tmp_path / 'test.jsonl'
    path.write_text(good + '[' * 10**5 + ']' * 10**5 + '\n')
    one_line_error(ValueError, data.load_rows, path, match=r"test\.jsonl: line 2: invalid JSON: nested too deeply")
    monkeypatch.setattr(data, 'MAX_LINE', len(good) + 10)  # line 3 is valid JSON, but 10 bytes over the cap
    path.write_text('\n' + good + good[:-2] + ' ' * 20 + '}\n' + good)
    one_line_error(ValueError, data.load_rows, path, match=rf"test\.jsonl: line 3: longer than {data.MAX_LINE:,} bytes")
    monkeypatch.undo()
    # a byte that is not UTF-8 on line 3 (line numbers count blank lines), at byte 23: {"data_source": "count\xff
    path.write_bytes(good.encode() + b'\n' + good.encode().replace(b'countdown', b'count\xffdown', 1))
    one_line_error(ValueError, data.load_rows, path, match=r"test\.jsonl: line 3: invalid UTF-8 at byte 23")
    # not parquet at all, and a good parquet file cut short
    bad = tmp_path / 'bad.parquet'
    for content in [b'not a parquet file\n' * 10, (tmp_path / 'train.parquet').read_bytes()[:-100]]:
        bad.write_bytes(content)
        one_line_error(ValueError, data.load_rows, bad, match=r"bad\.parquet: not a readable parquet file: ")


@pytest.mark.parametrize('ext', ['jsonl', 'parquet'])
def test_split_holds_rows_compactly_and_tokenizes_per_batch(tmp_path, ext):
    """data.Split, train.py's holder of a split: the rows as load_rows reads them, the prompt ids the tokenizer
    gives, token counts that add up over shards, and --max-prompt-len's fail or drop."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(data.__file__), 'assets', 'countdown-base'))
    # 'tiny' prompts: "Using the numbers [1, 2, 3], create an equation that equals 6.\n<think>" is 70 bytes, and
    # this tokenizer (byte-level, no merges) makes a token of each byte: [8, 3, 8, 3] and 24 add 3 + 1, [2, 5] and
    # 10 take 3 and add 1. The chat row is rendered by the tokenizer's chat template.
    tasks = [{'target': 6, 'numbers': [1, 2, 3]}, {'target': 24, 'numbers': [8, 3, 8, 3]},
             {'target': 10, 'numbers': [2, 5]}, {'target': 12, 'numbers': [3, 4]}]
    rows = [data.countdown_row(t, 'chat' if i == 3 else 'tiny', 'train', i) for i, t in enumerate(tasks)]
    path = tmp_path / f'train.{ext}'
    data.write_rows(rows, path)
    split = data.Split(path)
    assert len(split) == 4 and split.name == 'train'
    # its tokenizer.json pads (left, to the longest): the first batch calls the tokenizer, which unsets that, and
    # later ones go to the Rust backend straight; both give the same ids
    assert tok.backend_tokenizer.padding is not None
    got, ids = split.batch([0, 1, 2, 3], tok)
    assert tok.backend_tokenizer.padding is None
    assert got == data.load_rows(path) == rows
    assert ids == [tok(data.prompt_text(r, tok), add_special_tokens=False)['input_ids'] for r in rows]
    chat = len(ids[3])
    assert chat > 74
    counts = split.count_tokens(tok)
    assert counts.tolist() == [70, 74, 68, chat]
    # each rank counts every world-th row; the sum over ranks is every count
    assert split.count_tokens(tok, 0, 3).tolist() == [70, 0, 0, chat]
    assert (split.count_tokens(tok, 0, 3) + split.count_tokens(tok, 1, 3) + split.count_tokens(tok, 2, 3) ==
            counts).all()
    one_line_error(ValueError, split.keep_short, counts, 72, match=re.escape(
        f"2 of 4 train prompts are longer than --max-prompt-len 72 (longest {chat} tokens); raise it or pass "
        "--long-prompts drop"))
    said = []
    split.keep_short(counts, 72, drop_long=True, say=said.append)
    assert said == ["dropping 2 of 4 train prompts longer than 72 tokens"]
    assert len(split) == 2 and split.batch([0, 1], tok) == ([rows[0], rows[2]], [ids[0], ids[2]])
    # one buffer of compact JSON: fewer bytes than the jsonl file (which has spaces), a few numbers beside it
    assert len(split.buf) < len(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows).encode())
    (tmp_path / 'test.jsonl').write_text('')
    one_line_error(ValueError, data.Split, tmp_path / 'test.jsonl', match=r"test\.jsonl: no rows")


def test_cli(tmp_path, capsys):
    out = tmp_path / 'cd'
    data.main(['countdown', '--out', str(out), '--train', '60', '--test', '12', '--seed', '3',
               '--template', 'qwen-instruct', '--num-counts', '3', '--num-range', '1', '20'])
    train, test = data.load_rows(out / 'train.jsonl'), data.load_rows(out / 'test.jsonl')
    assert len(train) == 60 and len(test) == 12 and train[0]['extra_info']['template'] == 'qwen-instruct'
    keys = lambda rows: {data.task_key(r['reward_model']['ground_truth']) for r in rows}  # noqa: E731
    assert not keys(train) & keys(test)
    data.main(['multiply', '--out', str(tmp_path / 'mul'), '--train', '30', '--test', '5', '--format', 'parquet'])
    assert len(data.load_rows(data.find_split(tmp_path / 'mul', 'train'))) == 30
    for argv, msg in [(['sudoku', '--out', 'x'], "choose from"), (['countdown', '--out', 'x', '--template', 'x'],
                      "'base', 'qwen-instruct', 'chat'"),
                      (['countdown', '--out', 'x', '--target-range', '5000', '6000', '--num-range', '1', '3'],
                       "no target")]:
        with pytest.raises(SystemExit):
            data.main(argv)
        assert msg in capsys.readouterr().err
    (tmp_path / 'file').write_text('')  # --out names a file, not a folder
    with pytest.raises(SystemExit):
        data.main(['multiply', '--out', str(tmp_path / 'file'), '--train', '3', '--test', '1'])
    err = capsys.readouterr().err.split('\n')  # after the progress bars: one line, naming the path
    assert err[-2].startswith('data.py: error: ') and str(tmp_path / 'file') in err[-2] and err[-1] == ''


def test_doctests():
    assert doctest.testmod(data).failed == 0 and doctest.testmod(countdown).attempted > 0
    assert doctest.testmod(countdown).failed == 0


class ChatTokenizer:
    """The part of a transformers tokenizer that prompt_text uses, with a ChatML-like template: a last assistant
    turn is continued (continue_final_message), not closed, as transformers does."""
    def apply_chat_template(self, messages, tokenize, add_generation_prompt=False, continue_final_message=False):
        assert not tokenize and add_generation_prompt != continue_final_message
        text = ''.join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        return text[:-len('<|end|>')] if continue_final_message else text + '<|assistant|>'


def test_chat_think_rows_hold_a_worked_example_and_prefill_the_assistant_turn():
    """'chat-think': the example task solved, the question, and the assistant turn up to <think> (TinyZero's
    qwen-instruct prefill); no example answer in the question itself (an earlier 'chat' prompt's '42' got copied)."""
    row = data.multiply_row({'a': 37, 'b': 8}, 'chat-think', 'train', 5)
    ask = ("Give me the answer of the following equation: {} * {} = ? Show your work in <think> </think> tags. "
           "And return only the final number in <answer> </answer> tags.")
    assert row['prompt'] == [
        {'role': 'user', 'content': ask.format(2, 3)},
        {'role': 'assistant', 'content': "Let me solve this step by step.\n<think> 2 * 3 = 6 </think>\n"
                                         "<answer> 6 </answer>"},
        {'role': 'user', 'content': ask.format(37, 8)},
        {'role': 'assistant', 'content': "Let me solve this step by step.\n<think>"}]
    assert row['reward_model']['ground_truth'] == 296 and row['extra_info']['template'] == 'chat-think'
    assert data.prompt_text(row, ChatTokenizer()).endswith(
        f"<|user|>{ask.format(37, 8)}<|end|><|assistant|>Let me solve this step by step.\n<think>")
    with pytest.raises(ValueError, match="'chat-think' template row needs a tokenizer"):
        data.prompt_text(row)
    cd = data.countdown_row({'target': 98, 'numbers': [44, 19, 35]}, 'chat-think', 'test', 0)
    assert cd['prompt'][1]['content'].endswith("3 * 3 = 9 </think>\n<answer> (1+2)*3 </answer>")
    assert cd['prompt'][2]['content'] == TZ_BASE.split('User: ')[1].split(', for example')[0] + '.'
    # the worked examples are right by our own rewards, and they pass the row checks and the files
    for task, (demo, solution) in data.CHAT_THINK_DEMOS.items():
        truth = demo['a'] * demo['b'] if task == 'multiply' else demo
        got = (rewards.multiply_reward(solution, truth) if task == 'multiply' else
               rewards.countdown_reward(solution, demo['target'], demo['numbers']))
        assert got == 1.0, task
    assert data._check(row) == row
    # 'chat-demo': the same without the prefill; the model's turn starts after the assistant header
    demo = data.multiply_row({'a': 37, 'b': 8}, 'chat-demo', 'train', 5)
    assert demo['prompt'] == row['prompt'][:-1] and demo['reward_model'] == row['reward_model']
    assert data.prompt_text(demo, ChatTokenizer()).endswith(f"<|user|>{ask.format(37, 8)}<|end|><|assistant|>")
    # 'chat' rows: the same question alone, the user turn rendered with the assistant header after it
    chat = data.multiply_row({'a': 3, 'b': 4}, 'chat', 'train', 0)
    assert chat['prompt'] == [{'role': 'user', 'content': ask.format(3, 4)}]
    assert data.prompt_text(chat, ChatTokenizer()) == f"<|user|>{ask.format(3, 4)}<|end|><|assistant|>"


@pytest.mark.parametrize('response', ["6 * 7 = 42 </think>\n<answer> 42 </answer>", "42 </answer>", "no tags",
                                      "</think> <answer> 41 </answer>", "<answer> 42"])
def test_the_prefill_holds_nothing_the_reward_reads(response):
    """Our reward reads the response alone; TinyZero's decodes prompt and response and scores the text after the
    assistant marker, so a prefilled tag counts there. THINK_PREFILL holds no <answer> tag: both read the same
    answer, whatever the model writes. (A prefill up to <answer> would differ: '42 </answer>' would score 1.0
    there and 0.0 here, a reward for a tag the model never wrote.)"""
    assert '<answer>' not in data.THINK_PREFILL and '</answer>' not in data.THINK_PREFILL
    ours = rewards.multiply_reward(response, 42)
    assert rewards.multiply_reward(data.THINK_PREFILL + response, 42) == ours
