"""MLA (multi-head latent attention) in its absorbed form: token-sparse attention of many query
heads over one shared latent K/V row per key (``reference.py``, ``sparse_kernel.py``)."""
