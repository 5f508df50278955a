"""Tiny random-weight models with a byte tokenizer: the harness end to end without downloads.

    >>> lm, codec = tiny_llama_lm()
    >>> lm.config.vocab_size, codec.encode("ab")
    (256, [97, 98])
    >>> lm, codec = tiny_gemma_lm()                # sliding-window layers, MQA, <bos> = 256
    >>> lm.config.layer_types[:2], codec.lead
    (['sliding_attention', 'full_attention'], (256,))
"""
from __future__ import annotations

from planner.quality.text import ByteCodec, Haystack

TOY_TEXT = (
    "The morning was grey and the road was long. Anne walked to the village with her sister. "
    "They spoke of the weather, of the harvest and of the letters that had not come. "
    "A carriage passed them near the church! Who could it be? Nobody knew the horses.\n"
    "In the evening the family gathered by the fire. Mr. Elliot read aloud from the paper. "
    "The fire was warm; the talk was idle; the hours went by without remark.\n")


def tiny_llama_lm(layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                  max_positions: int = 4096, seed: int = 0):
    """(LlamaForCausalLM with random weights, fp32, SDPA; ByteCodec)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=heads * head_dim, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval(), ByteCodec()


def tiny_gemma_lm(layer_types=("sliding_attention", "full_attention", "sliding_attention"),
                  window: int = 64, heads: int = 4, kv_heads: int = 1, head_dim: int = 16,
                  max_positions: int = 4096, seed: int = 0):
    """(Gemma3ForCausalLM with random weights, fp32, SDPA: sliding-window and full-attention
    layers as ``layer_types``, MQA, softmax scale ``query_pre_attn_scalar ** -0.5`` with a
    scalar other than the head dim; ByteCodec whose sequences start with bos = 256)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=257, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=len(layer_types), layer_types=list(layer_types),
                           num_attention_heads=heads, num_key_value_heads=kv_heads,
                           head_dim=head_dim, query_pre_attn_scalar=2 * head_dim,
                           sliding_window=window, max_position_embeddings=max_positions,
                           bos_token_id=256, eos_token_id=1, pad_token_id=0,
                           attn_implementation="sdpa")
    return Gemma3ForCausalLM(cfg).eval(), ByteCodec(lead=(256,))


def toy_corpus(codec=None, repeats: int = 40):
    """(Haystack, held-out token ids) from a short English text, repeated."""
    codec = codec or ByteCodec()
    return Haystack.from_text(codec, TOY_TEXT * repeats, "toy"), codec.encode(TOY_TEXT * 30)
