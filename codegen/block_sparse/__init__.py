"""Block-sparse flash attention: PyTorch reference, Triton kernel source (``kernel.py``; the
Hopper Gluon variant in ``wgmma_kernel.py``), FlexAttention bridge."""
from .flex import from_flex_block_mask, to_flex_block_mask
from .reference import block_lists_to_dense, block_sparse_attention_ref, block_sparse_keep_mask

__all__ = ["block_lists_to_dense", "block_sparse_attention_ref", "block_sparse_keep_mask",
           "from_flex_block_mask", "to_flex_block_mask"]
