"""Context parallelism for sparse prefill: queries, keys and values sharded along the sequence
over the ranks of a ``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs); each rank
attends its own queries to the key blocks its policy selected, fetched from their owners.

Layout (``Sharding``): the sequence's NB = ceil(N / block) blocks are cut into 2R chunks of
whole blocks (sizes differ by at most one block, the larger first; the short last block sits in
the last chunk); rank r holds chunks r and 2R-1-r, concatenated. This is PyTorch's head-tail
load balancing for causal attention (``context_parallel``), and its exact layout whenever N is
a multiple of 2R * block; whole blocks keep every query block on one rank.

``context_parallel_attention``, on every rank:

1. estimate: each rank mean-pools its key blocks (one row [D] per key block and KV head) and
   all-gathers them. ``threshold`` also gathers the last ``block`` query rows, each rank's
   per-row max and sum of exp over its own keys (the softmax over all keys), then each key
   block's share of those rows' attention mass (one number per key block and KV head);
2. select: the project's estimator and selection functions (``codegen.select``) run on the
   rank's query blocks against all pooled key blocks: the lists the single-device run makes
   (block_topk: the same operations on the same pooled rows; threshold: its last-block mass
   is a softmax assembled from per-rank partial sums, equal to the single-device one up to
   fp32 rounding, so a list may differ where a cumulative sum meets ``gamma`` within it);
3. fetch: the ids of selected key blocks that live on other ranks go to their owners
   (``all_to_all_single`` of counts, then of ids) and the blocks come back (one
   ``all_to_all_single`` with per-rank split sizes: NCCL and gloo both implement that; gloo's
   list form ``all_to_all`` takes equal sizes only, so it is not used);
4. attend: block-sparse attention of each local chunk over the owned and fetched blocks, laid
   at their positions in a buffer as long as the rank's causal prefix (zeros where nothing was
   fetched: memory of a prefix-long K/V per rank, not traffic). The Triton kernel on CUDA
   reads only the listed blocks; elsewhere ``block_sparse_attention_ref`` scores the prefix
   and masks what the lists leave out.

``dense`` lists every causally visible block: the same path with the whole causal prefix
fetched (what an all-gather of K/V would move, restricted to the blocks a rank can see).
Bytes are counted per rank (``CommBytes``); PyTorch's ring attention at the same sharding
passes every other rank's K/V through every rank (``ring_kv_bytes``).

Example (on every rank of an initialised process group; q [B, Hq, N, D], k, v [B, Hkv, N, D])::

    >>> lay = Sharding(n=4096, world=dist.get_world_size(), block=64)     # doctest: +SKIP
    >>> ql, kl, vl = (lay.shard(t, dist.get_rank()) for t in (q, k, v))   # doctest: +SKIP
    >>> res = context_parallel_attention(ql, kl, vl, BlockTopK(block=64, topk=8), lay)  # doctest: +SKIP
    >>> res.out.shape, res.bytes.received                                  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from codegen.block_sparse.reference import block_sparse_attention_ref
from codegen.select.policies import _group_mean, select_threshold, threshold_estimate
from codegen.select.reference import (_pool, blocks_from_mask, mask_from_blocks,
                                      pooled_block_logits, pooled_block_scores,
                                      select_topk_blocks, structural_blocks)
from runtime.kernels.launch import kernels_enabled
from runtime.policies import PRESETS, BlockTopK, Dense, Policy, Threshold

#: the policies this path runs: their estimators read pooled keys (threshold also one
#: query block's attention mass per key block), so a rank needs no other rank's full K
SUPPORTED = (Dense, BlockTopK, Threshold)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class Sharding:
    """Head-tail sharding of ``n`` tokens over ``world`` ranks in 2 * ``world`` chunks of whole
    ``block``-token blocks: rank r holds chunks r and 2*world-1-r.

        >>> lay = Sharding(n=1000, world=2, block=64)       # 16 blocks, the last of 40 tokens
        >>> lay.chunks(0), lay.chunks(1)
        (((0, 256), (768, 1000)), ((256, 512), (512, 768)))
    """

    n: int
    world: int
    block: int

    def __post_init__(self) -> None:
        for name in ("n", "world", "block"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"Sharding: {name} must be an int >= 1, got {val!r}")
        if self.num_blocks < 2 * self.world:
            raise ValueError(
                f"Sharding: context parallel over {self.world} ranks cuts the sequence into "
                f"{2 * self.world} chunks of whole blocks, but n={self.n} tokens make only "
                f"{self.num_blocks} blocks of {self.block}; expected n > "
                f"{(2 * self.world - 1) * self.block} (a smaller block or fewer ranks)")

    @property
    def num_blocks(self) -> int:
        return _cdiv(self.n, self.block)

    def chunk_blocks(self, j: int) -> tuple[int, int]:
        """Block range ``[first, end)`` of chunk ``j`` (0 <= j < 2 * world)."""
        c = 2 * self.world
        base, extra = divmod(self.num_blocks, c)
        first = j * base + min(j, extra)
        return first, first + base + (j < extra)

    def chunk_ids(self, rank: int) -> tuple[int, int]:
        self._check_rank(rank)
        return rank, 2 * self.world - 1 - rank

    def chunks(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Token ranges ``(start, end)`` of the rank's two chunks, in local order."""
        out = []
        for j in self.chunk_ids(rank):
            b0, b1 = self.chunk_blocks(j)
            out.append((b0 * self.block, min(b1 * self.block, self.n)))
        return tuple(out)

    def local_len(self, rank: int) -> int:
        return sum(e - s for s, e in self.chunks(rank))

    def local_blocks(self, rank: int) -> int:
        return sum(_cdiv(e - s, self.block) for s, e in self.chunks(rank))

    def owners(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rank [NB], local token offset [NB]) of every key block."""
        rank = torch.empty(self.num_blocks, dtype=torch.int64)
        off = torch.empty(self.num_blocks, dtype=torch.int64)
        for r in range(self.world):
            lo = 0
            for s, e in self.chunks(r):
                b0, b1 = s // self.block, _cdiv(e, self.block)
                rank[b0:b1] = r
                off[b0:b1] = lo + torch.arange(b1 - b0) * self.block
                lo += e - s
        return rank.to(device), off.to(device)

    def shard(self, x: torch.Tensor, rank: int, dim: int = 2) -> torch.Tensor:
        """The rank's part of ``x`` (its two chunks along ``dim``, concatenated)."""
        if x.shape[dim] != self.n:
            raise ValueError(f"Sharding.shard: x has {x.shape[dim]} positions along dim {dim} "
                             f"(shape {tuple(x.shape)}), the sharding is for n={self.n}")
        return torch.cat([x.narrow(dim, s, e - s) for s, e in self.chunks(rank)], dim=dim)

    def unshard(self, parts: Sequence[torch.Tensor], dim: int = 2) -> torch.Tensor:
        """Inverse of ``shard``: the full tensor from every rank's part, in rank order."""
        if len(parts) != self.world:
            raise ValueError(f"Sharding.unshard: {len(parts)} parts given, expected one per "
                             f"rank ({self.world})")
        pieces = {}
        for r, p in enumerate(parts):
            if p.shape[dim] != self.local_len(r):
                raise ValueError(f"Sharding.unshard: rank {r}'s part has {p.shape[dim]} "
                                 f"positions along dim {dim}, expected {self.local_len(r)}")
            lo = 0
            for s, e in self.chunks(r):
                pieces[s] = p.narrow(dim, lo, e - s)
                lo += e - s
        return torch.cat([pieces[s] for s in sorted(pieces)], dim=dim)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world:
            raise ValueError(f"Sharding: rank {rank} outside [0, {self.world})")


