"""Tiny random-initialised causal LMs of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 128


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB)
    if family == "llama":
        return T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, **common)
    if family == "opt":
        return T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, **common)
    if family == "bloom":
        return T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common)
    if family == "gptj":
        return T.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, **common)
    if family == "falcon":
        return T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **common)
    if family == "mpt":
        return T.MptConfig(d_model=64, n_layers=2, n_heads=4, **common)
    if family == "gpt2":
        return T.GPT2Config(n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, **common)
    if family == "qwen2":
        return T.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, **common)
    if family == "mistral":
        return T.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, **common)
    raise ValueError(family)


FAMILIES = ["llama", "opt", "bloom", "gptj", "falcon", "mpt", "gpt2", "gpt_neox", "qwen2", "mistral"]


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(family)).to(dtype)
    model.eval()
    return model


def token_batch(n: int = 8, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=generator)
