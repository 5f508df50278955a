"""Token-sparse (gather) attention: PyTorch reference and Triton kernel source."""
from .reference import token_sparse_attention_ref

__all__ = ["token_sparse_attention_ref"]