# ------------------------------------------------------------------------------------ bytes
@dataclass
class CommBytes:
    """Bytes one rank received (``recv``) and sent (``sent``) by purpose: "estimate" (pooled
    keys; threshold's last rows and mass), "index" (block-id lists and their counts), "kv"
    (key/value blocks). Messages a rank sends to itself are not counted."""

    recv: dict = field(default_factory=lambda: {"estimate": 0, "index": 0, "kv": 0})
    sent: dict = field(default_factory=lambda: {"estimate": 0, "index": 0, "kv": 0})

    @property
    def received(self) -> int:
        return sum(self.recv.values())


def ring_kv_bytes(sharding: Sharding, rank: int, k: torch.Tensor, v: torch.Tensor) -> int:
    """Bytes of K/V rank ``rank`` receives under ring attention at this sharding (PyTorch's
    ``context_parallel``): every other rank's shard passes through it once. ``k`` / ``v``: the
    rank's local shards [B, Hkv, n_local, D]."""
    B, Hkv = k.shape[:2]
    other = sharding.n - sharding.local_len(rank)
    return other * B * Hkv * (k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size())


class _Comm:
    """The collectives this module calls, with the bytes each moves counted in ``bytes``."""

    def __init__(self, group, device):
        self.group, self.device = group, device
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bytes = CommBytes()

    def all_gather(self, t: torch.Tensor, kind: str) -> list[torch.Tensor]:
        t = t.contiguous()
        outs = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(outs, t, group=self.group)
        self.bytes.recv[kind] += (self.world - 1) * t.nbytes
        self.bytes.sent[kind] += (self.world - 1) * t.nbytes
        return outs

    def broadcast(self, t: torch.Tensor, src: int, kind: str) -> None:
        dist.broadcast(t, group=self.group, group_src=src)
        if self.rank == src:
            self.bytes.sent[kind] += (self.world - 1) * t.nbytes
        else:
            self.bytes.recv[kind] += t.nbytes

    def all_to_all(self, parts: list[torch.Tensor], recv_numel: Optional[list[int]],
                   kind: str) -> list[torch.Tensor]:
        """Rank r's ``parts[j]`` (flat, one dtype) arrives as rank j's result [r]. Without
        ``recv_numel`` the sizes are exchanged first (counted as "index")."""
        send = [p.numel() for p in parts]
        if recv_numel is None:
            sizes = torch.tensor(send, dtype=torch.int64, device=self.device)
            got = torch.empty_like(sizes)
            dist.all_to_all_single(got, sizes, group=self.group)
            self.bytes.recv["index"] += (self.world - 1) * 8
            self.bytes.sent["index"] += (self.world - 1) * 8
            recv_numel = got.tolist()
        dtype = parts[0].dtype
        out = torch.empty(sum(recv_numel), dtype=dtype, device=self.device)
        dist.all_to_all_single(out, torch.cat(parts), output_split_sizes=list(recv_numel),
                               input_split_sizes=send, group=self.group)
        item = out.element_size()
        self.bytes.recv[kind] += item * sum(n for r, n in enumerate(recv_numel) if r != self.rank)
        self.bytes.sent[kind] += item * sum(n for r, n in enumerate(send) if r != self.rank)
        return list(out.split(list(recv_numel)))


