"""Block-sparse flash attention: PyTorch reference, Triton kernel source (``kernel.py``; the
Hopper Gluon variant in ``wgmma_kernel.py``), FlexAttention bridge, a mask tensor's block
summary (``mask_blocks.py``)."""
from .flex import from_flex_block_mask, to_flex_block_mask
from .mask_blocks import (BLOCK_EMPTY, BLOCK_FULL, BLOCK_PARTIAL, mask_block_summary,
                          prune_block_lists)
from .reference import block_lists_to_dense, block_sparse_attention_ref, block_sparse_keep_mask

__all__ = ["BLOCK_EMPTY", "BLOCK_FULL", "BLOCK_PARTIAL", "block_lists_to_dense",
           "block_sparse_attention_ref", "block_sparse_keep_mask", "from_flex_block_mask",
           "mask_block_summary", "prune_block_lists", "to_flex_block_mask"]
