#!/usr/bin/env bash
# Builds the redistributable llama-cpp-python wheel the bundle carries, once per
# set of CMake arguments: prints the wheel's path. The .venv's build is
# -march=native and would crash with an illegal instruction on older CPUs.
# Usage: llama-wheel.sh CACHE_DIR "CMAKE_ARGS"
set -euo pipefail
cache=$1
args=$2
version=0.3.36
key=$(printf '%s\n%s\n' "$version" "$args" | sha256sum | cut -c1-16)
out="$cache/$key"
wheel=$(ls "$out"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  mkdir -p "$out.tmp"
  # LLAMA_SDIST: a local copy of the sdist, else pip fetches it from PyPI.
  src="llama-cpp-python==$version"
  if [ -n "${LLAMA_SDIST:-}" ] && [ -f "$LLAMA_SDIST" ]; then src=$LLAMA_SDIST; fi
  echo "Building llama-cpp-python $version with CMAKE_ARGS='$args' (about 7 minutes on 2 cores)" >&2
  CMAKE_ARGS="$args" python3 -m pip wheel -q --no-cache-dir --no-binary :all: --no-deps \
    -w "$out.tmp" "$src" >&2
  printf '%s\n' "$args" >"$out.tmp/cmake-args.txt"
  rm -rf "$out" && mv "$out.tmp" "$out"
  wheel=$(ls "$out"/llama_cpp_python-"$version"-*.whl | head -1)
fi
printf '%s\n' "$wheel"
