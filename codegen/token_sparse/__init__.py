"""Token-sparse (gather) attention: PyTorch reference (forward and backward) and Triton kernel
source (``kernel.py`` forward, ``backward.py`` backward)."""
from .reference import token_sparse_attention_bwd_ref, token_sparse_attention_ref

__all__ = ["token_sparse_attention_ref", "token_sparse_attention_bwd_ref"]
