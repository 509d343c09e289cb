#!/usr/bin/env bash
# Installs what `make package` and `make package-check` need on Debian, as root:
# the tools (debootstrap, qemu-user, nsis, desktop-file-utils, iproute2, binutils)
# and the desktop libraries the bundled Qt plugins link to, which the .deb's
# Depends are computed from. Elsewhere it only says what is missing.
set -euo pipefail
need=()
for tool in debootstrap:debootstrap qemu-x86_64:qemu-user makensis:nsis \
  desktop-file-validate:desktop-file-utils ip:iproute2 readelf:binutils objdump:binutils \
  unshare:util-linux; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
have_lib() { ldconfig -p 2>/dev/null | grep -q "$1"; }
for lib in libwayland-client.so.0:libwayland-client0 libwayland-cursor.so.0:libwayland-cursor0 \
  libwayland-egl.so.1:libwayland-egl1 libxkbcommon-x11.so.0:libxkbcommon-x11-0 \
  libxcb-cursor.so.0:libxcb-cursor0 libxcb-icccm.so.4:libxcb-icccm4 libxcb-image.so.0:libxcb-image0 \
  libxcb-keysyms.so.1:libxcb-keysyms1 libxcb-render-util.so.0:libxcb-render-util0 \
  libxcb-xkb.so.1:libxcb-xkb1 libxcb-shape.so.0:libxcb-shape0 libxcb-randr.so.0:libxcb-randr0 \
  libxcb-xinerama.so.0:libxcb-xinerama0 libEGL.so.1:libegl1 libGL.so.1:libgl1 \
  libfontconfig.so.1:libfontconfig1 libdbus-1.so.3:libdbus-1-3 libglib-2.0.so.0:libglib2.0-0; do
  have_lib "${lib%%:*}" || need+=("${lib#*:}")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "packaging needs these Debian packages: ${need[*]}" >&2
  exit 1
fi
echo "Installing for packaging: ${need[*]}" >&2
for attempt in 1 2 3; do
  if apt-get update -qq >/dev/null &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; then
    exit 0
  fi
  echo "apt-get failed (attempt $attempt of 3); retrying" >&2
  sleep $((attempt * 15))
done
exit 1
