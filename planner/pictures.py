"""Pictures of a recorded call (``planner.compile(..., record="recall")``) and a page that holds
them. matplotlib (the ``plot`` extra) is imported when a picture is drawn.

Three pictures, each from ``planner.inspect(m)`` after a recorded call:

* ``block_map``: one site, one panel per head: query blocks x key blocks, each block coloured
  by the dense attention mass its keys get from the sampled rows of the query block (log
  scale), blue where the policy kept it, red where it dropped it. Red blocks are what was lost.
* ``layer_head_grid``: density and recall for every (layer, head), one pair of panels per
  report (policies side by side).
* ``needle_map``: for the last query row (the question, when the prompt ends with one), which
  keys each layer kept (share of heads) along the context, with given token spans (needles)
  marked, and the share of the needle each layer kept.

``write_page`` writes an HTML page (tables, the PNGs beside it; no server, no scripts).
"""
from __future__ import annotations

import html
import math
import os
import re
from typing import Optional, Sequence

DROP_BELOW = 0.5          # a block counts as kept when at least this share of its pairs is


def have_matplotlib() -> bool:
    """Whether the pictures can be drawn here (matplotlib, the ``plot`` extra, is installed)."""
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the pictures need matplotlib: pip install 'sparse-planner[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _layer_key(name: str) -> tuple:
    """Sort key: the integers in a site name, in order (model.layers.10 after model.layers.9)."""
    return tuple(int(x) for x in re.findall(r"\d+", name)), name


def _short_site(name: str) -> str:
    m = re.search(r"(\d+)", name)
    return f"L{m.group(1)}" if m else name


def recorded_sites(report) -> list:
    """The report's sites with a recording, in layer order."""
    return sorted((s for s in report.sites if s.name in report.recordings),
                  key=lambda s: _layer_key(s.name))


def _need_recordings(report) -> None:
    if not getattr(report, "recordings", None):
        raise ValueError("this report has no recorded call: compile with "
                         "planner.compile(..., record='recall') (or call the model inside "
                         "planner.recording(m)) and call it before planner.inspect")


def block_map(report, site: Optional[str] = None, heads: Optional[Sequence[int]] = None,
              path: Optional[str] = None, title: str = ""):
    """Per head of ``site`` (default: the recorded site with the lowest recall): the dense
    block mass over (query block, key block), blue = kept, red = dropped. Returns the Figure."""
    import numpy as np
    plt = _plt()
    _need_recordings(report)
    sites = recorded_sites(report)
    s = (min(sites, key=lambda x: x.recall) if site is None else report.site(site))
    if s.name not in report.recordings:
        raise KeyError(f"site {s.name!r} has no recording; recorded: {[x.name for x in sites]}")
    rec = report.recordings[s.name]
    hq = rec.shape[1]
    heads = list(range(hq)) if heads is None else list(heads)
    ncol = min(len(heads), 3 if len(heads) in (5, 6, 9) else 4)
    nrow = math.ceil(len(heads) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.1 * ncol + 1.2, 3.0 * nrow + 0.6),
                             squeeze=False)
    mass = np.log10(np.clip(rec.block_mass.numpy(), 1e-5, None))
    kept = rec.block_kept.numpy()
    nan = np.isnan(kept) | np.isnan(rec.block_mass.numpy())
    per_head = rec.recall_per_head
    dens = s.density_per_head or [s.density] * hq
    im_k = im_d = None
    for ax in axes.ravel():
        ax.axis("off")
    for ax, h in zip(axes.ravel(), heads):
        ax.axis("on")
        keep = (kept[h] >= DROP_BELOW) & ~nan[h]
        drop = (kept[h] < DROP_BELOW) & ~nan[h]
        im_k = ax.imshow(np.ma.masked_where(~keep, mass[h]), cmap="Blues", vmin=-4, vmax=0,
                         interpolation="nearest")
        im_d = ax.imshow(np.ma.masked_where(~drop, mass[h]), cmap="Reds", vmin=-4, vmax=0,
                         interpolation="nearest")
        d = dens[h] if h < len(dens) and dens[h] is not None else float("nan")
        ax.set_title(f"head {h}: recall {per_head[h]:.2f}, density {d:.2f}", fontsize=9)
        ax.set_xlabel(f"key block ({rec.block} tokens)", fontsize=8)
        ax.set_ylabel("query block", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title or f"{s.name} ({s.policy.split('(')[0]}): dense attention mass per "
                 f"block, blue kept, red dropped\nrecall {s.recall:.3f} (worst row "
                 f"{s.recall_worst:.2f}), density {s.density:.3f}", fontsize=10)
    fig.subplots_adjust(right=0.86, top=0.88 if nrow > 1 else 0.76, hspace=0.45, wspace=0.35)
    for i, (im, label) in enumerate(((im_k, "kept: log10 mass"), (im_d, "dropped: log10 mass"))):
        if im is not None:
            cax = fig.add_axes([0.89 + 0.045 * i, 0.15, 0.012, 0.65])
            cb = fig.colorbar(im, cax=cax)
            cb.set_label(label, fontsize=8)
            cb.ax.tick_params(labelsize=7)
    return _save(fig, path)


