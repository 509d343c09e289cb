"""Prints the Debian `Depends` of a bundle: the system packages owning the libraries it needs.

Every ELF file in the bundle names the libraries it needs (DT_NEEDED). Those the
bundle carries itself are skipped; each other one is found on this system
(`ldconfig -p`) and mapped to its package (`dpkg -S`). glibc gets a minimum
version from the newest GLIBC_x.y symbol version the bundle uses.
Usage: deb_depends.py BUNDLE_DIR
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

_NEEDED = re.compile(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]")
_GLIBC = re.compile(r"GLIBC_(\d+)\.(\d+)")


def elf_files(root: Path) -> list[Path]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def system_libraries() -> dict[str, str]:
    """soname -> path of the x86-64 libraries the dynamic linker knows."""
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    libs: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", line)
        if m and "x86-64" in m.group(2):
            libs.setdefault(m.group(1), m.group(3))
    return libs


def owner(path: str) -> str:
    """The package that installed `path` (its real path, when /lib is a link to /usr/lib)."""
    for candidate in (path, os.path.realpath(path), path.replace("/usr/lib/", "/lib/", 1)):
        proc = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout.split(":", 1)[0].strip()
    raise SystemExit(f"deb_depends: no package owns {path}")


def main(root: Path) -> int:
    files = elf_files(root)
    carried = {p.name for p in root.rglob("*")}
    needed: set[str] = set()
    glibc = (2, 17)
    for path in files:
        dynamic = subprocess.run(["readelf", "-dW", str(path)], capture_output=True, text=True)
        needed.update(_NEEDED.findall(dynamic.stdout))
        symbols = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True)
        for major, minor in _GLIBC.findall(symbols.stdout):
            glibc = max(glibc, (int(major), int(minor)))
    system = system_libraries()
    packages: set[str] = set()
    missing = []
    for soname in sorted(needed - carried):
        if soname not in system:
            missing.append(soname)
            continue
        packages.add(owner(system[soname]))
    if missing:
        sys.stderr.write(f"deb_depends: not on this system: {', '.join(missing)}\n")
        return 1
    libc = packages & {"libc6"}
    packages -= libc
    depends = [f"libc6 (>= {glibc[0]}.{glibc[1]})", *sorted(packages)]
    print(", ".join(depends))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
