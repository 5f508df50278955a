"""The attention zoo: tiny models and hand-written spellings that discovery must handle.

Each ``ZooCase`` builds ``(callable, args, kwargs)`` and says what the planner must find:
``sites`` attention computations rewritten, ``fallback`` ones reported dense with a reason,
``unmatched`` softmax nodes left alone with a reason. Sizes stay tiny (hidden <= 64, 2 layers,
sequences <= 40) so the zoo runs in a few CPU minutes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

B, N, H, D = 2, 19, 4, 8               # hand-written cases: q/k/v [B, H, N, D]
ANY = "any"


def ADDITIVE_ONLY(kinds: tuple) -> bool:
    """Every modifier of the site is an additive tensor (mask and/or bias), at least one."""
    return len(kinds) >= 1 and set(kinds) == {"add"}


@dataclass(frozen=True)
class ZooCase:
    id: str
    build: Callable[[], tuple]          # -> (model or function, args, kwargs)
    sites: int                          # attention computations, each rewritten
    fallback: int = 0                   # attention computations that stay dense, with a reason
    unmatched: int = 0                  # softmax nodes left alone, with a reason
    out: Callable[[Any], Any] = lambda y: y
    grad: bool = False                  # run with autograd enabled
    causal: Any = ANY                   # spec.causal of every rewritten site (ANY: not checked)
    mods: Any = ANY                     # spec.mods kinds of every rewritten site, e.g. ("add",),
                                        # or a predicate of the kinds
    reason: str = ""                    # substring of every fallback / unmatched reason
    notes: dict = field(default_factory=dict)   # site-name substring -> (causal, mod kinds)
    window: Any = ANY                   # spec.window of every rewritten site (ANY: not checked)
    kv_valid: Any = ANY                 # spec.kv_valid (per-row key lengths) of every site
    tol: float = 1e-5                   # max abs error of policy="dense" (fp32)


def _qkv(n_q=N, n_kv=N, h=H, h_kv=None, d=D, b=B):
    return (torch.randn(b, h, n_q, d), torch.randn(b, h_kv or h, n_kv, d),
            torch.randn(b, h_kv or h, n_kv, d))


def _fn(f, extra=lambda: (), **shape):
    """Build a case calling ``f(q, k, v, *extra())``; tensors are drawn when the case runs."""
    return lambda: (f, _qkv(**shape) + tuple(extra()), {})


# ---------------------------------------------------------------------------- scale spellings

def scale_on_q(q, k, v):
    # OPT / BART: the query projection is pre-scaled
    return torch.softmax((q * D ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v


def scale_split_qk(q, k, v):
    # timm / CLIP (openai): q * d**-0.25 and k * d**-0.25 for fp16 range
    s = D ** -0.25
    return torch.softmax((q * s) @ (k * s).transpose(-2, -1), dim=-1) @ v


def scale_torch_full(q, k, v):
    # GPT-2 (HF <= 4.4x): attn_weights / torch.full([], value.size(-1) ** 0.5)
    w = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], v.size(-1) ** 0.5, dtype=q.dtype)
    return torch.matmul(F.softmax(w, dim=-1), v)


def scale_0dim_const(q, k, v):
    # a 0-dim tensor constant built in forward
    return torch.softmax(torch.tensor(D ** -0.5) * (q @ k.mT), dim=-1) @ v


class ScaleBuffer(nn.Module):
    """A 0-dim buffer scale (not a compile-time constant: applied to q at run time)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(D ** -0.5))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1) @ v


def no_scale(q, k, v):
    # T5 / mT5: no scaling at all
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(3, 2)).float(), dim=-1), v)


# ---------------------------------------------------------------------------- score spellings

def bmm_3d(q, k, v):
    # [B*H, N, D] with torch.bmm (fairseq / older HF encoder-decoders)
    q3, k3, v3 = (t.reshape(B * H, -1, D) for t in (q, k, v))
    p = torch.softmax(torch.bmm(q3, k3.transpose(1, 2)) * D ** -0.5, dim=-1)
    return torch.bmm(p, v3).view(B, H, -1, D)


