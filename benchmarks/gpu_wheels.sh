#!/usr/bin/env bash
# Wheels for a GPU machine that has torch but not diffusers or this project (CPython 3.12 there):
# the project itself (no deps) and diffusers 0.42.1 with the one dependency such an image may
# lack. Usage: benchmarks/gpu_wheels.sh [DEST (default .whl)] ; then on the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   python3 -m benchmarks.gpu_record --out gpu-record.json
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python_version=${PYTHON_VERSION:-3.12}
rm -rf "$dest"
mkdir -p "$dest"
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$dest" .
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation py -d "$dest" diffusers==0.42.1 importlib-metadata
ls -l "$dest"
