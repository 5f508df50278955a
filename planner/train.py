"""Training DeepSeek Sparse Attention's indexers (``policy="dsa"``), as the DeepSeek-V3.2-Exp
report does it, on a model compiled with ``planner.compile``:

1. **Dense warm-up** — the model frozen, attention dense; only the indexers learn, with
   ``indexer_distillation_loss``: KL(p_t || softmax(I[t, :])) per query t, where p_t is the
   main attention of t summed over heads and L1-normalised (over the causally visible keys).
2. **Sparse stage** — top-k on, everything trains: ``sparse_stage`` returns the LM loss plus
   the KL restricted to each query's selected set. The indexer reads detached q/k, so the LM
   loss does not reach it and the KL does not reach the model.

Example::

    cm = planner.compile(model, policy=planner.policy("dsa", topk=128))
    cm(ids)                                         # creates the indexers (first call)
    opt = torch.optim.AdamW(indexer_parameters(cm), lr=1e-3)
    loss = indexer_distillation_loss(cm, ids)       # warm-up step
    loss.backward(); opt.step()

Memory: the losses rebuild each site's dense attention in chunks of ``chunk`` query rows
(``B * Hq * chunk * Nkv`` floats at a time); they are meant for training lengths.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from runtime import dsa


def indexers(model: nn.Module, created: bool = False) -> dsa.IndexerBank:
    """The compiled model's IndexerBank (``created``: raise if no site has run yet)."""
    bank = getattr(model, "sparse_indexers", None)
    if not isinstance(bank, dsa.IndexerBank):
        raise TypeError(f"{type(model).__name__} has no DSA indexers: compile it with "
                        f"planner.compile(model, policy='dsa' or a map using dsa)")
    if created and not len(bank.sites):
        raise RuntimeError("the DSA indexers are created at each site's first call: run the "
                           "compiled model once (any input) before training them")
    return bank


def indexer_parameters(model: nn.Module) -> list:
    """The parameters of every indexer of a compiled model (for the warm-up optimizer)."""
    return list(indexers(model, created=True).parameters())


def _visible(off: int, r0: int, r1: int, n_kv: int, device, causal: bool = True) -> torch.Tensor:
    """bool [r1 - r0, Nkv]: key s visible to query row t (bottom-right causal by ``off``)."""
    if not causal:
        return torch.ones(r1 - r0, n_kv, dtype=torch.bool, device=device)
    rows = torch.arange(r0, r1, device=device)[:, None] + off
    return torch.arange(n_kv, device=device)[None, :] <= rows


def _row_losses(rec: dsa.SiteRecord, indices: Optional[torch.Tensor], chunk: int,
                restrict: bool):
    """Per-row (KL, recall) of one site call: KL(p || softmax(I)) over the visible keys (over
    the listed ones when ``restrict``), and the dense attention mass inside ``indices`` (None
    without indices). Both [B, Nq]; KL differentiable w.r.t. the indexer."""
    q, k = rec.q, rec.k
    B, Hq, n_q, _ = q.shape
    n_kv = k.shape[2]
    kf = k.float().repeat_interleave(Hq // k.shape[1], dim=1)
    listed = dsa.keep_from_indices(indices, n_kv) if indices is not None else None
    kls, recalls = [], []
    for r0 in range(0, n_q, chunk):
        r1 = min(r0 + chunk, n_q)
        vis = _visible(rec.offset, r0, r1, n_kv, q.device, rec.causal)            # [R, Nkv]
        s = torch.matmul(q[:, :, r0:r1].float(), kf.transpose(-1, -2)) * rec.scale
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1).mean(dim=1)  # [B, R, Nkv]
        keep = vis.expand(B, -1, -1)
        if listed is not None:
            sel = listed(r0, r1)[:, 0]                                          # [B, R, Nkv]
            recalls.append((p * sel).sum(-1))
            if restrict:
                keep = keep & sel
        i_s = rec.indexer.scores(q[:, :, r0:r1], k, rec.offset + r0)           # [B, R, Nkv]
        log_q = torch.log_softmax(i_s.masked_fill(~keep, float("-inf")), dim=-1)
        p_r = torch.where(keep, p, 0.0)
        p_r = p_r / p_r.sum(-1, keepdim=True).clamp_min(1e-30)
        kl = torch.where(p_r > 0, p_r * (torch.log(p_r.clamp_min(1e-30)) - log_q), 0.0)
        kls.append(kl.sum(-1))
    return torch.cat(kls, 1), (torch.cat(recalls, 1) if recalls else None)