def einsum_bhqd(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def einsum_bqhd(q, k, v):
    # BQHD layout kept end to end (xformers-style callers)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))              # [B, N, H, D]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(dim=-1), v)


def einsum_ellipsis(q, k, v):
    s = torch.einsum("...id,...jd->...ij", q, k) * D ** -0.5
    return torch.einsum("...ij,...jd->...id", torch.softmax(s, -1), v)


def baddbmm_bias(q, k, v, bias):
    # Bloom-style: baddbmm(bias [B*H, 1, N], q, k^T, beta=1, alpha=scale) on [B*H, N, D]
    q3, k3, v3 = (t.reshape(B * H, -1, D) for t in (q, k, v))
    s = bias.baddbmm(batch1=q3, batch2=k3.transpose(-1, -2), beta=1.0, alpha=D ** -0.5)
    s = s.view(B, H, q.shape[2], -1)
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype).view(B * H, q.shape[2], -1)
    return torch.bmm(p, v3).view(B, H, -1, D)


def key_mT(q, k, v):
    return torch.softmax(q @ k.mT * D ** -0.5, dim=-1) @ v


def key_permute(q, k, v):
    return torch.softmax(q @ k.permute(0, 1, 3, 2) * D ** -0.5, dim=-1) @ v


def operator_matmul_fp32_cast(q, k, v):
    # fp32 softmax then cast back (HF eager): q in bf16 here
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    s = (qb @ kb.transpose(-2, -1)) * D ** -0.5
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(qb.dtype)
    return (p @ vb).float()


def aten_safe_softmax(q, k, v):
    # torch.export / SDPA math decomposition: aten._safe_softmax
    s = q @ k.transpose(-2, -1) * D ** -0.5
    return torch.ops.aten._safe_softmax.default(s, -1) @ v


def torch_safe_softmax(q, k, v):
    # torch._safe_softmax: a builtin Dynamo would otherwise break the graph at
    return torch._safe_softmax(q @ k.transpose(-2, -1) * D ** -0.5, -1) @ v


def dropout_eval(q, k, v):
    p = F.dropout(torch.softmax(q @ k.transpose(-2, -1) * D ** -0.5, -1), 0.1, training=False)
    return p @ v


# ---------------------------------------------------------------------------- masks

def causal_masked_fill_tril(q, k, v):
    # nanoGPT without a buffer: masked_fill(tril(ones) == 0, -inf)
    n = q.shape[2]
    s = q @ k.transpose(-2, -1) * D ** -0.5
    s = s.masked_fill(torch.tril(torch.ones(n, n)) == 0, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def causal_where_arange(q, k, v):
    # where(mask, s, finfo.min) with the mask from index comparisons (HF masking_utils style)
    n = q.shape[2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    s = q @ k.transpose(-2, -1) * D ** -0.5
    s = torch.where(j <= i, s, torch.finfo(s.dtype).min)
    return torch.softmax(s, dim=-1) @ v


def causal_triu_additive(q, k, v):
    # Llama v1 / Mistral reference: s + triu(full(-inf), diagonal=1)
    n = q.shape[2]
    mask = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
    return torch.softmax(q @ k.transpose(-2, -1) * D ** -0.5 + mask, dim=-1) @ v


def causal_bool_sdpa(q, k, v):
    # a boolean causal mask handed to SDPA (instead of is_causal)
    n = q.shape[2]
    m = torch.ones(n, n, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def causal_plus_padding(q, k, v, keep):
    # causal AND padding ([B, 1, 1, N] from a [B, N] input): the causal rule and per-row key
    # lengths
    n = q.shape[2]
    m = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    s = (q @ k.transpose(-2, -1)) * D ** -0.5
    return torch.softmax(s.masked_fill(~m, float("-inf")), -1) @ v


def shifted_causal(q, k, v):
    # kv <= q + 1: triangular, but neither alignment -> kept as a modifier
    n = q.shape[2]
    mask = torch.triu(torch.full((n, n), float("-inf")), diagonal=2)
    return torch.softmax(q @ k.transpose(-2, -1) * D ** -0.5 + mask, dim=-1) @ v


def padding_mask_additive(q, k, v, am):
    # BERT-style [B, 1, 1, N] additive padding mask from attention_mask
    ext = (1.0 - am[:, None, None, :].float()) * torch.finfo(torch.float32).min
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D) + ext, -1) @ v


def sliding_window(q, k, v, w: int = 5):
    # Mistral / Longformer-local: causal and at most w keys back
    n = q.shape[2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = (j <= i) & (j > i - w)
    s = (q @ k.transpose(-2, -1) * D ** -0.5).masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


def alibi_causal(q, k, v):
    # ALiBi (Press et al.) written out: -slope * (i - j) plus a causal mask
    n = q.shape[2]
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)])
    pos = torch.arange(n)
    bias = slopes[:, None, None] * (pos[None, None, :] - pos[None, :, None])    # [H, N, N]
    mask = torch.triu(torch.full((n, n), float("-inf")), 1)
    return torch.softmax(q @ k.transpose(-2, -1) * D ** -0.5 + bias + mask, -1) @ v


