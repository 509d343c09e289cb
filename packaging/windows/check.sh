#!/usr/bin/env bash
# `make package-windows-check`: compiles the installer script with Debian's makensis
# against a placeholder bundle (the real one is built on Windows: .github/workflows/release.yml).
# Usage: check.sh VERSION
set -euo pipefail
version=$1
root=$(cd "$(dirname "$0")/../.." && pwd)
if ! command -v makensis >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nsis >/dev/null
  else
    echo "package-windows-check needs makensis (apt-get install nsis)" >&2
    exit 1
  fi
fi
work="$root/build/windows-check"
rm -rf "$work" && mkdir -p "$work/bundle/_internal/llama_cpp/lib"
for f in peregrine.exe peregrinew.exe _internal/python311.dll _internal/llama_cpp/lib/llama.dll; do
  printf 'placeholder for %s\n' "$f" >"$work/bundle/$f"
done
out="$work/peregrine-$version-windows-x86_64-setup.exe"
# -WX: a warning (an unused define, a missing file) fails the check.
makensis -V2 -WX -DVERSION="$version" -DBUNDLE="$work/bundle" -DROOT="$root" -DOUTFILE="$out" \
  "$root/packaging/windows/peregrine.nsi"
[ -s "$out" ] || { echo "makensis wrote no installer" >&2; exit 1; }
echo "package-windows-check: $(basename "$out") built ($(du -h "$out" | cut -f1)) from a placeholder bundle"
