"""Each VM runs on its own qcow2 overlay whose backing file is the installed image.

The image itself is never written, several VMs share it, changes persist across
stop/boot, and ``--fresh`` (or a changed image) starts again from a new overlay.
The overlay's internal snapshots and its size are ``qemu-img``'s: QEMU holds a write lock on the
overlay while the VM runs, so those change a stopped VM's disk only (the caller makes sure).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import VMError
from ..fsutil import atomic_write_text
from .records import PRIVATE_UMASK, VMDir


def base_identity(image: Path, sha256: str = "") -> dict:
    """What identifies the backing image: its published sha256 when known, else size and mtime."""
    st = image.stat()
    ident = {"image": str(image.absolute()), "size": st.st_size}
    if sha256:
        ident["sha256"] = sha256
    else:
        ident["mtime_ns"] = st.st_mtime_ns
    return ident


def prepare(vm: VMDir, image: Path, info=None) -> bool:
    """Make sure the overlay exists and sits on the current image; True when an old one was replaced."""
    ident = base_identity(image, getattr(info, "sha256", "") or "")
    replaced = False
    if vm.disk.exists():
        try:
            if json.loads(vm.base_info.read_text()) == ident:
                return False
        except (OSError, ValueError):
            pass
        vm.disk.unlink()
        replaced = True
    create_overlay(image, vm.disk)
    atomic_write_text(vm.base_info, json.dumps(ident, indent=2) + "\n", 0o600)
    return replaced


def qemu_img_binary() -> str:
    import shutil  # here: vm.list reads sizes without it

    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise VMError("qemu-img not found: install qemu-utils (apt-get install qemu-utils)")
    return qemu_img


def create_overlay(image: Path, overlay: Path) -> None:
    qemu_img = qemu_img_binary()
    tmp = overlay.with_name(f".{overlay.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    result = subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.absolute()), str(tmp)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, umask=PRIVATE_UMASK,
    )
    if result.returncode != 0:
        raise VMError(f"cannot create the VM disk {overlay}: {result.stderr.strip()}")
    os.replace(tmp, overlay)


def reset(vm: VMDir) -> None:
    """``--fresh``: drop the overlay, its base record and the guest's host key (a new one is made)."""
    for path in (vm.disk, vm.base_info, vm.host_key, Path(str(vm.host_key) + ".pub")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def rotate_log(log: Path) -> None:
    """Keep the previous boot's serial log as ``.1``; only this boot's output may signal readiness."""
    with contextlib.suppress(FileNotFoundError):
        os.replace(log, log.with_name(log.name + ".1"))


# -- size ---------------------------------------------------------------------------------------

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
# The guest's root partition lives in an MBR table: 2^32 sectors of 512 bytes at most.
MAX_DISK = 2 * (1 << 40)
_UNITS = {"": 1, "B": 1, "K": KIB, "M": MIB, "G": GIB, "T": 1 << 40}
_SIZE_RE = re.compile(r"^(\+?)(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?$", re.IGNORECASE)


def human_bytes(size: int) -> str:
    """``1.5 GiB``, ``300.0 MiB``, ``512 B``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def parse_size(text: str, current: int) -> int:
    """``--disk`` → bytes: ``20G``, ``20480M``, ``+2G`` (added to ``current``), units in powers of
    1024 (``G`` = ``GiB``, as qemu-img reads them), rounded up to a whole MiB."""
    match = _SIZE_RE.match(str(text).strip())
    if not match:
        raise VMError(f"--disk {text!r} is not a size (examples: 20G, 20480M, +2G)")
    plus, number, unit = match.groups()
    size = int(float(number) * _UNITS[unit.upper()])
    if plus:
        size += current
    size = -(-size // MIB) * MIB
    if size <= 0:
        raise VMError(f"--disk {text!r} is not a size (examples: 20G, 20480M, +2G)")
    return size


def virtual_size(disk: Path) -> int:
    """The disk size the guest sees, from the qcow2 header (bytes 24-31, big-endian): no process."""
    try:
        with open(disk, "rb") as handle:
            header = handle.read(32)
    except FileNotFoundError:
        raise VMError(f"{disk} does not exist") from None
    if len(header) < 32 or header[:4] != b"QFI\xfb":
        raise VMError(f"{disk} is not a qcow2 disk")
    return struct.unpack(">Q", header[24:32])[0]


def allocated_size(path: Path) -> int:
    """Bytes the file really takes on the host's disk (0 when missing)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def check_resize(current: int, new: int, text: str) -> None:
    """Growing only, and within what the guest's partition table can address."""
    if new < current:
        raise VMError(f"--disk {text} ({human_bytes(new)}) is smaller than the disk ({human_bytes(current)}): "
                      "shrinking is refused (it would cut off the file system)")
    if new > MAX_DISK:
        raise VMError(f"--disk {text} ({human_bytes(new)}) is larger than 2 TiB, the most the guest's "
                      "MBR partition table can address")


def resize(disk: Path, new: int) -> None:
    """Grow the overlay to ``new`` bytes (``qemu-img resize``; never ``--shrink``)."""
    _qemu_img(["resize", "-q", "-f", "qcow2", str(disk), str(new)], f"resizing {disk}")


# -- snapshots ----------------------------------------------------------------------------------

TAG_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class Snapshot:
    """One internal snapshot of a VM's overlay."""

    tag: str
    created: int  # seconds since the epoch


def check_tag(tag: str) -> str:
    """Snapshot tags look like VM names but start with a letter or ``_`` (``qemu-img`` also finds a
    snapshot by its numeric id, so a tag of digits could name another snapshot)."""
    if not TAG_RE.match(tag or ""):
        raise VMError(f"invalid snapshot tag {tag!r}: use letters, digits, '.', '_' or '-', starting with "
                      "a letter or '_' (at most 63)")
    return tag


def parse_snapshots(info: dict) -> list[Snapshot]:
    """The snapshots in ``qemu-img info --output=json``, oldest first."""
    found = []
    for entry in info.get("snapshots") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        found.append(Snapshot(tag=entry["name"], created=int(entry.get("date-sec") or 0)))
    return sorted(found, key=lambda snap: (snap.created, snap.tag))


def snapshots(disk: Path) -> list[Snapshot]:
    """The overlay's snapshots (read-only, ``-U``: also while QEMU holds the disk)."""
    out = _qemu_img(["info", "-U", "--output=json", "-f", "qcow2", str(disk)], f"reading {disk}")
    try:
        info = json.loads(out)
    except ValueError:
        raise VMError(f"'qemu-img info' of {disk} did not answer JSON") from None
    return parse_snapshots(info if isinstance(info, dict) else {})


def save_snapshot(disk: Path, tag: str) -> None:
    _qemu_img(["snapshot", "-q", "-c", check_tag(tag), str(disk)], f"saving snapshot {tag!r}")


def restore_snapshot(disk: Path, tag: str) -> None:
    _qemu_img(["snapshot", "-q", "-a", check_tag(tag), str(disk)], f"restoring snapshot {tag!r}")


def delete_snapshot(disk: Path, tag: str) -> None:
    _qemu_img(["snapshot", "-q", "-d", check_tag(tag), str(disk)], f"deleting snapshot {tag!r}")


def _qemu_img(args: list[str], what: str, timeout: float = 600) -> str:
    try:
        result = subprocess.run([qemu_img_binary(), *args], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, umask=PRIVATE_UMASK, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VMError(f"{what}: qemu-img took longer than {timeout:.0f} s") from None
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        detail = lines[0].removeprefix("qemu-img: ") if lines else f"exit status {result.returncode}"
        raise VMError(f"{what} failed: {detail}")
    return result.stdout
