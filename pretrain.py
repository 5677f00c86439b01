"""Build a small base model from nothing: a byte-level tokenizer and a small random Qwen2, saved as a
transformers folder that train.py, transformers and vLLM load as is (no download anywhere).

    python pretrain.py --out assets/tiny        # a random-init tiny model (what `train.py --model tiny` uses)
"""
import argparse
import os
import shutil

import torch


def build_tiny_model(path, seed=0, hidden=128, layers=4, heads=4, kv_heads=2):
    """Write a transformers folder (config, safetensors, tokenizer) with a tiny random Qwen2 to path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    # A byte-level BPE with no merges: one token per byte, the same pipeline as Qwen's own tokenizer
    # (transformers loads any qwen2 folder's tokenizer as Qwen2Tokenizer, which imposes that pipeline).
    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|pad|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    # head_dim = hidden / heads must be >= 32: vLLM's CPU attention kernels support no smaller.
    cfg = Qwen2Config(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=0,
                      eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|pad|>"])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = cfg.eos_token_id
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write the model to")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (head_dim = hidden / heads >= 32)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    a = p.parse_args()
    if a.hidden % a.heads or a.hidden // a.heads < 32 or a.heads % a.kv_heads:
        p.error(f"--hidden {a.hidden} / --heads {a.heads} must be a whole head_dim >= 32, and --kv-heads "
                f"{a.kv_heads} must divide --heads")
    build_tiny_model(a.out, a.seed, a.hidden, a.layers, a.heads, a.kv_heads)
    print(f"wrote {a.out}")
