"""Every kernel family renders the same bytes for the fixed list of ``render_variants.py``.

``tests/data/render_hashes.json`` holds the sha256 of each render's text (block-sparse Triton
and Gluon, token-sparse forward and backward, selection and indexer kernels); a change that is
not meant to alter a kernel's text must leave every digest as it is.
"""
import json

import render_variants


def test_renders_byte_identical():
    with open(render_variants.HASH_FILE) as f:
        stored = json.load(f)
    rows = render_variants.render_hashes()
    assert len(rows) == stored["variants"] == len(stored["hashes"])
    assert render_variants.kind_counts(rows) == stored["kinds"]
    for (kind, spec, sch, digest), want in zip(rows, stored["hashes"]):
        assert digest.startswith(want), f"{kind} {spec} {sch} renders different text"