def _kl(records, restricted: bool, chunk: int) -> torch.Tensor:
    if not records:
        raise RuntimeError("no dsa site ran during the forward pass: is the model compiled with "
                           "a dsa policy, and does the input reach its attention?")
    total = []
    for rec in records:
        kl, _ = _row_losses(rec, rec.indices if restricted else None, chunk, restricted)
        total.append(kl.mean())
    return torch.stack(total).mean()


def indexer_distillation_loss(model: nn.Module, *args: Any, chunk: int = 256,
                              **kwargs: Any) -> torch.Tensor:
    """Dense warm-up loss: runs ``model(*args, **kwargs)`` with dense attention and no
    gradient to the model, and returns the mean over dsa sites and query rows of
    KL(p_t || softmax(I[t, :])), differentiable w.r.t. the indexers only."""
    indexers(model)
    with torch.no_grad(), dsa.recording("dense") as rec:
        model(*args, **kwargs)
    return _kl(rec.records, restricted=False, chunk=chunk)


@dataclass
class SparseStageLoss:
    total: torch.Tensor           # lm + kl_weight * kl
    lm: torch.Tensor
    kl: torch.Tensor              # KL restricted to the selected sets (indexers only)
    output: Any                   # what the model returned


def sparse_stage(model: nn.Module, *args: Any, loss_fn: Optional[Callable[[Any], torch.Tensor]] = None,
                 kl_weight: float = 1.0, chunk: int = 256, **kwargs: Any) -> SparseStageLoss:
    """Sparse-stage loss: the model runs with its top-k selections; ``loss_fn(output)`` gives
    the LM loss (default: ``output.loss``, as HF models return with ``labels=``), to which the
    indexers' KL restricted to the selected keys is added. Gradients of the LM loss reach the
    model through the sparse attention; the indexers see detached inputs."""
    indexers(model)
    with dsa.recording("sparse") as rec:
        out = model(*args, **kwargs)
    if loss_fn is not None:
        lm = loss_fn(out)
    else:
        lm = getattr(out, "loss", None)
        if lm is None:
            raise ValueError("the model returned no .loss: pass labels= for an HF model or "
                             "loss_fn=")
    kl = _kl(rec.records, restricted=True, chunk=chunk)
    return SparseStageLoss(lm + kl_weight * kl, lm, kl, out)


@torch.no_grad()
def evaluate_indexers(model: nn.Module, *args: Any, chunk: int = 256, **kwargs: Any) -> dict:
    """On one input: mean KL(p || softmax(I)) over the visible keys, and the top-k recall —
    the fraction of the dense attention mass (summed over heads) inside each query's
    selected set — averaged over sites and query rows. The model attends densely here."""
    indexers(model)
    with dsa.recording("dense") as rec:
        model(*args, **kwargs)
    kls, recalls = [], []
    for r in rec.records:
        q_i, w, k_i = r.indexer(r.q, r.k, r.offset)
        idx = dsa.topk_indices(q_i, w, k_i, r.topk, causal=r.causal, offset=r.offset)
        kl, recall = _row_losses(r, idx.unsqueeze(1), chunk, restrict=False)
        kls.append(kl.mean())
        recalls.append(recall.mean())
    return {"kl": float(torch.stack(kls).mean()), "recall": float(torch.stack(recalls).mean()),
            "sites": len(rec.records)}

