"""Tiny random configs of the Hugging Face architectures people run now (transformers 5.x):
MLA (DeepSeek-V2/V3), native-DSA models as dense equivalents (DeepSeek-V3.2, GLM-MoE-DSA),
DeepSeek-V4, learned attention sinks (GPT-OSS, Granite-SWA), sliding-window hybrids (Gemma 3 and 4, Mistral),
linear-attention hybrids (Qwen3.5; Qwen4-Exp with its QSA token indexer).

``build(name, impl)`` returns the model in eval mode (fp32, seeded); ``ARCHS`` lists
``(name, impls, attention sites)``.
"""
from __future__ import annotations

import torch

V = 128

_MOE = dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, num_key_value_heads=4)
# MLA: q/k head dim (nope 12 + rope 4 = 16) differs from v's (8), as 192 / 128 in the real ones
_MLA = dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=4,
            v_head_dim=8)
_DSA = dict(index_n_heads=2, index_head_dim=8, index_topk=8)
_LINEAR = dict(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
               linear_num_value_heads=4)

CONFIGS = {
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config",
                    dict(**_MOE, **_MLA, n_group=1, topk_group=1)),
    "deepseek_v2": ("DeepseekV2ForCausalLM", "DeepseekV2Config", dict(**_MOE, **_MLA)),
    "deepseek_v32": ("DeepseekV32ForCausalLM", "DeepseekV32Config",
                     dict(**_MOE, **_MLA, **_DSA, n_group=1, topk_group=1)),
    "glm_moe_dsa": ("GlmMoeDsaForCausalLM", "GlmMoeDsaConfig",
                    dict(**_MOE, **_MLA, **_DSA, n_group=1, topk_group=1)),
    "deepseek_v4": ("DeepseekV4ForCausalLM", "DeepseekV4Config",
                    dict(num_key_value_heads=1, head_dim=32, q_lora_rank=32,
                         num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1,
                         moe_intermediate_size=32,
                         layer_types=["heavily_compressed_attention",
                                      "compressed_sparse_attention"],
                         sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=2,
                         index_head_dim=16, index_topk=8, qk_rope_head_dim=8, hc_mult=2,
                         num_nextn_predict_layers=0)),
    "gpt_oss": ("GptOssForCausalLM", "GptOssConfig",
                dict(num_key_value_heads=2, head_dim=16, num_local_experts=4,
                     num_experts_per_tok=2, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               dict(num_key_value_heads=2, head_dim=16, sliding_window=8, num_hidden_layers=3,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "gemma4": ("Gemma4ForCausalLM", "Gemma4TextConfig",
               dict(num_key_value_heads=2, head_dim=16, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"])),
    # gated DeltaNet layers beside attention (Qwen3.5); Qwen4-Exp's attention layers also take
    # its QSA token indexer's selection as a boolean mask
    "qwen3_5": ("Qwen3_5ForCausalLM", "Qwen3_5TextConfig",
                dict(num_key_value_heads=2, head_dim=16, **_LINEAR,
                     layer_types=["linear_attention", "full_attention"])),
    "qwen4_exp": ("Qwen4ExpForCausalLM", "Qwen4ExpTextConfig",
                  dict(num_key_value_heads=2, head_dim=16, **_LINEAR, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                       layer_types=["linear_attention", "indexed_attention"], indexer_n_heads=2,
                       indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                       indexer_compress_ratio=4, hc_lowrank=8, ngram_vocab_size_base=1000,
                       split_ngram_parts=2, heads_per_ngram=2, ple_embed_dim=64)),
    # a learned sink applied after attention: out * sigmoid(logsumexp(scores) - sink)
    "granite_swa": ("GraniteSWAForCausalLM", "GraniteSWAConfig",
                    dict(num_key_value_heads=2, sliding_window=8, eos_token_id=2,
                         layer_types=["sliding_attention", "full_attention"])),
    "mistral": ("MistralForCausalLM", "MistralConfig",
                dict(num_key_value_heads=2, sliding_window=8)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=2)),
}

# (name, attention implementations it supports, attention computations per forward)
ARCHS = [
    ("deepseek_v3", ("eager", "sdpa"), 2),
    ("deepseek_v2", ("eager", "sdpa"), 2),
    ("deepseek_v32", ("eager", "sdpa"), 2),
    ("glm_moe_dsa", ("eager", "sdpa"), 2),
    ("deepseek_v4", ("eager",), 2),
    ("gpt_oss", ("eager",), 2),
    ("gemma3", ("eager", "sdpa"), 3),
    ("mistral", ("eager", "sdpa"), 2),
    ("gemma4", ("eager", "sdpa"), 2),
    ("qwen3_5", ("eager", "sdpa"), 1),
    ("qwen4_exp", ("sdpa",), 1),     # eager returns the weights: dense, reason shown (below)
    ("granite_swa", ("eager",), 2),
]


def build(name: str, impl: str, seed: int = 0):
    import transformers as T
    arch, cfg_name, extra = CONFIGS[name]
    if not hasattr(T, arch):
        import pytest
        pytest.skip(f"transformers {T.__version__} has no {arch}")
    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256)
    kw.update(extra)
    torch.manual_seed(seed)
    cfg = getattr(T, cfg_name)(**kw, attn_implementation=impl)
    return getattr(T, arch)(cfg).eval()


def padded_batch(n: int = 23, seed: int = 0):
    """(ids [3, n], attention_mask [3, n]): a full row, a left-padded and a right-padded one."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, n), generator=g)
    am = torch.ones(3, n, dtype=torch.long)
    am[1, :5] = 0
    am[2, n - 6:] = 0
    return ids, am


def generate_dense_matches(m, n: int = 13, new: int = 5, cache: str | None = None,
                           via: str = "compile"):
    """Greedy ``generate`` of ``m`` and of ``planner.compile(m, policy="dense")`` on one prompt
    of ``n`` tokens: the same tokens and scores (-inf where min_new_tokens bans EOS); returns the
    compiled model for the caller's inspect checks. ``cache``: ``generate``'s
    ``cache_implementation`` ("static": a preallocated cache written in place). ``via="backend"``:
    ``m.forward`` compiled by ``torch.compile`` with ``planner.backend(policy="dense")`` instead
    (returns the backend)."""
    import planner
    ids = torch.randint(0, 128, (1, n))
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    if cache is not None:
        kw["cache_implementation"] = cache
    with torch.no_grad():
        ref = m.generate(ids, **kw)
        if via == "backend":
            cm = planner.backend(policy="dense")
            m.forward = torch.compile(m.forward, backend=cm)
            got = m.generate(ids, **kw)
        else:
            cm = planner.compile(m, policy="dense")
            got = cm.generate(ids, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    return cm


def compiled_matches(m, policy="dense", tol: float = 1e-5, n: int = 23, batch: int = 1):
    """``planner.compile(m, policy=policy)``'s logits on ``batch`` random prompts of ``n``
    tokens equal ``m``'s within ``tol`` (relative, ``conftest.max_err``); returns the compiled
    model."""
    import planner
    from conftest import max_err
    ids = torch.randint(0, 128, (batch, n))
    with torch.no_grad():
        ref = m(ids).logits
        cm = planner.compile(m, policy=policy)
        out = cm(ids).logits
    assert max_err(out, ref) <= tol
    return cm
