#!/usr/bin/env bash
# Installs the system libraries Qt needs (offscreen and on a desktop) when they
# are missing, as root on Debian/Ubuntu. Elsewhere it only says what is missing.
set -euo pipefail
need=()
have_lib() { ldconfig -p 2>/dev/null | grep -q "$1"; }
have_lib libEGL.so.1 || need+=(libegl1)
have_lib libGL.so.1 || need+=(libgl1)
have_lib libxkbcommon.so.0 || need+=(libxkbcommon0)
have_lib libfontconfig.so.1 || need+=(libfontconfig1)
have_lib libdbus-1.so.3 || need+=(libdbus-1-3)
have_lib libglib-2.0.so.0 || need+=(libglib2.0-0)
have_lib libxkbcommon-x11.so.0 || need+=(libxkbcommon-x11-0)
have_lib libxcb-cursor.so.0 || need+=(libxcb-cursor0)
# Qt's xcb platform (a real desktop, or Xvfb for screenshots).
have_lib libxcb-icccm.so.4 || need+=(libxcb-icccm4)
have_lib libxcb-image.so.0 || need+=(libxcb-image0)
have_lib libxcb-keysyms.so.1 || need+=(libxcb-keysyms1)
have_lib libxcb-render-util.so.0 || need+=(libxcb-render-util0)
have_lib libxcb-xkb.so.1 || need+=(libxcb-xkb1)
have_lib libxcb-shape.so.0 || need+=(libxcb-shape0)
have_lib libxcb-randr.so.0 || need+=(libxcb-randr0)
have_lib libxcb-xinerama.so.0 || need+=(libxcb-xinerama0)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Installing system libraries for Qt: ${need[*]}" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "Qt may need these system packages: ${need[*]} (install them with your package manager)" >&2
fi
