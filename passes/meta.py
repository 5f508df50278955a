"""Shape/meta propagation: make sure every node carries ``meta['val']`` (a fake tensor)."""
from __future__ import annotations

import torch.fx as fx


def propagate_meta(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """Dynamo records ``example_value`` on each node; reuse it. Graphs from ``symbolic_trace``
    have none: propagate fake tensors from the example inputs."""
    from_dynamo = False
    for n in gm.graph.nodes:
        if "example_value" in n.meta:
            from_dynamo = True
            n.meta.setdefault("val", n.meta["example_value"])
    # Dynamo's graphs carry symbolic shapes already: propagating again from the example
    # inputs would specialise them. Only graphs with no recorded values are propagated.
    has_vals = any("val" in n.meta for n in gm.graph.nodes if n.op != "output")
    if not from_dynamo and not has_vals and ctx.example_inputs is not None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fakes = [mode.from_tensor(x) if hasattr(x, "shape") else x for x in ctx.example_inputs]
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    return gm
