"""The packages' smoke test (`make package-check`, run as root; docs/install.md).

1. A clean system: a `debootstrap --variant=minbase` chroot of this Debian release
   (no Python, no build tools) installs the .deb with apt, so its Depends are proven.
   In there, with no network but loopback and as an ordinary user:
   `peregrine serve --port 0` answers a chat over HTTP, `peregrine profile` prints
   a plan, and `peregrine gui` starts offscreen, starts its engine and on SIGTERM
   exits with no engine left behind.
2. `ldd` finds every library of every ELF file in the bundle.
3. The .deb removes cleanly; the portable archive, unpacked into a folder whose path
   has a space and non-ASCII letters, passes the same checks.
4. The bundled engine answers a completion under `qemu-x86_64 -cpu Haswell`.
5. Figures: bundle, archive, package and installed sizes; cold start to `ready` and
   to the first streamed token (offline). Written to build/package-check/figures.json.

Usage: smoke_test.py DEB TARBALL
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

WORK = Path("build/package-check").resolve()
ROOT = WORK / "root"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peregrine-build"
USER = "tester"
HOME = f"/home/{USER}"
# A folder name with a space and non-ASCII letters (check 3).
ODD_DIR = f"{HOME}/Mes modèles ü/Peregrine ñ"
MOUNTS = ("proc", "sys", "dev")


class CheckFailed(Exception):
    pass


def say(text: str) -> None:
    print(f"[package-check] {text}", flush=True)


def run(cmd: Sequence[str], timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=False, **kw
    )  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise CheckFailed(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def retried(cmd: Sequence[str], timeout: float, attempts: int = 3) -> None:
    """A network step (debootstrap, apt): a mirror's hiccup is retried, not a failure."""
    for attempt in range(1, attempts + 1):
        try:
            run(cmd, timeout=timeout)
            return
        except (CheckFailed, subprocess.TimeoutExpired) as exc:
            if attempt == attempts:
                raise
            say(f"attempt {attempt} failed, retrying: {str(exc).splitlines()[0][:200]}")
            time.sleep(10 * attempt)


