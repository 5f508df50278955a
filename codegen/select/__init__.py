"""Importance estimates and index-set selection (block lists), PyTorch references."""
from .reference import (allowed_blocks, block_keep_fn, blocks_from_mask, mask_from_blocks,
                        pooled_block_scores, select_topk_blocks, window_blocks, window_keep_fn)

__all__ = ["allowed_blocks", "block_keep_fn", "blocks_from_mask", "mask_from_blocks",
           "pooled_block_scores", "select_topk_blocks", "window_blocks", "window_keep_fn"]