def softcap_causal(q, k, v, cap: float = 5.0):
    # Gemma-2 / Grok: tanh soft-cap of the logits before the mask
    n = q.shape[2]
    s = q @ k.transpose(-2, -1) * D ** -0.5
    s = torch.tanh(s / cap) * cap
    s = s + torch.triu(torch.full((n, n), float("-inf")), 1)
    return torch.softmax(s, -1) @ v


# ---------------------------------------------------------------------------- GQA, cache, cross

def gqa_repeat_interleave(q, k, v):
    # GQA group 3 through repeat_interleave
    k, v = (torch.repeat_interleave(t, 3, dim=1) for t in (k, v))
    return torch.softmax(q @ k.transpose(-2, -1) * D ** -0.5, -1) @ v


def gqa_enable_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def kv_cache_decode(q, k_new, v_new, past_k, past_v):
    # one decode step: cat of the cached keys, q_len = 1
    k, v = torch.cat([past_k, k_new], dim=-2), torch.cat([past_v, v_new], dim=-2)
    return torch.softmax(q @ k.transpose(-2, -1) * D ** -0.5, -1) @ v


def cross_attention(q, k, v, enc_keep):
    # encoder-decoder cross-attention: Nq != Nkv, encoder padding mask
    s = q @ k.transpose(-2, -1) * D ** -0.5
    s = s.masked_fill(~enc_keep[:, None, None, :], torch.finfo(s.dtype).min)
    return torch.softmax(s, -1) @ v


# ---------------------------------------------------------------------------- negatives

def neg_softmax_query_axis(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 5)

    def forward(self, x):
        return torch.softmax(self.fc(x), dim=-1)


def neg_returned_weights(q, k, v):
    w = torch.softmax(q @ k.transpose(-2, -1) * D ** -0.5, dim=-1)
    return w @ v, w


def neg_scores_thresholded(q, k, v):
    # keep scores within 2 of the row max: the "mask" is computed from the scores themselves
    s = q @ k.transpose(-2, -1) * D ** -0.5
    s = s.masked_fill(s < s.amax(-1, keepdim=True) - 2.0, float("-inf"))
    return torch.softmax(s, -1) @ v


class LearnedTemperature(nn.Module):
    """Per-head learned temperature (cosine-attention style): not a constant scale."""

    def __init__(self):
        super().__init__()
        self.temp = nn.Parameter(torch.rand(H, 1, 1) + 0.5)

    def forward(self, q, k, v):
        return torch.softmax((q @ k.transpose(-2, -1)) * self.temp, -1) @ v


# ---------------------------------------------------------------------------- torch.nn modules

def _mha(need_weights: bool, masks: bool = False):
    m = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(B, 17, 32)
    if not masks:
        return (lambda x: m(x, x, x, need_weights=need_weights)[0]), (x,), {}
    kpm = torch.zeros(B, 17, dtype=torch.bool)
    kpm[1, 12:] = True
    causal = torch.ones(17, 17, dtype=torch.bool).triu(1)        # True = masked, like kpm
    return (lambda x: m(x, x, x, key_padding_mask=kpm, attn_mask=causal,
                        need_weights=False)[0]), (x,), {}