def in_root(cmd: Sequence[str], user: bool = True, **env: str) -> list[str]:
    """`cmd` inside the chroot with a bare environment (C locale, no Python anywhere)."""
    base = {"HOME": HOME if user else "/root", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    base.update(env)
    prefix = ["chroot"] + ([f"--userspec={USER}:{USER}"] if user else []) + [str(ROOT)]
    return [*prefix, "env", "-i", *(f"{k}={v}" for k, v in base.items()), *cmd]


# --- the chroot ---------------------------------------------------------------------------


def mounted_under(path: Path) -> list[str]:
    lines = Path("/proc/self/mounts").read_text().splitlines()
    targets = [ln.split()[1].replace("\\040", " ") for ln in lines]
    return [t for t in targets if t == str(path) or t.startswith(str(path) + "/")]


def unmount_all() -> None:
    for target in sorted(mounted_under(ROOT), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False)
    if mounted_under(ROOT):
        raise CheckFailed(f"still mounted under {ROOT}: {mounted_under(ROOT)}")


def remove_root() -> None:
    if ROOT.exists():
        unmount_all()
        # --one-file-system: never follow a mount that survived into the host's /dev.
        subprocess.run(["rm", "-rf", "--one-file-system", str(ROOT)], check=True)


def debian_release() -> tuple[str, str]:
    fields = dict(
        line.split("=", 1)
        for line in Path("/etc/os-release").read_text().splitlines()
        if "=" in line
    )
    codename = fields.get("VERSION_CODENAME", "").strip('"')
    if fields.get("ID") != "debian" or not codename:
        raise CheckFailed("package-check needs a Debian host (it bootstraps the same release)")
    mirror = "http://deb.debian.org/debian"
    for source in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        text = source.read_text(errors="replace") if source.is_file() else ""
        m = re.search(r"(https?://\S+/debian)/?\s", text)
        if m and "security" not in m.group(1):
            mirror = m.group(1)
            break
    return codename, mirror


def make_root() -> None:
    codename, mirror = debian_release()
    remove_root()
    WORK.mkdir(parents=True, exist_ok=True)
    debs = CACHE / "debootstrap"
    debs.mkdir(parents=True, exist_ok=True)
    say(f"debootstrap --variant=minbase {codename} from {mirror}")
    retried(
        ["debootstrap", "--variant=minbase", f"--cache-dir={debs}", codename, str(ROOT), mirror],
        timeout=900,
    )
    (ROOT / "etc/apt/sources.list").write_text(
        f"deb {mirror} {codename} main\n"
        f"deb {mirror} {codename}-updates main\n"
        f"deb {mirror.rsplit('/', 1)[0]}/debian-security {codename}-security main\n"
    )
    shutil.copy("/etc/resolv.conf", ROOT / "etc/resolv.conf")
    for name in MOUNTS:
        (ROOT / name).mkdir(exist_ok=True)
    run(["mount", "-t", "proc", "proc", str(ROOT / "proc")])
    run(["mount", "-t", "sysfs", "sysfs", str(ROOT / "sys")])
    run(["mount", "--rbind", "/dev", str(ROOT / "dev")])
    run(["mount", "--make-rslave", str(ROOT / "dev")])
    run(in_root(["useradd", "--create-home", "--shell", "/bin/sh", USER], user=False))


# --- one run of the bundle ----------------------------------------------------------------


def read_until(stream, pattern: str, deadline: float, seen: list[str]) -> str:  # type: ignore[no-untyped-def]
    """Lines from `stream` until one contains `pattern`; the process's output so far on failure."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = stream.readline()
        if not line:
            break
        seen.append(line.rstrip("\n"))
        if pattern in line:
            return line
    tail = "\n".join(seen[-30:])
    raise CheckFailed(f"never saw {pattern!r}; output:\n{tail}")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chat(
    port: int, key: str, stream: bool, max_tokens: int = 16, extra: dict[str, object] | None = None
) -> tuple[str, float | None]:
    """One chat completion; the text and, when streamed, the time of its first token."""
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        **(extra or {}),
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    first: float | None = None
    text = ""
    with urllib.request.urlopen(request, timeout=600) as reply:
        if not stream:
            return json.load(reply)["choices"][0]["message"]["content"], None
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            delta = json.loads(line[5:])["choices"][0]["delta"].get("content") or ""
            if delta and first is None:
                first = time.monotonic()
            text += delta
    return text, first


def serve_check(argv: list[str], timeout: float = 180) -> dict[str, float | bool]:
    """`serve --port 0` prints ready and streams an answer; seconds to ready and first token."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [*argv, "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen: list[str] = []
        line = read_until(proc.stdout, '"ready"', started + timeout, seen)
        ready_at = time.monotonic()
        event = json.loads(line)
        text, first = chat(int(event["port"]), str(event["api_key"]), stream=True)
        if not text.strip() or first is None:
            raise CheckFailed(f"serve answered an empty chat: {text!r}")
        say(f"  serve: ready, answered {text.strip()[:60]!r}")
        # Structured output runs on llguidance's native library: it must be in the bundle.
        schema = {
            "type": "object",
            "properties": {"greeting": {"type": "string", "maxLength": 20}},
            "required": ["greeting"],
            "additionalProperties": False,
        }
        answer, _ = chat(
            int(event["port"]),
            str(event["api_key"]),
            stream=False,
            max_tokens=48,
            extra={
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "g", "schema": schema, "strict": True},
                }
            },
        )
        try:
            parsed = json.loads(answer)
        except ValueError as exc:
            raise CheckFailed(f"a json_schema answer is not JSON: {answer!r}") from exc
        if not isinstance(parsed, dict) or set(parsed) != {"greeting"}:
            raise CheckFailed(f"a json_schema answer does not match its schema: {answer!r}")
        say(f"  serve: structured output {answer!r}")
        return {"to_ready_s": ready_at - started, "to_first_token_s": first - started}
    finally:
        stop(proc)
        if proc.returncode not in (0, -signal.SIGTERM):
            err = proc.stderr.read() if proc.stderr else ""
            raise CheckFailed(f"serve exited {proc.returncode} on SIGTERM:\n{err[-2000:]}")