def _grid_values(report, what: str):
    import numpy as np
    sites = recorded_sites(report)
    hq = max(r.shape[1] for r in report.recordings.values())
    out = np.full((len(sites), hq), np.nan)
    for i, s in enumerate(sites):
        vals = (s.recall_per_head if what == "recall"
                else (s.density_per_head or ([s.density] * hq if s.density is not None else [])))
        for h, v in enumerate(vals or []):
            if v is not None:
                out[i, h] = v
    return sites, out


def layer_head_grid(reports: Sequence[tuple], path: Optional[str] = None, title: str = ""):
    """Density and recall by layer (rows) and head (columns): for each ``(label, report)`` a
    pair of panels, side by side. Returns the Figure."""
    plt = _plt()
    for _, r in reports:
        _need_recordings(r)
    n = len(reports)
    first_sites = recorded_sites(reports[0][1])
    fig, axes = plt.subplots(1, 2 * n, figsize=(2.2 * 2 * n + 1.4,
                                                max(3.4, 0.16 * len(first_sites) + 2.4)),
                             squeeze=False)
    im = None
    for i, (label, rep) in enumerate(reports):
        for j, what in enumerate(("density", "recall")):
            ax = axes[0, 2 * i + j]
            sites, vals = _grid_values(rep, what)
            im = ax.imshow(vals, cmap="viridis", vmin=0, vmax=1, aspect="auto",
                           interpolation="nearest")
            mean = float(sum(getattr(s, what) or 0 for s in sites) / max(1, len(sites)))
            ax.set_title(f"{label}\n{what} (mean {mean:.2f})", fontsize=9)
            ax.set_xlabel("head", fontsize=8)
            ax.set_yticks(range(len(sites)))
            ax.set_yticklabels([_short_site(s.name) for s in sites] if j == 0 and i == 0
                               else [""] * len(sites), fontsize=6)
            ax.tick_params(axis="x", labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(right=0.9, left=0.07, top=0.78 if title else 0.86, wspace=0.12)
    cax = fig.add_axes([0.92, 0.15, 0.012, 0.65])
    fig.colorbar(im, cax=cax).ax.tick_params(labelsize=7)
    return _save(fig, path)


def needle_rows(report, spans: Sequence[tuple]) -> list:
    """Per recorded site (layer order), for the last query row and the tokens of ``spans``:
    dict(site, kept = share of (head, needle token) pairs kept, dense_mass = mean over heads of
    the dense attention on the needle tokens, kept_mass = the share of that mass kept)."""
    _need_recordings(report)
    out = []
    for s in recorded_sites(report):
        rec = report.recordings[s.name]
        n_kv = rec.shape[3]
        idx = [j for a, b in spans for j in range(max(0, a), min(b, n_kv))]
        if not idx:
            raise ValueError(f"spans {list(spans)} hold no key position of {s.name} "
                             f"(Nkv={n_kv})")
        kept = rec.last_kept[:, idx]
        prob = rec.last_prob[:, idx].double()
        dense = prob.sum(-1)                                         # [Hq]
        kept_mass = (prob * kept).sum(-1)
        share = float(kept_mass.sum() / dense.sum()) if float(dense.sum()) > 0 else float("nan")
        out.append({"site": s.name, "kept": float(kept.float().mean()),
                    "dense_mass": float(dense.mean()), "kept_mass": share})
    return out


def needle_map(report, spans: Sequence[tuple], path: Optional[str] = None, title: str = "",
               bins: int = 512):
    """Which keys the last query row kept in each layer (share of heads, key positions in at
    most ``bins`` bins), ``spans`` (token ranges, e.g. the needle) marked in red; beside it the
    share of the needle's (head, token) pairs each layer kept. Returns the Figure."""
    import numpy as np
    plt = _plt()
    rows = needle_rows(report, spans)
    sites = recorded_sites(report)
    n_kv = max(report.recordings[s.name].shape[3] for s in sites)
    width = max(1, math.ceil(n_kv / bins))
    nb = math.ceil(n_kv / width)
    img = np.full((len(sites), nb), np.nan)
    for i, s in enumerate(sites):
        k = report.recordings[s.name].last_kept.float().mean(0).numpy()    # [Nkv] share of heads
        k = np.pad(k, (0, nb * width - k.size), constant_values=np.nan)
        img[i] = np.nanmean(k.reshape(nb, width), axis=1)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, max(3.0, 0.14 * len(sites) + 2.2)),
                                 gridspec_kw={"width_ratios": [5, 1]}, sharey=True)
    im = ax.imshow(img, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest",
                   extent=(0, nb * width, len(sites) - 0.5, -0.5))
    for a, b in spans:
        ax.axvspan(a, max(b, a + width), facecolor="none", edgecolor="red", lw=1.2)
    ax.set_yticks(range(len(sites)))
    ax.set_yticklabels([_short_site(s.name) for s in sites], fontsize=6)
    ax.set_xlabel("key position (token) seen by the last query row; red frame: the needle",
                  fontsize=8)
    ax.tick_params(axis="x", labelsize=7)

    kept = [r["kept"] for r in rows]
    bx.barh(range(len(rows)), kept, color=["tab:blue" if k >= 0.999 else "tab:red" for k in kept])
    bx.set_xlim(0, 1)
    bx.set_xlabel("needle kept\n(heads x tokens)", fontsize=8)
    bx.tick_params(labelsize=7)
    fig.suptitle(title or "what each layer kept for the last query row", fontsize=10)
    fig.subplots_adjust(top=0.86, bottom=0.16, left=0.06, right=0.88, wspace=0.05)
    cax = fig.add_axes([0.9, 0.16, 0.012, 0.7])
    cb = fig.colorbar(im, cax=cax)
    cb.set_label("share of heads keeping the key", fontsize=7)
    cb.ax.tick_params(labelsize=7)
    return _save(fig, path)


