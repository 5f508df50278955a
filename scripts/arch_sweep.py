"""Every causal-LM architecture of the installed transformers, as a new user would try it: a
tiny random config, ``planner.compile(model, policy="dense")``, the logits compared with the
model's own. Writes one JSON line per architecture and a Markdown summary.

A tiny config is the class's defaults shrunk (hidden 64, 2 layers, 4 heads, small vocab and
experts); where that does not build, fewer fields are shrunk, then the composite config's text
part is tried. An architecture whose tiny config still does not build or run is listed as
"not built" (a gap of this script, not a verdict on the planner).

    python scripts/arch_sweep.py --out benchmarks/results/architectures_cpu
    python scripts/arch_sweep.py --only llama,qwen3_next --out /tmp/sweep
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import select
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=256, n_embd=64, n_layer=2, n_head=4, d_model=64, ffn_dim=64,
             n_positions=256, num_layers=2, num_heads=4, moe_intermediate_size=32,
             num_experts=4, n_routed_experts=4, num_local_experts=4, num_experts_per_tok=2,
             shared_expert_intermediate_size=32, kv_lora_rank=16, q_lora_rank=32,
             qk_nope_head_dim=12, qk_rope_head_dim=4, v_head_dim=8, sliding_window=8,
             linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
             linear_value_head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# fields a class needs set beyond the shrink (no usable default)
EXTRA = {"qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16,
                                indexer_budget=8, indexer_compress_ratio=4, hc_lowrank=8,
                                ngram_vocab_size_base=1000, split_ngram_parts=2,
                                heads_per_ngram=2, ple_embed_dim=64)}
EXTRA["qwen4_exp"] = EXTRA["qwen4_exp_text"]
# fields left at the class default, tried in turn where the full shrink does not build
DROPS = (set(), {"head_dim"}, {"head_dim", "num_key_value_heads", "intermediate_size"},
         set(SMALL) - {"num_hidden_layers", "num_layers", "n_layer", "vocab_size"})
TOL = 1e-5


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def _shrink(cfg, drop: set, extra: dict = {}) -> None:   # noqa: B006 (read only)
    for k, v in {**SMALL, **extra}.items():
        if k in drop:
            continue
        try:
            if hasattr(cfg, k):
                setattr(cfg, k, v)
        except Exception:               # read-only or per-layer fields keep their default
            pass
    if "head_dim" in drop and getattr(cfg, "qk_rope_head_dim", None):
        try:
            cfg.head_dim = cfg.qk_rope_head_dim
        except Exception:
            pass
    try:
        lt = getattr(cfg, "layer_types", None)
    except Exception:
        lt = None
    if isinstance(lt, list) and lt:
        kinds = list(dict.fromkeys(lt))
        try:
            cfg.layer_types = (lt * 2)[:2] if len(kinds) == 1 else kinds
            cfg.num_hidden_layers = len(cfg.layer_types)
        except Exception:
            pass


def build(arch: str, cfg_cls, ids, extra: dict):
    """(model, reference logits, how) of the first tiny config that builds and runs."""
    import transformers as T
    last = None
    for drop in DROPS:
        for text in (False, True):
            try:
                cfg = cfg_cls()
                sub = getattr(cfg, "text_config", None)
                if text and sub is None:
                    continue
                _shrink(sub if text else cfg, drop, extra)
                if sub is not None and not text:
                    _shrink(sub, drop, extra)
                for impl in ("sdpa", "eager", None):
                    try:
                        kw = {} if impl is None else {"attn_implementation": impl}
                        torch.manual_seed(0)
                        m = getattr(T, arch)._from_config(copy.deepcopy(sub if text else cfg),
                                                          **kw).eval()
                    except Exception as e:
                        last = e
                        continue
                    with torch.no_grad():
                        ref = m(input_ids=ids).logits
                    return m, ref, {"impl": impl or "default", "kept_default": sorted(drop)[:4],
                                    "text_config": text}
            except Exception as e:
                last = e
    raise last if last is not None else RuntimeError("no config")


def one(model_type: str, arch: str) -> dict:
    import planner
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    import transformers as T
    rec = {"model_type": model_type, "arch": arch}
    t0 = time.time()
    ids = torch.randint(3, 128, (1, 23), generator=torch.Generator().manual_seed(0))
    try:
        m, ref, how = build(arch, getattr(T, CONFIG_MAPPING_NAMES[model_type]), ids,
                            EXTRA.get(model_type, {}))
        rec.update(how)
    except BaseException as e:               # noqa: BLE001 (a timeout included)
        rec.update(stage="build", error=f"{type(e).__name__}: {str(e)[:200]}")
        return rec
    try:
        cm = planner.compile(m, policy="dense")
        with torch.no_grad():
            out = cm(input_ids=ids).logits
        rec["err"] = float((out.float() - ref.float()).abs().max()
                           / ref.float().abs().max().clamp_min(1e-9))
        rep = planner.inspect(cm)
        rec["sites"] = [{"site": s.name, "status": s.status, "pattern": s.pattern,
                         "rules": s.rules, "reason": s.reason} for s in rep.sites]
        rec["unmatched"] = [f"{u.site}: {u.reason}"[:200] for u in rep.unmatched()]
    except BaseException as e:               # noqa: BLE001
        rec.update(stage="compile", error=f"{type(e).__name__}: {str(e)[:300]}")
    rec["seconds"] = round(time.time() - t0, 1)
    return rec


def verdict(r: dict) -> str:
    if r.get("stage") == "build":
        return "not built"
    if r.get("stage") == "compile":
        return "FAILS"
    if r["err"] > TOL:
        return "WRONG"
    if not r["sites"]:
        return "exact, no site" + (" (softmax left alone, reason shown)" if r["unmatched"] else "")
    if all(s["status"] == "rewritten" for s in r["sites"]):
        return "exact, rewritten"
    return "exact, dense with reason"


def summary(rows: list, meta: dict) -> str:
    from collections import Counter
    c = Counter(verdict(r) for r in rows)
    lines = ["# Every causal-LM architecture of transformers under `policy=\"dense\"` (CPU)", "",
             f"transformers {meta['transformers']}, torch {meta['torch']}, triton "
             f"{meta.get('triton', '?')}, {meta['machine']}; "
             f"command: `{meta['command']}`.", "",
             "Tiny random configs (hidden 64, 2 layers), 23 random tokens, fp32; `err` = max "
             f"|logit difference| / max |logit| (exact: <= {TOL}).", "",
             "| verdict | architectures |", "|---|---|"]
    for k in ("exact, rewritten", "exact, dense with reason",
              "exact, no site (softmax left alone, reason shown)", "exact, no site", "WRONG",
              "FAILS", "not built"):
        lines.append(f"| {k} | {c.get(k, 0)} |")
    lines += ["", "| model type | class | verdict | err | sites | note |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        v = verdict(r)
        sites = r.get("sites") or []
        note = r.get("error", "") if v in ("not built", "FAILS") else "; ".join(
            dict.fromkeys(s["reason"][:90] for s in sites if s["reason"])) or (
            r["unmatched"][0][:120] if not sites and r.get("unmatched") else "")
        pats = ", ".join(dict.fromkeys(s["pattern"] for s in sites))
        err = f"{r['err']:.1e}" if "err" in r else "-"
        lines.append(f"| {r['model_type']} | {r['arch']} | {v} | {err} | {len(sites)}"
                     f"{' (' + pats + ')' if pats else ''} | {note.replace('|', '/')[:160]} |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    """The processor's model name (Linux), else the platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def _isolated(mt: str, arch: str, timeout: int) -> dict:
    """``one(mt, arch)`` in a forked child, killed after ``timeout`` seconds (an alarm cannot
    stop a long native call, such as filling a 500k-row embedding table at its default size)."""
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the child: one architecture, then exit
        os.close(rd)
        signal.alarm(timeout)
        try:
            res = one(mt, arch)
        except BaseException as e:                  # noqa: BLE001 (a timeout included)
            res = {"model_type": mt, "arch": arch, "stage": "build",
                   "error": "timeout" if isinstance(e, _Timeout) else repr(e)[:300]}
        os.write(wr, json.dumps(res).encode())
        os._exit(0)
    os.close(wr)
    data, deadline = b"", time.monotonic() + timeout + 10
    with os.fdopen(rd, "rb") as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([f], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(f.fileno(), 1 << 16)
            if not chunk:
                break
            data += chunk
    os.waitpid(pid, 0)
    try:
        return json.loads(data)
    except ValueError:
        return {"model_type": mt, "arch": arch, "stage": "build",
                "error": "timeout" if data == b"" else "no result from the child"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="path without extension: .jsonl and .md")
    ap.add_argument("--only", default="", help="model types, comma-separated")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per architecture")
    ap.add_argument("--memory-gib", type=float, default=14.0)
    a = ap.parse_args()
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    lim = int(a.memory_gib * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    signal.signal(signal.SIGALRM, _alarm)
    only = set(x for x in a.only.split(",") if x)
    import triton
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "triton": triton.__version__,
            "machine": f"{_cpu_name()}, {platform.machine()}, {torch.get_num_threads()} threads",
            "command": "python scripts/arch_sweep.py " + " ".join(sys.argv[1:])}
    rows = []
    with open(a.out + ".jsonl", "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for mt, arch in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
            if only and mt not in only:
                continue
            arch = arch[0] if isinstance(arch, (tuple, list)) else arch
            r = _isolated(mt, arch, a.timeout)
            rows.append(r)
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"{mt:28s} {verdict(r)}", flush=True)
    with open(a.out + ".md", "w") as f:
        f.write(summary(rows, meta))
    bad = [r["model_type"] for r in rows if verdict(r) in ("WRONG", "FAILS")]
    print(f"{len(rows)} architectures; wrong or failing: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
