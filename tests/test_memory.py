"""memory.py: the start-up memory plan of a CUDA run, checked on CPU with hand-worked numbers.

Qwen2.5-0.5B: hidden 896, 24 layers, 14 query / 2 key-value heads of 64, MLP 4864, vocabulary 151,936, tied
embeddings. Per layer: q 896*896 + 896, k and v 896*128 + 128 each, o 896*896, MLP 3*896*4864, two norms 2*896
= 14,912,384; 24 layers 357,897,216, final norm 896, embeddings 151,936*896 = 136,134,656: 494,032,768.
Qwen2.5-3B: hidden 2048, 36 layers, 16 / 2 heads of 128, MLP 11008: per layer 77,076,992, in all 3,085,938,688.
The critic (tied embeddings: no LM head to drop) adds its value head, hidden + 1.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import memory  # noqa: E402

N3 = 3_085_938_688  # Qwen2.5-3B
C3 = N3 + 2048 + 1  # its critic
GB80 = 80 * 10**9   # an 80 GB GPU (74.5 GiB)


@pytest.mark.parametrize("shape, policy", [((896, 24, 14, 2, 4864), 494_032_768),
                                           ((2048, 36, 16, 2, 11008), 3_085_938_688)])
def test_param_counts_of_qwen_shapes(shape, policy, tmp_path):
    from transformers import Qwen2Config
    hidden, layers, heads, kv, mlp = shape
    Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=mlp, vocab_size=151936, tie_word_embeddings=True).save_pretrained(tmp_path)
    assert memory.param_counts(str(tmp_path)) == (policy, policy + hidden + 1)


def test_plan_of_3b_ppo_on_one_gpu():
    """TinyZero's 3B PPO on one GPU: every part per rank, in bytes. Resident: 4N + 8N + 2N (bf16 reference) +
    12 C (critic weights and AdamW) = 14 * 3,085,938,688 + 12 * 3,085,940,737 = 80,234,430,476 bytes; the update
    adds 4N + 4C of unsharded gradients, the rollout vLLM's 0.3 * 80e9 = 24e9."""
    p = memory.plan(N3, C3, world=1, dtype_bytes=2, reference=True, critic=True, unsharded_grads=True,
                    rollout="vllm", vllm_share=0.3, device_bytes=GB80)
    assert p["weights"] == 12_343_754_752 and p["optimizer"] == 24_687_509_504 and p["gradients"] == 12_343_754_752
    assert p["reference"] == 6_171_877_376 and p["critic"] == 16 * C3 == 49_375_051_792
    assert p["rollout_peak"] == 80_234_430_476 + 24e9
    assert p["update_peak"] == 80_234_430_476 + 4 * N3 + 4 * C3 == 104_921_948_176
    assert p["need"] == p["update_peak"]


def test_plan_shards_with_ranks_except_accumulated_gradients():
    """8 ranks: everything sharded 8 ways but the gradients a mini-batch accumulates over micro-batches (with
    --keep-gathered on)."""
    kw = dict(dtype_bytes=2, reference=True, critic=False, rollout="vllm", vllm_share=0.3, device_bytes=GB80)
    one, eight = (memory.plan(N3, C3, world=w, unsharded_grads=True, **kw) for w in (1, 8))
    for k in ("weights", "optimizer", "reference"):
        assert eight[k] == one[k] / 8
    assert eight["gradients"] == one["gradients"] == 4 * N3
    assert memory.plan(N3, C3, world=8, unsharded_grads=False, **kw)["gradients"] == 4 * N3 / 8
    assert eight["critic"] == 0


def test_hf_rollout_keeps_an_unsharded_copy_in_the_run_dtype():
    p = memory.plan(494_032_768, 0, world=2, dtype_bytes=2, reference=False, critic=False, unsharded_grads=False,
                    rollout="hf", vllm_share=0.3, device_bytes=GB80)
    assert p["rollout"] == 988_065_536  # 2 bytes x 494,032,768: its KV cache is not counted
    assert p["rollout_peak"] == 6 * 494_032_768 + 988_065_536  # 4N/2 weights + 8N/2 AdamW + the copy


def test_keep_gathered_adds_an_unsharded_copy_to_the_update_peak():
    kw = dict(world=2, dtype_bytes=2, reference=False, critic=False, unsharded_grads=False, rollout="vllm",
              vllm_share=0.3, device_bytes=GB80)
    off, on = (memory.plan(494_032_768, 0, gathered=g, **kw) for g in (False, True))
    assert on["gathered"] == 988_065_536 and off["gathered"] == 0  # 2 bytes x N: the whole policy, not a shard
    assert on["update_peak"] - off["update_peak"] == 988_065_536 and on["rollout_peak"] == off["rollout_peak"]


def test_check_names_keep_gathered_off_when_the_gathered_copies_do_not_fit():
    """3B GRPO on 8 GPUs of 20 GB with --keep-gathered on: the update holds 12N/8 of sharded state + 4N of
    unsharded gradients + 2N of gathered bf16 parameters = 7.5 N = 23.1 GB; off: 1.5 N + 4N/8 = 2 N = 6.2 GB."""
    kw = dict(world=8, dtype_bytes=2, critic=False, kl_coef=0, rollout="vllm", vllm_share=0.3, micro_batch_tokens=8192,
              mini_batch_tokens=64 * 1280, device_bytes=20e9)
    line, problem = memory.check(N3, C3, gathered=True, **kw)
    assert f"update_peak {7.5 * N3 / 2**30:.1f}" in line
    assert problem.endswith("would fit: --keep-gathered off or 32 GPUs")  # 16 GPUs: 6.75 N = 20.8 GB
    line, problem = memory.check(N3, C3, gathered=False, **kw)
    assert problem is None and f"update_peak {2 * N3 / 2**30:.1f}" in line


def test_check_fails_in_one_line_naming_the_flags_that_would_fit():
    """3B PPO on one 80 GB GPU needs 97.7 GiB: GRPO alone fits (62.6 GiB at the rollout), so does a second GPU
    (60.4 GiB at the update); --kl-coef 0 alone does not (92.0), nor any vLLM share (the update alone is 97.7)."""
    line, problem = memory.check(N3, C3, world=1, dtype_bytes=2, critic=True, kl_coef=1e-3, rollout="vllm",
                                 vllm_share=0.3, micro_batch_tokens=8192, mini_batch_tokens=64 * 1280,
                                 device_bytes=GB80)
    assert "update_peak 97.7" in line and "GPU 74.5" in line
    assert problem == ("needs 97.7 GiB per rank before activations, the GPU has 74.5 GiB; would fit: "
                       "--algo grpo or 2 GPUs")
    assert "\n" not in problem


def test_check_passes_a_run_that_fits_and_names_a_smaller_vllm_share():
    kw = dict(world=1, dtype_bytes=2, critic=False, kl_coef=1e-3, rollout="vllm", micro_batch_tokens=8192,
              mini_batch_tokens=64 * 1280, device_bytes=GB80)
    assert memory.check(N3, C3, vllm_share=0.3, **kw)[1] is None  # 62.6 GiB
    # at 0.7 the rollout needs 40.2 (resident) + 52.2 GiB, the update 51.7: a share of 0.45 (33.5 GiB) fits, as
    # does a second GPU; 0.5 (37.3 GiB) would not
    assert memory.check(N3, C3, vllm_share=0.7, **kw)[1].endswith("would fit: --gpu-memory-utilization 0.45 or 2 GPUs")