# ------------------------------------------------------------------------------------ result
@dataclass(eq=False)
class CPResult:
    """``out`` [B, Hq, n_local, Dv] (the rank's queries, local order); ``counts`` /
    ``indices``: the block lists of each local chunk ([B, Hkv, blocks of the chunk] /
    [..., width], global key-block ids, as ``sparse.select`` returns them); ``bytes``."""

    out: torch.Tensor
    counts: tuple
    indices: tuple
    bytes: CommBytes


def _as_policy(policy: Union[str, Policy]) -> Policy:
    pol = PRESETS[policy]() if isinstance(policy, str) and policy in PRESETS else policy
    if not isinstance(pol, SUPPORTED):
        names = ", ".join(c.name for c in SUPPORTED)
        raise ValueError(f"context_parallel_attention: policy {policy!r} is not supported; "
                         f"expected one of {names} (estimators that read pooled keys)")
    return pol


def _check_inputs(q, k, v, pol: Policy, lay: Sharding, world: int, rank: int) -> None:
    fn = "context_parallel_attention"
    if lay.world != world:
        raise ValueError(f"{fn}: the sharding is for world={lay.world} ranks, the process group "
                         f"has {world}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be [B, H, n_local, D], got shape {tuple(t.shape)}")
        if t.shape[2] != lay.local_len(rank):
            raise ValueError(f"{fn}: {name} holds {t.shape[2]} positions on rank {rank}; its "
                             f"shard of n={lay.n} over {world} ranks has {lay.local_len(rank)} "
                             f"(Sharding.shard makes it)")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{fn}: shapes do not agree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{fn}: {q.shape[1]} query heads are not a multiple of {k.shape[1]} "
                         f"key heads")
    if k.dtype != v.dtype:
        raise ValueError(f"{fn}: k ({k.dtype}) and v ({v.dtype}) must share a dtype")
    blk = getattr(pol, "block", lay.block)
    if not isinstance(pol, Dense) and blk != lay.block:
        raise ValueError(f"{fn}: policy {pol.short()} has block={blk}, the sharding's block is "
                         f"{lay.block}; expected equal (a query block must live on one rank)")