def _mha_weights():
    m = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    return (lambda x: m(x, x, x)), (torch.randn(B, 17, 32),), {}   # (out, averaged weights)


def _mha_cross():
    m = nn.MultiheadAttention(32, 4, kdim=24, vdim=24).eval()    # separate k/v projections
    return (lambda q, kv: m(q, kv, kv, need_weights=False)[0]), (torch.randn(13, B, 32),
                                                                 torch.randn(21, B, 24)), {}


def _encoder_layer(masks: bool = False):
    m = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=masks,
                                   activation="gelu" if masks else "relu").eval()
    if not masks:
        return m, (torch.randn(B, 17, 32),), {}
    kpm = torch.zeros(B, 17, dtype=torch.bool)
    kpm[1, 11:] = True
    causal = torch.ones(17, 17, dtype=torch.bool).triu(1)
    return m, (torch.randn(B, 17, 32),), {"src_mask": causal, "src_key_padding_mask": kpm}


def _mha_zero_attn():
    m = nn.MultiheadAttention(32, 4, batch_first=True, add_zero_attn=True).eval()
    return (lambda x: m(x, x, x, need_weights=False)[0]), (torch.randn(B, 17, 32),), {}


# ---------------------------------------------------------------------------- HuggingFace

V = 128                                           # vocabulary of every tiny HF model


def _ids(n=23, b=B):
    return torch.randint(0, V, (b, n))


def _hf(model_cls: str, cfg_cls: str, **cfg):
    import transformers
    config = getattr(transformers, cfg_cls)(**cfg)
    return getattr(transformers, model_cls)(config).eval()


def _decoder_cfg(impl, **kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, attn_implementation=impl)
    base.update(kw)
    return base


def hf_causal_lm(model_cls, cfg_cls, impl, n=23, **kw):
    def build():
        m = _hf(model_cls, cfg_cls, **_decoder_cfg(impl, **kw))
        return m, (_ids(n),), {}
    return build


def hf_gpt2(impl):
    def build():
        m = _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                n_positions=64, attn_implementation=impl, bos_token_id=0, eos_token_id=0)
        return m, (_ids(),), {}
    return build


def hf_opt(impl):
    def build():
        m = _hf("OPTForCausalLM", "OPTConfig", vocab_size=V, hidden_size=32, ffn_dim=64,
                num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                max_position_embeddings=64, attn_implementation=impl)
        return m, (_ids(),), {}
    return build


def hf_bloom():
    def build():
        m = _hf("BloomForCausalLM", "BloomConfig", vocab_size=V, hidden_size=32, n_layer=2,
                n_head=4, attn_implementation="eager")
        am = torch.ones(B, 23, dtype=torch.long)
        am[1, :4] = 0                                   # left padding
        return m, (_ids(),), {"attention_mask": am}
    return build


def hf_falcon(impl, alibi):
    def build():
        m = _hf("FalconForCausalLM", "FalconConfig", vocab_size=V, hidden_size=32,
                num_hidden_layers=2, num_attention_heads=4, alibi=alibi,
                attn_implementation=impl)
        return m, (_ids(),), {}
    return build


def hf_bert(impl):
    def build():
        m = _hf("BertModel", "BertConfig", vocab_size=V, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                attn_implementation=impl)
        am = torch.ones(3, 21, dtype=torch.long)
        am[1, 15:] = 0
        am[2, 4:] = 0
        return m, (), {"input_ids": torch.randint(0, V, (3, 21)), "attention_mask": am}
    return build


def hf_t5(impl):
    def build():
        m = _hf("T5ForConditionalGeneration", "T5Config", vocab_size=V, d_model=32, d_kv=8,
                d_ff=64, num_layers=2, num_heads=4, attn_implementation=impl,
                decoder_start_token_id=0)
        am = torch.ones(B, 21, dtype=torch.long)
        am[1, 16:] = 0
        return m, (), {"input_ids": torch.randint(0, V, (B, 21)), "attention_mask": am,
                       "decoder_input_ids": torch.randint(0, V, (B, 9))}
    return build


