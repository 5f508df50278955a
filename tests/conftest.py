import os
import zlib

# Triton kernels run on the CPU through the interpreter in these tests. The flag must be set
# before triton is first imported (its own @jit helpers are built at import), so it is set here
# on machines without an NVIDIA device.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tests check what each policy computes, at lengths where the cost model (which runs a site
# densely wherever that is faster, on the CPU too) would run every site densely; its choices are
# tested with an explicit cost_model="auto" (tests/test_costmodel.py, test_never_slower.py).
import planner  # noqa: E402

planner.set_defaults(cost_model="off")


@pytest.fixture(autouse=True)
def _seed(request):
    # a seed per test derived from its id (stable across runs, so failures reproduce);
    # PLANNER_TEST_SEED shifts every seed to draw fresh inputs
    base = int(os.environ.get("PLANNER_TEST_SEED", "0"))
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + base) % (2 ** 31))
    yield


def max_err(a, b) -> float:
    return (a - b).abs().max().item()


def tiny_llama(impl: str, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=16 * heads, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=512,
                      attn_implementation=impl)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(impl: str, layers: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, attn_implementation=impl)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_bert(impl: str, layers: int = 2):
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=128, attn_implementation=impl)
    return BertModel(cfg).eval()


@pytest.fixture(scope="module")
def tiny_lm_corpus():
    """(a 2-layer tiny Llama, its byte codec, haystack text, held-out text) of the quality
    harness's toy corpus, built once per module."""
    from planner.quality.toy import tiny_llama_lm, toy_corpus
    lm, codec = tiny_llama_lm(layers=2)
    hay, heldout = toy_corpus(codec)
    return lm, codec, hay, heldout