# ------------------------------------------------------------------------------------ steps
def _gather_blocks(comm: _Comm, lay: Sharding, local: torch.Tensor) -> torch.Tensor:
    """Per-block rows [B, H, local blocks, *] of every rank -> [B, H, NB, *] in global order."""
    width = max(lay.local_blocks(r) for r in range(lay.world))
    pad = width - local.shape[2]
    if pad:
        local = torch.cat([local, local.new_zeros(*local.shape[:2], pad, *local.shape[3:])], 2)
    parts = comm.all_gather(local, "estimate")
    out = []
    for j in range(2 * lay.world):                   # chunks in sequence order
        r = j if j < lay.world else 2 * lay.world - 1 - j
        b0, b1 = lay.chunk_blocks(j)
        lo = 0 if j < lay.world else lay.chunk_blocks(r)[1] - lay.chunk_blocks(r)[0]
        out.append(parts[r][:, :, lo:lo + b1 - b0])
    return torch.cat(out, dim=2)


def _local_rows(lay: Sharding, rank: int):
    """Per local chunk: (token start, token end, offset of its first row in the local tensor)."""
    lo, out = 0, []
    for s, e in lay.chunks(rank):
        out.append((s, e, lo))
        lo += e - s
    return out


def _allowed_rows(s: int, e: int, n: int, causal: bool, block: int, shape, device):
    """bool [B, Hkv, rows, NB]: the key blocks each query block of tokens [s, e) may see.
    ``structural_blocks`` of the chunk seen as the bottom rows of an (e - s) x e attention,
    which puts its rows at their global positions."""
    nb = _cdiv(n, block)
    ok = torch.zeros(_cdiv(e - s, block), nb, dtype=torch.bool, device=device)
    if causal:
        pre = structural_blocks(e - s, e, "lower_right", block, device=device)
        ok[:, :pre.shape[1]] = pre
    else:
        ok[:] = True
    return ok.expand(*shape, *ok.shape)


