"""The check a downloaded image passes before it is installed.

A qcow2 header can name a backing file or an external data file by host path; QEMU opens it when
it boots the image, so a published image could read any file the user can read into the guest.
An image is installed only when ``qemu-img info`` (which does not open either) says it is a
self-contained qcow2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from ..errors import ImageError

TIMEOUT = 60  # seconds; qemu-img reads only the header and the tables


def image_info(path: Path) -> dict:
    """``qemu-img info --output=json`` of ``path`` (format probed, backing chain not followed)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise ImageError("qemu-img not found: install qemu-utils (apt-get install qemu-utils)")
    try:
        result = subprocess.run(
            [qemu_img, "info", "--output=json", str(Path(path).absolute())],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise ImageError(f"{path}: 'qemu-img info' took longer than {TIMEOUT} s") from None
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise ImageError(f"{path}: 'qemu-img info' failed: {detail}")
    try:
        info = json.loads(result.stdout)
    except ValueError:
        raise ImageError(f"{path}: 'qemu-img info' did not answer JSON") from None
    if not isinstance(info, dict):
        raise ImageError(f"{path}: 'qemu-img info' did not answer a JSON object")
    return info


def unsafe_reason(info: dict) -> str:
    """Why an image with this ``qemu-img info`` may not be installed ('' when it may)."""
    fmt = info.get("format")
    if fmt != "qcow2":
        return f"is not a qcow2 image (format {str(fmt)[:40]!r})"
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing:
        return f"names a backing file {str(backing)[:200]!r} (QEMU would read that host file into the guest)"
    data = (info.get("format-specific") or {}).get("data") or {}
    data_file = data.get("data-file") if isinstance(data, dict) else None
    if data_file:
        return f"names an external data file {str(data_file)[:200]!r} (QEMU would read that host file into the guest)"
    return ""


def check_image(path: Path, name: str = "") -> None:
    """Raise :class:`ImageError` unless ``path`` is a self-contained qcow2 (``name`` is what the
    error calls the image; default: the path)."""
    why = unsafe_reason(image_info(path))
    if why:
        raise ImageError(f"{name or path} {why}: refused, nothing was installed")
