"""Each VM runs on its own qcow2 overlay whose backing file is the installed image.

The image itself is never written, several VMs share it, changes persist across
stop/boot, and ``--fresh`` (or a changed image) starts again from a new overlay.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
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


def create_overlay(image: Path, overlay: Path) -> None:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise VMError("qemu-img not found: install qemu-utils (apt-get install qemu-utils)")
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
