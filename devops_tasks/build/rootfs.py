"""The root file system as a plain folder: unpacked .debs (no maintainer scripts run), minus excluded
paths, plus busybox applets, the guest's own files and accounts and the recipe's files, every
timestamp fixed."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Iterable

from ..errors import ImageError
from .recipe import Recipe
from .tools import run

IMAGE_FILES_PACKAGE = "devops_tasks.build.image_files"
# The unprivileged account agents run as (root stays the tool's): its home is on the VM disk; it
# has no password and no way in over SSH (dropbear lets only group root in, whatever keys it
# writes into its own ~/.ssh); root starts its commands with busybox ``su``.
AGENT_USER = "dev"
AGENT_UID = AGENT_GID = 1000
AGENT_HOME = "/home/dev"
RUNTIME_DIRS = ("proc", "sys", "dev", "run", "tmp", "app", "mnt", "root", "root/.ssh", "var/log", "var/tmp",
                "etc/devops-tasks", "home", AGENT_HOME.lstrip("/"))
DIR_MODES = {"tmp": 0o1777, "var/tmp": 0o1777, "root": 0o700, "root/.ssh": 0o700, "home": 0o755,
             AGENT_HOME.lstrip("/"): 0o700}
# guest path -> (uid, gid) for what is not root's (set in the ext4 image: the builder needs no root)
OWNERS = {AGENT_HOME: (AGENT_UID, AGENT_GID)}
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
IMAGE_CA_BUNDLE = "/usr/lib/devops-tasks/ca-certificates.crt"  # the image's own, read at boot
BOOT_CA_BUNDLE = "/run/host/ca-certificates.crt"  # the image's plus the host's (the ssh service)


def image_files_dir() -> Path:
    """The guest files shipped with the package (a real folder: the package is not zipped)."""
    return Path(str(resources.files(IMAGE_FILES_PACKAGE)))


def extract(debs: Iterable[Path], root: Path, jobs: int = 4) -> None:
    """``dpkg-deb -x`` every package into ``root``, a few at a time (packages never share files)."""
    root.mkdir(parents=True, exist_ok=True)

    def one(deb: Path) -> None:
        run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}", space_dir=root)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(one, deb) for deb in sorted(debs)]:
            future.result()


def newest_mtime(root: Path) -> int:
    """The newest regular file's time in the packages: the build's fixed timestamp (like
    SOURCE_DATE_EPOCH). Directories do not count: unpacking into them changes their times."""
    newest = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            info = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(info.st_mode):
                newest = max(newest, int(info.st_mtime))
    return newest


def remove_excluded(root: Path, patterns: tuple[str, ...]) -> None:
    """Delete paths matching the recipe's ``exclude`` globs; ``/usr/share/doc/*/copyright`` stays."""
    if not patterns:
        return
    for dirpath, dirnames, filenames in os.walk(root, topdown=True):
        rel_dir = "/" + os.path.relpath(dirpath, root).lstrip(".")
        for name in filenames + dirnames:
            guest_path = os.path.join(rel_dir, name).replace("//", "/")
            if not any(fnmatch.fnmatchcase(guest_path, p) for p in patterns):
                continue
            if name == "copyright" and guest_path.startswith("/usr/share/doc/"):
                continue
            full = os.path.join(dirpath, name)
            if os.path.isdir(full) and not os.path.islink(full):
                if not _holds_copyright(full):
                    shutil.rmtree(full)
                    dirnames.remove(name)
            else:
                os.unlink(full)


def _holds_copyright(directory: str) -> bool:
    return "/usr/share/doc" in directory and any("copyright" in files for _, _, files in os.walk(directory))


