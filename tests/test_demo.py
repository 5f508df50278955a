"""The README's main job, ``python -m planner demo``, at a small size."""
from planner.__main__ import main


def test_demo_runs_every_policy(capsys):
    assert main(["demo", "--seq", "300", "--layers", "1", "--topk", "2"]) == 0
    out = capsys.readouterr().out
    for row in ("dense", "block_topk", "sink_window", "dsa (untrained)"):
        assert f"\n{row} " in out
    dense = next(line for line in out.splitlines() if line.startswith("dense "))
    assert float(dense.split()[1]) < 1e-4            # the identity check: max |err| of logits
    assert "torch.ops.sparse.attend" in out