def _last_block_mass(comm: _Comm, lay: Sharding, q, k, scale: float, causal: bool,
                     rows) -> torch.Tensor:
    """threshold's (b): the mean attention of the last ``block`` query rows (averaged over the
    rows and a group's heads) summed per key block, fp32 [B, Hkv, NB]; as
    ``last_rows_attention`` computes it, the softmax assembled from per-rank max / sum."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    n, block = lay.n, lay.block
    L = min(block, n)
    ql = q.new_zeros(B, Hq, L, D)
    for s, e, lo in rows:                                    # the rows this rank holds
        a, b = max(s, n - L), e
        if a < b:
            ql[:, :, a - (n - L):b - (n - L)] = q[:, :, lo + a - s:lo + b - s]
    owners = {r for r in range(lay.world) for s, e in lay.chunks(r) if e > n - L}
    if len(owners) == 1:                                     # one rank holds them: broadcast
        comm.broadcast(ql, owners.pop(), "estimate")
    else:                                                    # one owner per row: the sum is exact
        ql = torch.stack(comm.all_gather(ql, "estimate")).sum(0)
    G = Hq // Hkv
    sc = torch.matmul(ql.reshape(B, Hkv, G * L, D), k.transpose(-1, -2)).to(torch.float32)
    sc = sc.reshape(B, Hq, L, k.shape[2]) * scale
    kpos = torch.cat([torch.arange(s, e, device=q.device) for s, e, _ in rows])
    if causal:
        pos = torch.arange(n - L, n, device=q.device)
        sc = sc.masked_fill(kpos[None, :] > pos[:, None], float("-inf"))
    m = sc.amax(-1)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    part = torch.stack([m, (sc - m_safe[..., None]).exp().sum(-1)], -1)    # [B, Hq, L, 2]
    parts = torch.stack(comm.all_gather(part, "estimate"))
    lse = torch.logsumexp(parts[..., 0] + parts[..., 1].log(), dim=0)     # [B, Hq, L]
    probs = (sc - lse[..., None]).exp().nan_to_num(0.0)
    col = _group_mean(probs.mean(dim=2), Hkv)                             # [B, Hkv, n_local]
    sums = []
    for s, e, lo in rows:
        c = col[:, :, lo:lo + e - s]
        pad = _cdiv(e - s, block) * block - (e - s)
        c = torch.nn.functional.pad(c, (0, pad))
        sums.append(c.reshape(B, Hkv, -1, block).sum(-1))
    return _gather_blocks(comm, lay, torch.cat(sums, dim=2))


def _select(pol: Policy, comm: _Comm, lay: Sharding, q, k, scale: float, causal: bool, rows):
    """Block lists (counts, indices) of each local chunk, global key-block ids."""
    B, Hq = q.shape[:2]
    Hkv = k.shape[1]
    n, block = lay.n, lay.block
    rule = "lower_right" if causal else None
    if isinstance(pol, Dense):
        return [blocks_from_mask(_allowed_rows(s, e, n, causal, block, (B, Hkv), q.device))
                for s, e, _ in rows]
    # pooled keys: one fp32 row per key block and KV head, from every rank
    pk = _gather_blocks(comm, lay, torch.cat(
        [_pool(k[:, :, lo:lo + e - s], block) for s, e, lo in rows], dim=2))
    col = (_last_block_mass(comm, lay, q, k, scale, causal, rows)
           if isinstance(pol, Threshold) else None)
    out = []
    for s, e, lo in rows:
        pq = _pool(q[:, :, lo:lo + e - s], block)          # [B, Hq, rows, D] fp32
        allowed = _allowed_rows(s, e, n, causal, block, (B, Hkv), q.device)
        # the single-device estimators on the pooled rows (pooling a pooled row with block=1
        # is the identity); the chunk's rows sit at their global positions in an (e-s) x e view
        if isinstance(pol, BlockTopK):
            sc = (pooled_block_logits(pq, pk, scale, 1, allowed) if Hq == Hkv
                  else pooled_block_scores(pq, pk, scale, 1, allowed))
            out.append(select_topk_blocks(sc, e - s, e, rule, block, topk=pol.topk,
                                          sink_blocks=pol.sink_blocks,
                                          local_blocks=pol.local_blocks))
        else:
            p_pool = pooled_block_scores(pq, pk, scale, 1, allowed)
            est = threshold_estimate(None, None, scale, (), [], rule, 1, allowed, col=col,
                                     p_pool=p_pool)
            out.append(select_threshold(est, e - s, e, rule, block, gamma=pol.gamma,
                                        min_budget=pol.min_budget,
                                        max_budget=pol.max_budget or None,
                                        sink_blocks=pol.sink_blocks,
                                        local_blocks=pol.local_blocks))
    return out


def _fetch(comm: _Comm, lay: Sharding, k, v, sel, causal: bool, rows):
    """K/V buffers [B, Hkv, prefix, D] / [..., Dv] holding the rank's own tokens and every
    selected key block of another rank, at their global positions (zeros elsewhere)."""
    B, Hkv, _, D = k.shape
    Dv = v.shape[-1]
    n, block, nb = lay.n, lay.block, lay.num_blocks
    dev = k.device
    owner, offset = lay.owners(dev)
    needed = torch.zeros(B, Hkv, nb, dtype=torch.bool, device=dev)
    for counts, idx in sel:
        needed |= mask_from_blocks(counts, idx, nb).any(dim=2)
    remote = needed & (owner != comm.rank)
    ids = torch.nonzero(remote.flatten()).flatten()        # (b * Hkv + h) * NB + kb, ascending
    dest = owner[ids % nb]
    order = torch.argsort(dest, stable=True)
    ids, dest = ids[order], dest[order]
    per = torch.bincount(dest, minlength=comm.world).tolist()
    asked = comm.all_to_all(list(ids.split(per)), None, "index")
    # serve: the blocks others asked of this rank, K and V of a block side by side
    kv = torch.cat([k, v], dim=-1)                                    # [B, Hkv, n_local, D+Dv]
    kv = torch.nn.functional.pad(kv, (0, 0, 0, block))               # reads past the short block
    width = block * (D + Dv)
    parts = []
    for a in asked:
        b, h, kb = a // (Hkv * nb), (a // nb) % Hkv, a % nb
        pos = offset[kb][:, None] + torch.arange(block, device=dev)[None, :]
        parts.append(kv[b[:, None], h[:, None], pos].reshape(-1))
    got = comm.all_to_all(parts, [c * width for c in per], "kv")
    # assemble: own tokens, then the fetched blocks
    end = max(e for _, e, _ in rows) if causal else n
    nbuf = _cdiv(end, block)
    buf = kv.new_zeros(B, Hkv, nbuf * block, D + Dv)
    for s, e, lo in rows:
        buf[:, :, s:e] = kv[:, :, lo:lo + e - s]
    if ids.numel():
        blocks = torch.cat(got).view(-1, block, D + Dv)
        b, h, kb = ids // (Hkv * nb), (ids // nb) % Hkv, ids % nb
        buf.view(B, Hkv, nbuf, block, D + Dv)[b, h, kb] = blocks
    return buf[..., :D], buf[..., D:]


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               policy: Union[str, Policy], sharding: Sharding, *,
                               scale: Optional[float] = None, causal: bool = True,
                               group=None) -> CPResult:
    """Attention of this rank's queries under ``policy`` (dense, block_topk or threshold) with
    the sequence sharded by ``sharding`` over ``group`` (default: the world).

    q [B, Hq, n_local, D], k [B, Hkv, n_local, D], v [B, Hkv, n_local, Dv]: the rank's shards
    (``sharding.shard(t, rank)``). Returns a ``CPResult``; ``sharding.unshard`` of every rank's
    ``out`` is the single-device output [B, Hq, N, Dv]. Run it on every rank of the group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("context_parallel_attention needs an initialised torch.distributed "
                           "process group (dist.init_process_group)")
    pol = _as_policy(policy)
    comm = _Comm(group, q.device)
    _check_inputs(q, k, v, pol, sharding, comm.world, comm.rank)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    rows = _local_rows(sharding, comm.rank)
    sel = _select(pol, comm, sharding, q, k, scale, causal, rows)
    kb, vb = _fetch(comm, sharding, k, v, sel, causal, rows)
    outs = []
    attend = _attend_kernel if kernels_enabled(q) else block_sparse_attention_ref
    for (s, e, lo), (counts, idx) in zip(rows, sel):
        kv_end = e if causal else sharding.n
        out, _ = attend(q[:, :, lo:lo + e - s], kb[:, :, :kv_end], vb[:, :, :kv_end],
                        counts.contiguous(), idx.contiguous(), block=sharding.block,
                        scale=scale, causal=causal)
        outs.append(out)
    return CPResult(torch.cat(outs, dim=2), tuple(c for c, _ in sel), tuple(i for _, i in sel),
                    comm.bytes)