def busybox_links(root: Path) -> None:
    """Symlink every busybox applet that no package provides (ls, ip, udhcpc, init, ...)."""
    busybox = root / "bin/busybox"
    if not busybox.is_file():
        raise ImageError("the root file system has no /bin/busybox: add busybox-static to the recipe's packages")
    try:
        listing = subprocess.run([str(busybox), "--list-full"], capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ImageError(f"cannot list the busybox applets: {exc}") from None
    for applet in sorted(filter(None, (line.strip() for line in listing.splitlines()))):
        link = root / applet
        if os.path.lexists(link) or os.path.lexists(_merged_alias(root, applet)):
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def _merged_alias(root: Path, applet: str) -> Path:
    """``bin/x`` and ``usr/bin/x`` are the same command for PATH: do not shadow a packaged one."""
    if applet.startswith("usr/"):
        return root / applet[4:]
    return root / "usr" / applet


def _mode_for(data: bytes) -> int:
    return 0o755 if data.startswith(b"#!") else 0o644


def write_file(root: Path, guest_path: str, data: bytes, mode: int) -> None:
    target = root / guest_path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(target) and (target.is_symlink() or not target.is_dir()):
        target.unlink()
    target.write_bytes(data)
    os.chmod(target, mode)


def guest_files(root: Path, recipe: Recipe) -> None:
    """The guest contract's files (init, services, accounts), then the recipe's own files."""
    tree = image_files_dir() / "rootfs"
    for path in sorted(tree.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            data = path.read_bytes()
            write_file(root, "/" + path.relative_to(tree).as_posix(), data, _mode_for(data))
    for name in RUNTIME_DIRS:
        (root / name).mkdir(parents=True, exist_ok=True)
    for name, mode in DIR_MODES.items():
        os.chmod(root / name, mode)
    shell = recipe.shell
    passwd = (f"root:x:0:0:root:/root:{shell}\n"
              "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
              f"{AGENT_USER}:x:{AGENT_UID}:{AGENT_GID}:{AGENT_USER}:{AGENT_HOME}:{shell}\n"
              "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    # dropbear refuses a root whose password field is "!" (locked); "*" = no password, keys only.
    # The agent's is locked: nothing needs it (dropbear's -G root keeps it out of SSH)
    shadow = (f"root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n{AGENT_USER}:!:19000:0:99999:7:::\n"
              "nobody:*:19000:0:99999:7:::\n")
    write_file(root, "/etc/passwd", passwd.encode(), 0o644)
    write_file(root, "/etc/shadow", shadow.encode(), 0o600)
    group = (tree / "etc/group").read_text() + f"{AGENT_USER}:x:{AGENT_GID}:\n"
    write_file(root, "/etc/group", group.encode(), 0o644)
    write_file(root, "/etc/hostname", f"{recipe.hostname}\n".encode(), 0o644)
    write_file(root, "/etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{recipe.hostname}\n"
               "::1\tlocalhost ip6-localhost ip6-loopback\n".encode(), 0o644)
    shells = sorted({"/bin/sh", "/bin/bash", "/usr/bin/bash", "/bin/ash", shell})
    write_file(root, "/etc/shells", "".join(f"{s}\n" for s in shells).encode(), 0o644)  # dropbear checks it
    write_file(root, "/etc/devops-tasks/services", "".join(f"{s}\n" for s in recipe.services).encode(), 0o644)
    _symlink(root, "etc/resolv.conf", "/run/resolv.conf")
    _symlink(root, "etc/mtab", "/proc/self/mounts")
    _symlink(root, "root/.ssh/authorized_keys", "/run/devops-tasks/authorized_keys")
    _symlink(root, "sbin/init", "/bin/busybox")
    for extra in recipe.files:
        write_file(root, extra.path, extra.data, extra.mode)
    ca_bundle_at_boot(root)
    if not (root / shell.lstrip("/")).exists() and not os.path.lexists(root / shell.lstrip("/")):
        raise ImageError(f"{recipe.path}: shell {shell} is not in the root file system: add its package or fix 'shell'")


def ca_bundle_at_boot(root: Path) -> None:
    """The system CA bundle is made at each boot: the image's own (when a package or the recipe
    put one at the usual path, moved to IMAGE_CA_BUNDLE) plus the certificates the host hands in.
    So /etc/ssl/certs/ca-certificates.crt points to tmpfs, in every image."""
    bundle = root / SYSTEM_CA_BUNDLE.lstrip("/")
    if bundle.is_file() and not bundle.is_symlink():
        kept = root / IMAGE_CA_BUNDLE.lstrip("/")
        kept.parent.mkdir(parents=True, exist_ok=True)
        os.replace(bundle, kept)
    _symlink(root, SYSTEM_CA_BUNDLE.lstrip("/"), BOOT_CA_BUNDLE)


def _symlink(root: Path, rel: str, target: str) -> None:
    link = root / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(link):
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        else:
            link.unlink()
    link.symlink_to(target)


_NO_BYTECODE = r"/(test|tests|idlelib|tkinter|lib2to3|turtledemo|ensurepip)/"


def compile_python(root: Path) -> None:
    """Byte-compile the guest's Python with the guest's own interpreter (through its own dynamic
    loader, on the host): without .pyc files ``python3 -m pytest`` spends ~15 s compiling under TCG.
    One process, sorted order, timestamp mode (sources carry the fixed epoch), and -B so the modules
    compileall itself imports are not cached with the staging path in them: byte-identical."""
    interpreters = sorted((p for p in (root / "usr/bin").glob("python3.[0-9]*") if re.fullmatch(r"python3\.\d+", p.name)),
                          key=lambda p: int(p.name.split(".")[1]))
    loader = root / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    if not interpreters or not loader.is_file():
        return
    python = interpreters[-1]
    libs = f"{root}/lib/x86_64-linux-gnu:{root}/usr/lib/x86_64-linux-gnu"
    targets = [str(d) for d in (root / "usr/lib" / python.name, root / "usr/lib/python3/dist-packages") if d.is_dir()]
    run([str(loader), "--library-path", libs, str(python), "-I", "-B", "-m", "compileall", "-f", "-q", "-j1",
         "-s", str(root), "-p", "/", "-x", _NO_BYTECODE, *targets],
        "byte-compiling the guest's Python", env={"PYTHONHASHSEED": "0"}, space_dir=root)


def normalize(root: Path, epoch: int) -> int:
    """Every timestamp set to ``epoch`` (several packages create the same directories at different
    times, so clamping is not enough); returns the number of entries."""
    count = 0
    stamp = (epoch * 1_000_000_000, epoch * 1_000_000_000)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=stamp, follow_symlinks=False)
            count += 1
    os.utime(root, ns=stamp)
    return count


def tree_size(root: Path) -> int:
    """Bytes the files take (rounded to 4 KiB blocks), for sizing the ext4 partition."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            size = os.lstat(os.path.join(dirpath, name)).st_size
            total += (size + 4095) // 4096 * 4096 + 256
    return total
