"""Tiny random models of every decoder-only family the parity matrix covers, from transformers' config classes.

Each config keeps what makes its family differ from the others where it matters for streaming:
mixed ``layer_types`` (sliding and full attention, each with its own mask and, for Gemma-3, its own
rotary base), a sliding window (8) shorter than the test windows (32) so that the sliding masks
differ from the causal ones, grouped-query attention, biases, tied embeddings, no-RoPE layers,
parallel residuals, stacked experts. Four blocks, hidden size 64: a few milliseconds a forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Cohere2Config,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    SmolLM3Config,
    StableLmConfig,
    Starcoder2Config,
)

VOCAB = 512
HIDDEN = 64
WINDOW = 8  # sliding window: shorter than the test windows
N_LAYERS = 4
SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=N_LAYERS,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **SPECIAL_IDS)
SLIDING, FULL = "sliding_attention", "full_attention"

FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=WINDOW),
    "qwen2": lambda: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                                 layer_types=[FULL, FULL, SLIDING, SLIDING]),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                                 layer_types=[SLIDING, FULL, SLIDING, FULL]),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=16),
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW),
    "gemma3": lambda: Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=WINDOW,
                                       layer_types=[SLIDING, SLIDING, FULL, SLIDING]),
    "phi3": lambda: Phi3Config(**COMMON),
    "olmo2": lambda: Olmo2Config(**COMMON),
    "granite": lambda: GraniteConfig(**COMMON, attention_bias=True),
    "stablelm": lambda: StableLmConfig(**COMMON, use_qkv_bias=True),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                                      num_hidden_layers=N_LAYERS, num_attention_heads=4, max_position_embeddings=256,
                                      **SPECIAL_IDS),
    "falcon": lambda: FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=N_LAYERS,
                                   num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2,
                                   **SPECIAL_IDS),
    "gptj": lambda: GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=N_LAYERS, n_head=4, rotary_dim=8,
                               n_positions=256, **SPECIAL_IDS),
    "starcoder2": lambda: Starcoder2Config(**COMMON, sliding_window=WINDOW),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=N_LAYERS,
                             num_attention_heads=4, word_embed_proj_dim=HIDDEN, max_position_embeddings=256,
                             **SPECIAL_IDS),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=N_LAYERS, n_head=4, n_positions=256,
                               **SPECIAL_IDS),
    "smollm3": lambda: SmolLM3Config(**COMMON, no_rope_layer_interval=2),
    "cohere2": lambda: Cohere2Config(**COMMON, sliding_window=WINDOW, layer_types=[SLIDING, SLIDING, SLIDING, FULL]),
    # Mixture of experts: experts stacked in 3-D parameters, stored per expert in the checkpoint (Mixtral under
    # its own names, w1/w3/w2, and another module name, block_sparse_moe).
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=32),
}

# Families the engine refuses up front, and a phrase of the one line that says why (none today: stacked
# experts are unstacked into one linear per expert, reconstruct.modelio.experts).
REFUSED: dict[str, str] = {}
STREAMED = tuple(name for name in FAMILIES if name not in REFUSED)
# Families whose MLP channels `--shrink` refuses (fused gate/up, a width key it does not know, experts).
SHRINK_REFUSED = ("phi3", "gpt_neox", "falcon", "gptj", "mixtral", "qwen3_moe")


def save_family_model(family: str, folder: Path, tokenizer, seed: int = 0) -> Path:
    """Build the tiny ``family`` model with random weights (biases and norms perturbed) and save it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]())
    with torch.no_grad():  # random biases and norms: a method that trains them starts from a non-trivial value
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
