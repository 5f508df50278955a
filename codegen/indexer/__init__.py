"""DeepSeek-Sparse-Attention lightning indexer: fused score + top-k selection (Triton source in
``kernel.py``, launched from ``runtime.kernels.indexer``) and its PyTorch reference."""
from .reference import indexer_scores_ref, indexer_topk_ref, topk_of_scores, visible_counts

__all__ = ["indexer_scores_ref", "indexer_topk_ref", "topk_of_scores", "visible_counts"]