def _attend_kernel(q, k, v, counts, idx, **kw):
    from runtime.kernels.block_sparse import block_sparse_attention
    return block_sparse_attention(q, k.contiguous(), v.contiguous(), counts, idx, **kw)


def single_device(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  policy: Union[str, Policy], *, block: int, scale: Optional[float] = None,
                  causal: bool = True):
    """What one device computes for the same call, to check ``context_parallel_attention``
    against: ``(counts, indices, out)`` with the policy's registered estimator
    (``runtime.estimators``, as ``sparse.score`` / ``sparse.select`` run it) and the
    block-sparse reference; ``dense``: no lists (None, None) and SDPA. Full tensors
    [B, H, N, D]."""
    from runtime import estimators
    from runtime.spec import SiteSpec
    pol = _as_policy(policy)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if isinstance(pol, Dense):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return None, None, out
    spec = SiteSpec(site="context_parallel.single_device", owner="context_parallel",
                    policy=pol, scale=scale, causal="lower_right" if causal else None,
                    gqa_group=q.shape[1] // k.shape[1], block=block)
    est = estimators.get(pol)
    counts, idx = est.select(est.score(q, k, [], spec), q, k, spec)
    out, _ = block_sparse_attention_ref(q, k, v, counts, idx, block=block, scale=scale,
                                        causal=causal)
    return counts, idx, out
