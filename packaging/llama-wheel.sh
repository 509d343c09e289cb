#!/usr/bin/env bash
# Builds the redistributable llama-cpp-python wheel the bundle carries: prints the
# wheel's path. The .venv's build is for this machine's CPU and would crash with
# an illegal instruction on older CPUs. Like the .venv's, it is the pinned sdist
# plus packaging/llama/patches (the batch-invariant kernels), built by
# packaging/llama/build_wheel.py into a cache keyed by sdist, patches and CMake
# arguments.
# Usage: llama-wheel.sh CACHE_DIR "CMAKE_ARGS"
set -euo pipefail
cache=$1
args=$2
here=$(cd "$(dirname "$0")" && pwd)
sdist=()
# LLAMA_SDIST: a local copy of the sdist (checked against the pinned sha256), else PyPI's.
if [ -n "${LLAMA_SDIST:-}" ] && [ -f "$LLAMA_SDIST" ]; then sdist=(--sdist "$LLAMA_SDIST"); fi
python3 "$here/llama/build_wheel.py" --cmake-args "$args" --cache-dir "$cache" "${sdist[@]}" | tail -n1
