"""Smoke test of bench.py: the cheapest subcommand runs end to end and reports positive numbers as JSON."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed: bench.py rollout "
                    "compares it with transformers generate")
def test_rollout_quick_json():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "bench.py", "rollout", "--model", "tiny", "--json", "--quick"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bench"] == "rollout" and out["command"] and out["date"]
    for dtype in ("float32", "bfloat16"):
        r = out["results"]["tiny"][dtype]
        assert set(r) >= {"vllm_tok_s", "hf_tok_s", "ratio", "vllm_tokens", "hf_tokens"}
        assert all(r[k] > 0 for k in r), r
        assert r["ratio"] == pytest.approx(r["vllm_tok_s"] / r["hf_tok_s"])  # one rep: the median is the one
