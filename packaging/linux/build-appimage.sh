#!/usr/bin/env bash
# Builds OUT/Peregrine-VERSION-x86_64.AppImage from the one-folder bundle.
# appimagetool (and the AppImage runtime it embeds) is downloaded by the release
# workflow (.github/workflows/release.yml); pass its path as APPIMAGETOOL.
# Usage: APPIMAGETOOL=/path/to/appimagetool build-appimage.sh BUNDLE_DIR VERSION OUT
set -euo pipefail
bundle=$1 version=$2 out=$3
root=$(cd "$(dirname "$0")/../.." && pwd)
tool=${APPIMAGETOOL:?set APPIMAGETOOL to appimagetool}
appdir=build/AppDir
rm -rf "$appdir" && mkdir -p "$appdir/usr/lib" "$appdir/usr/share/applications" \
  "$appdir/usr/share/icons/hicolor/256x256/apps"
cp -a "$bundle" "$appdir/usr/lib/peregrine"
sed 's|@EXEC@|peregrine|g' "$root/assets/peregrine.desktop.in" >"$appdir/peregrine.desktop"
cp "$appdir/peregrine.desktop" "$appdir/usr/share/applications/"
cp "$root/assets/icons/peregrine-256.png" "$appdir/peregrine.png"
cp "$root/assets/icons/peregrine-256.png" "$appdir/usr/share/icons/hicolor/256x256/apps/peregrine.png"
cat >"$appdir/AppRun" <<'APPRUN'
#!/bin/sh
# Any subcommand works: ./Peregrine.AppImage serve --port 0; no argument opens the app.
here=$(dirname "$(readlink -f "$0")")
exec "$here/usr/lib/peregrine/peregrine" "$@"
APPRUN
chmod +x "$appdir/AppRun"
mkdir -p "$out"
ARCH=x86_64 "$tool" --no-appstream "$appdir" "$out/Peregrine-$version-x86_64.AppImage"