def profile_check(argv: list[str]) -> None:
    out = run([*argv, "profile"], timeout=300).stdout
    if "plan:" not in out or "memory (measured)" not in out:
        raise CheckFailed(f"profile printed no measured plan:\n{out}")
    say("  profile: " + next(ln for ln in out.splitlines() if ln.startswith("plan:")))


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def gui_check(argv: list[str], timeout: float = 240) -> None:
    """The GUI starts offscreen and starts its engine; SIGTERM leaves no engine behind."""
    proc = subprocess.Popen(
        [*argv, "--debug", "gui"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen: list[str] = []
        read_until(proc.stderr, "engine ready on", time.monotonic() + timeout, seen)
        engines = children(proc.pid)
        if not engines:
            raise CheckFailed("the GUI's engine is not its child process")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        if code != 0:
            raise CheckFailed(f"gui exited {code} on SIGTERM")
        deadline = time.monotonic() + 10  # the engine may take a moment to be reaped
        while any(alive(p) for p in engines) and time.monotonic() < deadline:
            time.sleep(0.2)
        if any(alive(p) for p in engines):
            raise CheckFailed(f"engine {engines} outlived the GUI")
        say("  gui: engine started; SIGTERM: exit 0, no engine left")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def ldd_check(folder: str) -> int:
    """Every ELF file's libraries are found (inside the chroot); returns how many were checked."""
    # One line per ELF file: "ok PATH" or "missing PATH: ...". Paths may hold spaces.
    script = (
        'find "$1" -type f | while IFS= read -r f; do '
        'head -c4 "$f" | grep -q ELF || continue; '
        'out=$(LD_LIBRARY_PATH="$1/_internal" ldd "$f" 2>&1 | grep "not found"); '
        'if [ -n "$out" ]; then echo "missing $f: $out"; else echo "ok $f"; fi; done'
    )
    out = run(in_root(["sh", "-c", script, "ldd-check", folder], user=False)).stdout
    lines = out.splitlines()
    missing = [ln for ln in lines if ln.startswith("missing ")]
    if missing or not lines:
        raise CheckFailed("ldd: libraries not found:\n" + "\n".join(missing or ["no ELF files"]))
    say(f"  ldd: {len(lines)} ELF files, no library missing")
    return len(lines)


# --- the offline part, in a network namespace with only loopback -------------------------


def drop_page_cache() -> bool:
    """A truly cold start reads the bundle from disk; False where the kernel does not allow it."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def offline_checks(exe: str) -> dict[str, float | bool]:
    """serve, profile and gui from `exe` (a path inside the chroot)."""
    run(["ip", "link", "set", "lo", "up"])
    argv = in_root([exe])
    cold = drop_page_cache()
    figures = serve_check(argv)
    figures["page_cache_dropped"] = cold
    profile_check(argv)
    gui_check(in_root([exe], QT_QPA_PLATFORM="offscreen"))
    return figures


def run_offline(exe: str) -> dict[str, float | bool]:
    """Runs offline_checks in a new network namespace (no network but loopback)."""
    proc = subprocess.run(
        ["unshare", "--net", "--", sys.executable, __file__, "--offline", exe],
        stdout=subprocess.PIPE,
        text=True,
        timeout=900,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    for line in lines[:-1] if proc.returncode == 0 else lines:
        print(line, flush=True)
    if proc.returncode != 0:
        raise CheckFailed(f"offline checks of {exe} failed")
    return json.loads(lines[-1])


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def size_of(folder: Path) -> int:
    """Bytes of the regular files under `folder` (links counted once, as links)."""
    return sum(p.lstat().st_size for p in folder.rglob("*") if not p.is_dir() or p.is_symlink())


def qemu_check(exe: Path) -> float:
    """One completion from the engine under an emulated Haswell CPU (AVX2, no AVX-512)."""
    say("qemu-x86_64 -cpu Haswell: one completion")
    started = time.monotonic()
    env = {**os.environ, "PEREGRINE_HOME": str(WORK / "qemu-home")}
    proc = subprocess.Popen(
        ["qemu-x86_64", "-cpu", "Haswell", str(exe), "serve", "--port", "0", "--ctx", "512"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        seen: list[str] = []
        line = read_until(proc.stdout, '"ready"', started + 600, seen)
        event = json.loads(line)
        text, _ = chat(int(event["port"]), str(event["api_key"]), stream=False, max_tokens=8)
        if not text.strip():
            raise CheckFailed("the engine under qemu answered nothing")
        seconds = time.monotonic() - started
        say(f"  answered {text.strip()[:60]!r} in {seconds:.0f} s under emulation")
        return seconds
    finally:
        stop(proc)
        if proc.returncode not in (0, -signal.SIGTERM):
            err = proc.stderr.read() if proc.stderr else ""
            raise CheckFailed(f"engine under qemu exited {proc.returncode}:\n{err[-3000:]}")


def main(deb: Path, tarball: Path) -> int:
    if os.geteuid() != 0:
        say("needs root (debootstrap, chroot, mounts)")
        return 1
    for tool in ("debootstrap", "qemu-x86_64", "chroot", "unshare", "ip", "desktop-file-validate"):
        if shutil.which(tool) is None:
            say(
                f"missing tool: {tool} (apt-get install debootstrap qemu-user iproute2 desktop-file-utils)"
            )
            return 1
    began = time.monotonic()
    figures: dict[str, object] = {
        "bundle_bytes": size_of(Path("build/bundle/peregrine")),
        "deb_bytes": deb.stat().st_size,
        "tarball_bytes": tarball.stat().st_size,
    }
    try:
        make_root()
        say(f"chroot ready ({time.monotonic() - began:.0f} s)")
        if run(
            in_root(["sh", "-c", "ls /usr/bin/python* 2>/dev/null; true"], user=False)
        ).stdout.strip():
            raise CheckFailed("the clean system has a Python; it proves nothing")
        shutil.copy(deb, ROOT / "tmp/peregrine.deb")
        retried(in_root(["apt-get", "update", "-qq"], user=False), timeout=600)
        retried(
            in_root(
                [
                    "apt-get",
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    "/tmp/peregrine.deb",
                ],
                user=False,
                DEBIAN_FRONTEND="noninteractive",
            ),
            timeout=900,
        )
        say("1. the .deb installed with apt into a minbase chroot")
        if run(in_root(["sh", "-c", "command -v python3 || true"], user=False)).stdout.strip():
            raise CheckFailed("installing the .deb pulled in a Python")
        run(["desktop-file-validate", str(ROOT / "usr/share/applications/peregrine.desktop")])
        for icon in ("256x256/apps/peregrine.png", "scalable/apps/peregrine.svg"):
            if not (ROOT / "usr/share/icons/hicolor" / icon).is_file():
                raise CheckFailed(f"icon missing: {icon}")
        if os.readlink(ROOT / "usr/bin/peregrine") != "/opt/peregrine/peregrine":
            raise CheckFailed("/usr/bin/peregrine is not a link to /opt/peregrine/peregrine")
        version = run(in_root(["peregrine", "--version"])).stdout.strip()
        say(f"  {version}")
        installed = files_under(ROOT / "opt/peregrine")
        figures["installed_bytes"] = size_of(ROOT / "opt/peregrine")
        figures["ldd_elf_files"] = ldd_check("/opt/peregrine")
        say("2. no missing libraries")
        figures["deb"] = run_offline("peregrine")
        if files_under(ROOT / "opt/peregrine") != installed:
            raise CheckFailed("running Peregrine wrote into /opt/peregrine")
        if not (ROOT / HOME.lstrip("/") / ".local/share/Peregrine").is_dir():
            raise CheckFailed("no user data under ~/.local/share/Peregrine")

        run(in_root(["apt-get", "remove", "-y", "-qq", "peregrine"], user=False))
        left = [
            p
            for p in (
                "opt/peregrine",
                "usr/bin/peregrine",
                "usr/share/applications/peregrine.desktop",
                "usr/share/icons/hicolor/256x256/apps/peregrine.png",
            )
            if (ROOT / p).exists() or (ROOT / p).is_symlink()
        ]
        if left:
            raise CheckFailed(f"apt-get remove left {left}")
        say("   the .deb removed cleanly")

        odd = ROOT / ODD_DIR.lstrip("/")
        odd.mkdir(parents=True)
        with tarfile.open(tarball) as archive:
            archive.extractall(odd, filter="tar")
        run(
            [
                "chown",
                "-R",
                "--reference",
                str(ROOT / HOME.lstrip("/")),
                str(ROOT / HOME.lstrip("/")),
            ]
        )
        exe = f"{ODD_DIR}/peregrine/peregrine"
        ldd_check(f"{ODD_DIR}/peregrine")
        figures["portable"] = run_offline(exe)
        say(f"3. the portable archive runs from {ODD_DIR!r}")

        figures["qemu_haswell_answer_s"] = qemu_check(ROOT / exe.lstrip("/"))
        say("4. answered under qemu-x86_64 -cpu Haswell")
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        say(f"FAILED: {exc}")
        return 1
    finally:
        remove_root()
    figures["package_check_s"] = round(time.monotonic() - began)
    (WORK / "figures.json").write_text(json.dumps(figures, indent=1))
    say("5. figures: " + json.dumps(figures))
    say("all checks passed")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--offline":
        try:
            result = offline_checks(sys.argv[2])
        except (CheckFailed, subprocess.TimeoutExpired) as exc:
            say(f"FAILED: {exc}")
            raise SystemExit(1) from None
        print(json.dumps(result))
        raise SystemExit(0)
    raise SystemExit(main(Path(sys.argv[1]), Path(sys.argv[2])))
