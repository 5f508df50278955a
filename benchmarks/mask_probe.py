"""Whether the causal mask Hugging Face builds under torch.compile is proved causal (the site then
runs SDPA with is_causal, as the original does) on this machine's torch and transformers:
prints the captured graph's mask-building lines and each site's modifiers and causal rule.

    PYTHONPATH=. python benchmarks/mask_probe.py
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# the repository root, not this folder (benchmarks/kernels.py would shadow a package)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402

import planner  # noqa: E402
from runtime.spec import lookup  # noqa: E402


def probe(device: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                      attn_implementation="sdpa")
    m = LlamaForCausalLM(cfg).eval().to(device)
    ids = torch.randint(0, 128, (1, 200), device=device)
    seen = []

    def show(gm, example_inputs):
        seen.append(gm.code)
        return gm.forward
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(m, backend=show)(ids, use_cache=False)
    code = seen[0].splitlines()
    keep = [ln for ln in code if any(w in ln for w in ("mask", "arange", "vmap", "index", " le",
                                                       " ge", "lt(", "gt(", "sdpa", "scaled_dot"))]
    print(f"== {device}: captured graph, {len(code)} lines; mask-related:")
    print("\n".join(keep[:60]))
    cm = planner.compile(m, policy="dense")
    with torch.no_grad():
        cm(ids, use_cache=False)
    be = cm._planner_backend
    for gm in be.graphs:
        for n in gm.graph.nodes:
            if n.op == "call_function" and "attend" in str(n.target):
                spec = lookup(n.args[-1])
                print("site", spec.site, "mods", spec.mods, "causal", spec.causal,
                      "rules", spec.rules)
    print(planner.inspect(cm))


if __name__ == "__main__":
    import transformers
    print(torch.__version__, transformers.__version__)
    for dev in sys.argv[1:] or ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        probe(dev)