def hf_llama_decode(impl):
    """A KV-cache decode step (q_len = 1) after a 19-token prefill; the cache is an argument
    (the test copies the arguments before the reference call, which appends to the cache)."""
    def build():
        m = _hf("LlamaForCausalLM", "LlamaConfig", **_decoder_cfg(
            impl, hidden_size=48, num_attention_heads=6, num_key_value_heads=2))
        with torch.no_grad():
            cache = m(_ids(19), use_cache=True).past_key_values
        return m, (_ids(1),), {"cache": cache, "use_cache": True}
    return build


def _logits(y):
    return y.logits


def _hidden(y):
    return y.last_hidden_state


CAUSAL_LM = dict(out=_logits, sites=2)


def _hf_cases() -> list:
    lr = "lower_right"
    return [
        ZooCase("hf-llama-gqa3-eager", hf_causal_lm("LlamaForCausalLM", "LlamaConfig", "eager",
                hidden_size=48, num_attention_heads=6, num_key_value_heads=2), causal=lr, mods=(),
                **CAUSAL_LM),
        ZooCase("hf-llama-gqa3-sdpa", hf_causal_lm("LlamaForCausalLM", "LlamaConfig", "sdpa",
                hidden_size=48, num_attention_heads=6, num_key_value_heads=2),
                causal="upper_left", mods=(), **CAUSAL_LM),
        ZooCase("hf-llama-decode-eager", hf_llama_decode("eager"), causal=lr, mods=(),
                **CAUSAL_LM),
        ZooCase("hf-qwen2-eager", hf_causal_lm("Qwen2ForCausalLM", "Qwen2Config", "eager",
                num_key_value_heads=2), causal=lr, mods=(), **CAUSAL_LM),
        ZooCase("hf-qwen3-eager", hf_causal_lm("Qwen3ForCausalLM", "Qwen3Config", "eager",
                num_key_value_heads=2, head_dim=8), causal=lr, mods=(), **CAUSAL_LM),
        ZooCase("hf-qwen3-sdpa", hf_causal_lm("Qwen3ForCausalLM", "Qwen3Config", "sdpa",
                num_key_value_heads=2, head_dim=8), causal="upper_left", mods=(), **CAUSAL_LM),
        ZooCase("hf-mistral-window6-eager", hf_causal_lm("MistralForCausalLM", "MistralConfig",
                "eager", num_key_value_heads=2, sliding_window=6), causal=lr, mods=(), window=6,
                **CAUSAL_LM),
        ZooCase("hf-mistral-window6-sdpa", hf_causal_lm("MistralForCausalLM", "MistralConfig",
                "sdpa", num_key_value_heads=2, sliding_window=6), causal=lr, mods=(), window=6,
                **CAUSAL_LM),
        ZooCase("hf-gemma2-softcap-eager", hf_causal_lm("Gemma2ForCausalLM", "Gemma2Config",
                "eager", num_key_value_heads=2, head_dim=8, sliding_window=6,
                attn_logit_softcapping=20.0, final_logit_softcapping=None), causal=lr,
                notes={"layers.0": (lr, ("softcap",)), "layers.1": (lr, ("softcap",))},
                **CAUSAL_LM),
        ZooCase("hf-phi-eager", hf_causal_lm("PhiForCausalLM", "PhiConfig", "eager"),
                causal=lr, mods=(), **CAUSAL_LM),
        ZooCase("hf-phi-sdpa", hf_causal_lm("PhiForCausalLM", "PhiConfig", "sdpa"),
                causal="upper_left", mods=(), **CAUSAL_LM),
        ZooCase("hf-gpt2-eager", hf_gpt2("eager"), causal=lr, mods=(), **CAUSAL_LM),
        ZooCase("hf-gpt2-sdpa", hf_gpt2("sdpa"), causal="upper_left", mods=(), **CAUSAL_LM),
        ZooCase("hf-gpt-neox-eager", hf_causal_lm("GPTNeoXForCausalLM", "GPTNeoXConfig",
                "eager"), causal=lr, mods=(), **CAUSAL_LM),
        ZooCase("hf-gpt-neox-sdpa", hf_causal_lm("GPTNeoXForCausalLM", "GPTNeoXConfig",
                "sdpa"), causal="upper_left", mods=(), **CAUSAL_LM),
        ZooCase("hf-opt-eager", hf_opt("eager"), causal=lr, mods=(), **CAUSAL_LM),
        ZooCase("hf-opt-sdpa", hf_opt("sdpa"), causal="upper_left", mods=(), **CAUSAL_LM),
        # ALiBi stays a bias; the causal-and-padding mask becomes the rules and per-row lengths
        ZooCase("hf-bloom-alibi-baddbmm-padded", hf_bloom(), causal=lr, mods=("add",),
                kv_valid=True, **CAUSAL_LM),
        # Falcon folds ALiBi into its causal mask: not purely causal, kept as additive
        # modifiers (transformers < 5.2x passes the mask and the bias separately, later
        # versions as one tensor: either way the output is exact)
        ZooCase("hf-falcon-alibi-eager", hf_falcon("eager", True), causal=None,
                mods=ADDITIVE_ONLY, **CAUSAL_LM),
        ZooCase("hf-falcon-rope-mqa-sdpa", hf_falcon("sdpa", False), **CAUSAL_LM),
        ZooCase("hf-bert-padding-eager", hf_bert("eager"), sites=2, out=_hidden, causal=None,
                mods=(), kv_valid=True),
        ZooCase("hf-bert-padding-sdpa", hf_bert("sdpa"), sites=2, out=_hidden, causal=None,
                mods=(), kv_valid=True),
        ZooCase("hf-t5-eager", hf_t5("eager"), sites=6, out=_logits,
                notes={"encoder": (None, ("add",)),
                       "decoder.block.0.layer.0": (lr, ("add",)),
                       "decoder.block.1.layer.0": (lr, ("add",)),
                       "EncDecAttention": (None, ())}),
        ZooCase("hf-t5-sdpa", hf_t5("sdpa"), sites=6, out=_logits),
    ]