def _save(fig, path: Optional[str]):
    if path:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fig.savefig(path, dpi=90)
    return fig


def plot(report, kind: str = "grid", path: Optional[str] = None, **kw):
    """``Report.plot``: ``kind`` one of ``blocks``, ``grid``, ``needle`` (see the module)."""
    if kind == "blocks":
        return block_map(report, path=path, **kw)
    if kind == "grid":
        return layer_head_grid([(kw.pop("label", ""), report)], path=path, **kw)
    if kind == "needle":
        if "spans" not in kw:
            raise ValueError("kind='needle' needs spans=[(start, end), ...]: the token positions "
                             "to follow (e.g. a retrieval prompt's needle)")
        return needle_map(report, path=path, **kw)
    raise ValueError(f"kind must be 'blocks', 'grid' or 'needle', got {kind!r}")


# ---------------------------------------------------------------------------------- the page
_CSS = ("body{font-family:sans-serif;max-width:1150px;margin:1em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:.5em 0}"
        "td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}"
        "th{background:#eee}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #ddd}"
        ".lost{color:#b00;font-weight:bold}p.note{color:#555;font-size:13px}")


def _table(head: Sequence[str], rows: Sequence[Sequence], left: int = 1) -> str:
    th = "".join(f"<th class='l'>{html.escape(h)}</th>" if i < left else
                 f"<th>{html.escape(h)}</th>" for i, h in enumerate(head))
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            cls = " class='l'" if i < left else ""
            text = c if isinstance(c, _Raw) else html.escape(str(c))
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{th}</tr>{''.join(body)}</table>"


