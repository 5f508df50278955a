"""Launchers of the Triton kernels, one module per kernel family of ``codegen``:
``block_sparse``, ``token_sparse`` (with its autograd function), ``select`` (estimators and
block selection), ``indexer`` (the lightning indexer; its few-row path in ``indexer_rows``).
``launch`` holds what they share, and ``kernels_enabled``: whether a call runs them at all."""
