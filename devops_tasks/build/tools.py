"""Host programs the builder runs: where they are, which apt package has them, and one runner that
turns a failure into a one-line :class:`ImageError`."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import ImageError

# program (or file) -> Debian package that ships it
HOST_TOOLS: dict[str, str] = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "syslinux": "syslinux",
    "sfdisk": "fdisk",
    "qemu-img": "qemu-utils",
}
MBR_BIN_CANDIDATES = ("/usr/lib/syslinux/mbr/mbr.bin", "/usr/share/syslinux/mbr.bin", "/usr/lib/SYSLINUX/mbr.bin")
MBR_PACKAGE = "syslinux-common"
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")

DISK_FULL_HINTS = ("No space left on device", "Disk quota exceeded", "File too large")


def which(program: str) -> str | None:
    """``shutil.which`` that also looks in the sbin dirs (not on a normal user's PATH)."""
    found = shutil.which(program)
    if found:
        return found
    for directory in _SBIN:
        candidate = Path(directory) / program
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def mbr_bin() -> Path | None:
    for candidate in MBR_BIN_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def missing_tools() -> list[tuple[str, str]]:
    """``[(program, apt package)]`` for every needed host program that is absent."""
    missing = [(tool, package) for tool, package in HOST_TOOLS.items() if which(tool) is None]
    if mbr_bin() is None:
        missing.append(("mbr.bin", MBR_PACKAGE))
    return missing


def require_tools() -> None:
    """Fail early, naming the apt packages to install, before anything is built or replaced."""
    missing = missing_tools()
    if missing:
        programs = ", ".join(tool for tool, _ in missing)
        packages = " ".join(sorted({package for _, package in missing}))
        raise ImageError(
            f"image build needs host tools that are missing ({programs}): run 'apt-get install {packages}'"
        )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def disk_full_error(where: Path | str, what: str) -> ImageError:
    return ImageError(f"no space left on the disk holding {where} while {what}: free some space and build again")


def run(
    args: Sequence[str],
    what: str,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    space_dir: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run one program (argument list, never a shell); on failure raise a one-line ImageError
    saying ``what`` was being done and the program's last error line (disk full named as such)."""
    program = which(args[0]) or args[0]
    full_env = dict(os.environ)
    full_env.update({"LC_ALL": "C", "LANG": "C"})
    if env:
        full_env.update(env)
    try:
        result = subprocess.run(
            [program, *args[1:]], cwd=cwd, env=full_env, input=input, capture_output=True, check=False
        )
    except FileNotFoundError:
        package = HOST_TOOLS.get(args[0], "")
        hint = f": run 'apt-get install {package}'" if package else ""
        raise ImageError(f"{what}: program '{args[0]}' not found{hint}") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full_error(space_dir or cwd or ".", what) from exc
        raise ImageError(f"{what}: cannot run '{args[0]}': {exc.strerror}") from exc
    if result.returncode != 0:
        stderr = result.stderr.decode("utf-8", "replace")
        stdout = result.stdout.decode("utf-8", "replace") if isinstance(result.stdout, bytes) else ""
        if any(hint in stderr or hint in stdout for hint in DISK_FULL_HINTS):
            raise disk_full_error(space_dir or cwd or ".", what)
        detail = _last_line(stderr) or _last_line(stdout) or f"exit status {result.returncode}"
        raise ImageError(f"{what}: {Path(args[0]).name} failed: {detail}")
    return result
