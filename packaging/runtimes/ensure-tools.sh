#!/usr/bin/env bash
# Installs what a runtime recipe needs when it is missing, as root on Debian/Ubuntu:
# cmake and a compiler for every backend; glslc, the Vulkan and SPIR-V headers and Mesa's
# lavapipe (a software Vulkan driver, for the self-test) for vulkan. Elsewhere it
# only says what is missing. nvcc (cuda) comes from NVIDIA's toolkit, never from here.
# Usage: ensure-tools.sh cpu|vulkan|cuda
set -euo pipefail
backend=${1:?usage: ensure-tools.sh cpu|vulkan|cuda}
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v c++ >/dev/null || need+=(g++)
command -v patch >/dev/null || need+=(patch)
if [ "$backend" = vulkan ]; then
  command -v glslc >/dev/null || need+=(glslc)
  [ -e /usr/include/vulkan/vulkan.h ] || need+=(libvulkan-dev)
  [ -e /usr/include/spirv/unified1/spirv.hpp ] || need+=(spirv-headers)
  ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers)
fi
if [ "$backend" = cuda ] && ! command -v nvcc >/dev/null; then
  echo "runtime-cuda needs nvcc: install the CUDA toolkit and put its bin/ on PATH" >&2
  exit 1
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Installing build tools for the $backend runtime: ${need[*]}" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "The $backend runtime needs: ${need[*]} (install them with your package manager)" >&2
  exit 1
fi
