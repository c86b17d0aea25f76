#!/usr/bin/env bash
# Create .venv and install moestream with its test dependencies, all from the project's own files.
# torch is pinned to the CPU build (a bare "torch" would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
