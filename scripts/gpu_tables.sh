#!/usr/bin/env bash
# On a CUDA GPU: tune the W4A8 kernels for it, check them, then measure them.
#   bash scripts/gpu_tables.sh OUT [STAGE...]      stages, in this order by default: tune suite gemm e2e
# tune   the quick tune of every M bucket of the 13 shapes of experiments/gemm_speed.py (`--tune-shipped`: the configs
#        shipped for this chip, plus every candidate of the paths newer than some shipped files, the fused Gluon
#        kernel's split-K), into this GPU's file under qqq/kernels_triton/configs/ (saved after each shape; a copy
#        goes to OUT); FULL_TUNE=1 times every candidate instead (about 80 a problem)
# suite  the GPU test suite on the configs as they are now (with -n 8 where pytest-xdist is installed; its CLI test
#        reads exllamav2's text: scripts/gpu_wheels.sh)
# gemm   experiments/gemm_speed.py at M 1 to 4096 on the 13 shapes -> OUT/gemm
# e2e    experiments/e2e_speed.py, Llama-2-7B (MODELS, space-separated, e.g. "llama-2-13b"): fp16, w8a8, w4a8_rtn,
#        w4a8_rtn_g128 at batch 1 / 16 / 64, KV 16 and 8, step profiles at batch 1 and 64 -> OUT/e2e
# SHAPES (comma-separated names of gemm_speed.py, default all) and TUNE_MS (M buckets, default all) narrow tune and
# gemm, e.g. to split a tune over several runs; TUNE_PATHS (launch paths, e.g. fused_ws,fused_ws_split_k) replaces the
# quick tune's default newer paths. Each stage logs to OUT/<stage>.log. A failing stage stops the script,
# so no table is measured after a suite that failed in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash scripts/gpu_tables.sh OUT [tune] [suite] [gemm] [e2e]" >&2; exit 2; }
OUT=$(realpath -m "$1"); shift
[ $# -ge 1 ] || set -- tune suite gemm e2e
for stage in "$@"; do
    case "$stage" in
        tune|suite|gemm|e2e) ;;
        *) echo "gpu_tables.sh: unknown stage $stage (tune, suite, gemm, e2e)" >&2; exit 2 ;;
    esac
done
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_tables.sh: no CUDA GPU here')"
mkdir -p "$OUT"

logged() {  # logged STAGE COMMAND...: run it into OUT/STAGE.log; on failure show the log's end and stop
    local log="$OUT/$1.log"; shift
    "$@" > "$log" 2>&1 || { tail -5 "$log"; echo "gpu_tables.sh: failed, see $log" >&2; exit 1; }
    tail -2 "$log"
}

for stage in "$@"; do
    echo "== $stage $(date -u '+%F %T UTC')"
    case "$stage" in
        tune)
            quick=$([ "${FULL_TUNE:-0}" = 1 ] || echo --tune-shipped)
            logged tune python3 experiments/gemm_speed.py --tune $quick --shapes "${SHAPES:-all}" \
                ${TUNE_MS:+--tune-ms "$TUNE_MS"} ${TUNE_PATHS:+--tune-paths "$TUNE_PATHS"} --no-bench --out "$OUT/tune"
            device=$(python3 -c "from qqq.kernels_triton.config_table import device_name; print(device_name())")
            cp "qqq/kernels_triton/configs/$device.json" "$OUT/" ;;
        suite)
            workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || true)
            logged suite python3 -m pytest -q $workers -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu.py \
                tests/test_gpu_fast.py tests/test_gpu_model.py tests/test_gpu_gluon_fused.py ;;
        gemm)
            logged gemm python3 experiments/gemm_speed.py --shapes "${SHAPES:-all}" --ms 1,16,64,256,1024,4096 \
                --out "$OUT/gemm" ;;
        e2e)
            logged e2e python3 experiments/e2e_speed.py --models ${MODELS:-llama-2-7b} --methods fp16 w8a8 w4a8_rtn \
                w4a8_rtn_g128 --batches 1 16 64 --repeats 2 --kv-bits 16 8 --profile-batches 1 64 --out "$OUT/e2e" ;;
    esac
done
