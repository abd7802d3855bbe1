#!/usr/bin/env bash
# Downloads into .whl/ the wheels the GPU test suite needs beyond torch / triton / transformers, for a GPU machine
# without internet. Copy .whl there, then:
#   python3 -m pip install --no-index --find-links .whl pytest pytest-xdist
#   python3 -m pip install --no-index --find-links .whl --no-deps exllamav2==0.3.2
# exllamav2 goes in without its dependencies (their wheels are not here): only its calibration text is read.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY_VERSION:-3.12}
python3 -m pip download -q -d .whl --only-binary=:all: --python-version "$PY" --platform manylinux2014_x86_64 \
    pytest pytest-xdist execnet pluggy iniconfig packaging tqdm tabulate
python3 -m pip download -q -d .whl --no-deps exllamav2==0.3.2
ls .whl