class _Raw(str):
    """Table cell text already escaped."""


def _f(x, fmt=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "model"


def write_page(path: str, reports: Sequence[tuple], *, title: str = "What each site kept",
               spans: Optional[Sequence[tuple]] = None, intro: str = "",
               block_sites: int = 2, notes: Sequence[str] = (),
               details: Optional[dict] = None) -> str:
    """Write ``path`` (HTML) and its PNGs beside it for ``[(label, report), ...]``: the grid of
    density and recall (every report side by side), then per report a table of its sites, the
    needle picture when ``spans`` are given, and the block maps of the ``block_sites`` sites
    of lowest recall. ``details``: label -> text shown beside it in the summary (its
    parameters, its answer). Returns ``path``."""
    details = dict(details or {})
    plt = _plt()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem = os.path.splitext(os.path.basename(path))[0]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    parts.append("<p class='note'>density: kept / attended pairs. recall: the share of the "
                 "dense attention mass (exact fp32 softmax of sampled query rows) that falls in "
                 "the kept pairs, mean over rows and heads; worst: the lowest row.</p>")
    labelled = [(label or f"model {i}", r) for i, (label, r) in enumerate(reports)]
    summary = []
    for label, r in labelled:
        ss = recorded_sites(r)
        worst = min(ss, key=lambda s: s.recall_worst) if ss else None
        row = [label, details.get(label, ""), _f(_mean(s.density for s in ss)),
               _f(_mean(s.recall for s in ss)),
               f"{_f(worst.recall_worst, '.2f')} ({_short_site(worst.name)})" if worst else "-"]
        if spans:
            nd = needle_rows(r, spans)
            lost = [_short_site(x["site"]) for x in nd if x["kept"] < 0.999]
            row.append(_f(_mean(x["kept"] for x in nd), ".2f"))
            row.append(", ".join(lost) if lost else "none")
        summary.append(row)
    head = ["policy", "", "density", "recall", "worst row (layer)"]
    if spans:
        head += ["needle kept", "layers that dropped part of the needle"]
    parts.append(_table(head, summary, left=2))
    grid = f"{stem}_grid.png"
    plt.close(layer_head_grid(labelled, os.path.join(folder, grid),
                              title="density and recall by layer (rows) and head (columns)"))
    parts.append(f"<h2>By layer and head</h2><img src='{grid}' alt='density and recall grid'>")
    for label, r in labelled:
        slug = _slug(label)
        parts.append(f"<h2>{html.escape(label)}</h2>")
        if spans:
            img = f"{stem}_{slug}_needle.png"
            plt.close(needle_map(r, spans, os.path.join(folder, img),
                                 title=f"{label}: keys kept for the last query row, by layer"))
            parts.append(f"<img src='{img}' alt='needle map {html.escape(label)}'>")
        ss = recorded_sites(r)
        for s in sorted(ss, key=lambda x: x.recall)[:block_sites]:
            img = f"{stem}_{slug}_{_slug(_short_site(s.name))}_blocks.png"
            plt.close(block_map(r, s.name, path=os.path.join(folder, img)))
            parts.append(f"<h3>{html.escape(s.name)}: lowest recall</h3>"
                         f"<img src='{img}' alt='block map {html.escape(s.name)}'>")
        nd = {x["site"]: x for x in needle_rows(r, spans)} if spans else {}
        rows = []
        for s in ss:
            row = [s.name, _f(s.density), _f(s.recall), _f(s.recall_worst, ".2f")]
            if spans:
                x = nd[s.name]
                k = _f(x["kept"], ".2f")
                row += [_Raw(f"<span class='lost'>{k}</span>") if x["kept"] < 0.999 else k,
                        _f(x["dense_mass"], ".4f"), _f(x["kept_mass"], ".2f")]
            rows.append(row)
        head = ["site", "density", "recall", "worst row"]
        if spans:
            head += ["needle kept", "needle mass (dense)", "needle mass kept"]
        parts.append(_table(head, rows))
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    parts.append("</body></html>")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None
