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


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu():
    """`bench.py gpu` is what the first lent GPU runs; its --dry-run runs the same path on the CPU with the tiny
    model (bf16, --rollout hf, 3 GRPO steps with checkpoints, step 3 again resumed from step 2), so that it cannot
    rot before a GPU runs it: positive throughput and memory, and a resumed step equal to the uninterrupted one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "bench.py", "gpu", "--dry-run", "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    r = out["results"]["tiny"]["bfloat16"]
    assert r["tok_s"] > 0 and r["update_tflop_s"] > 0 and 0 < r["update_mfu"] < 1 and r["mem_peak_gib"] > 0, r
    assert r["resume_max_rel_diff"] <= 1e-5, r
    assert "resume: step 3 equals the uninterrupted run's" in proc.stdout