def _hand_cases() -> list:
    lr = "lower_right"
    return [
        ZooCase("scale-on-q", _fn(scale_on_q), 1, causal=None, mods=()),
        ZooCase("scale-split-q-k", _fn(scale_split_qk), 1, mods=()),
        ZooCase("scale-torch-full", _fn(scale_torch_full), 1, mods=()),
        ZooCase("scale-0dim-constant", _fn(scale_0dim_const), 1, mods=()),
        ZooCase("scale-0dim-buffer", lambda: (ScaleBuffer(), _qkv(), {}), 1, mods=()),
        ZooCase("scale-none-t5", _fn(no_scale), 1, mods=()),
        ZooCase("scores-bmm-3d", _fn(bmm_3d), 1, mods=()),
        ZooCase("scores-einsum-bhqd", _fn(einsum_bhqd), 1, mods=()),
        ZooCase("scores-einsum-bqhd", _fn(einsum_bqhd), 1, mods=()),
        ZooCase("scores-einsum-ellipsis", _fn(einsum_ellipsis), 1, mods=()),
        ZooCase("scores-baddbmm-bias-3d", _fn(baddbmm_bias, lambda: (torch.randn(B * H, 1, N),)),
                1, mods=("add",)),
        ZooCase("key-mT", _fn(key_mT), 1),
        ZooCase("key-permute", _fn(key_permute), 1),
        ZooCase("softmax-fp32-then-cast-bf16", _fn(operator_matmul_fp32_cast), 1, tol=2e-2),
        ZooCase("softmax-aten-safe-softmax", _fn(aten_safe_softmax), 1),
        ZooCase("softmax-torch-safe-softmax", _fn(torch_safe_softmax), 1),
        ZooCase("dropout-eval", _fn(dropout_eval), 1),
        ZooCase("causal-masked-fill-tril", _fn(causal_masked_fill_tril), 1,
                causal=lr, mods=()),
        ZooCase("causal-where-arange-finfo-min", _fn(causal_where_arange), 1,
                causal=lr, mods=()),
        ZooCase("causal-triu-additive", _fn(causal_triu_additive), 1, causal=lr, mods=()),
        ZooCase("causal-bool-sdpa", _fn(causal_bool_sdpa), 1, causal=lr, mods=()),
        ZooCase("causal-buffer-slice-nanogpt", _nanogpt, 2, causal=lr, mods=()),
        ZooCase("causal-plus-padding", _fn(causal_plus_padding, lambda: (
                torch.arange(N)[None, :] < torch.tensor([[N], [11]]),)), 1, causal=lr,
                mods=(), kv_valid=True),
        ZooCase("mask-shifted-causal-kept", _fn(shifted_causal), 1, causal=None, mods=("add",)),
        ZooCase("mask-padding-b11n", _fn(padding_mask_additive, lambda: (
                (torch.arange(N)[None, :] < torch.tensor([[N], [13]])).long(),)), 1, causal=None,
                mods=("add",)),
        ZooCase("mask-sliding-window", _fn(sliding_window), 1, causal=lr, mods=(), window=5),
        ZooCase("bias-alibi-causal", _fn(alibi_causal), 1, causal=lr, mods=("add",)),
        ZooCase("bias-tanh-softcap-causal", _fn(softcap_causal), 1, causal=lr,
                mods=("softcap",)),
        ZooCase("gqa3-repeat-interleave", _fn(gqa_repeat_interleave, h=6, h_kv=2), 1),
        ZooCase("gqa3-enable-gqa", _fn(gqa_enable_gqa, h=6, h_kv=2), 1,
                causal="upper_left"),
        ZooCase("kv-cache-decode-cat", _fn(kv_cache_decode, lambda: (
                torch.randn(B, H, 30, D), torch.randn(B, H, 30, D)), n_q=1, n_kv=1), 1,
                causal=None, mods=()),
        ZooCase("cross-attention-padded", _fn(cross_attention, lambda: (
                torch.arange(29)[None, :] < torch.tensor([[29], [20]]),), n_q=7, n_kv=29), 1,
                causal=None, mods=(), kv_valid=True),
        ZooCase("nn-mha-no-weights", lambda: _mha(False), 1, causal=None, mods=()),
        ZooCase("nn-mha-padding-and-causal", lambda: _mha(False, masks=True), 1, causal=None,
                mods=("add",)),
        ZooCase("nn-mha-cross-kdim", _mha_cross, 1),
        ZooCase("nn-encoder-layer-fastpath", _encoder_layer, 1),
        ZooCase("nn-encoder-layer-grad", _encoder_layer, 1, grad=True),
        ZooCase("nn-encoder-layer-fastpath-masks", lambda: _encoder_layer(masks=True), 1,
                causal=None, mods=("add",)),
        ZooCase("nn-mha-add-zero-attn-stays-fused", _mha_zero_attn, 0, fallback=1,
                reason="add_zero_attn"),
        ZooCase("neg-softmax-query-axis", _fn(neg_softmax_query_axis), 0, unmatched=1,
                reason="not the key axis"),
        ZooCase("neg-classifier", lambda: (Classifier(), (torch.randn(B, 7, D),), {}), 0,
                unmatched=1, reason="no q @ k^T matmul"),
        ZooCase("neg-returned-weights", _fn(neg_returned_weights), 0, fallback=1,
                reason="also used"),
        ZooCase("neg-learned-temperature", lambda: (LearnedTemperature(), _qkv(), {}), 0,
                unmatched=1, reason="expected a constant or 0-dim scale"),
        ZooCase("neg-scores-thresholded", _fn(neg_scores_thresholded), 0, unmatched=1,
                reason="computed from the scores themselves"),
        ZooCase("neg-mha-weights-returned", _mha_weights, 0, fallback=1,
                reason="need_weights=True", out=lambda y: y[0]),
    ]


def _nanogpt():
    from planner.models import GPTConfig, TinyGPT
    return TinyGPT(GPTConfig(n_layer=2, n_embd=32, block_size=64)).eval(), \
        (torch.randint(0, 256, (B, 37)),), {}


CASES = _hand_cases() + _hf_cases()
