"""SSH trust between the host and its guests: the keys and ``~/.core/known_hosts``.

How the host then talks SSH to a guest (options, target, argv) is :mod:`.guest.openssh`'s.
For images that follow the guest contract the host makes the guest's host key itself and pins it
before the first connection, so SSH is strict from the start (no trust-on-first-use).
Published images fall back to ``ssh-keyscan`` after boot, with a warning. Pinning *replaces* every
line for ``[127.0.0.1]:PORT`` (and ``[localhost]:PORT``) atomically under a lock: ports are reused
by other VMs, so an old key beside the new one would be wrong.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Iterable

from . import paths
from .errors import GuestError
from .fsutil import atomic_write_text, file_lock
from .guest.connection import LOOPBACK as GUEST_HOST


def login_key_path() -> Path:
    """The tool's one login key, shared by every VM: ``~/.core/id_ed25519``."""
    return paths.core_home() / "id_ed25519"


def _keygen(path: Path, comment: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
        )
    except FileNotFoundError:
        raise GuestError("ssh-keygen not found: install openssh-client") from None
    except subprocess.CalledProcessError as exc:
        raise GuestError(f"ssh-keygen failed for {path}: {exc.stderr.decode(errors='replace').strip()}") from None
    os.chmod(path, 0o600)


def ensure_key(path: Path, comment: str) -> Path:
    """An ed25519 key pair at ``path`` / ``path.pub``, made once (under a lock: boots run concurrently)."""
    path = Path(path)
    if path.is_file() and path.with_name(path.name + ".pub").is_file():
        return path
    with file_lock(path.with_name(f".{path.name}.lock")):
        if not (path.is_file() and path.with_name(path.name + ".pub").is_file()):
            for stale in (path, path.with_name(path.name + ".pub")):
                stale.unlink(missing_ok=True)
            _keygen(path, comment)
    return path


def ensure_login_key() -> Path:
    return ensure_key(login_key_path(), "devops-tasks")


def public_key(path: Path) -> str:
    """``ssh-ed25519 AAAA...`` (type and key, comment dropped) of a key pair's public half."""
    words = Path(str(path) + ".pub").read_text().split()
    return f"{words[0]} {words[1]}"


# -- known_hosts ------------------------------------------------------------------------------

def host_patterns(port: int) -> list[str]:
    """How OpenSSH names the forwarded guest in known_hosts."""
    if port == 22:
        return [GUEST_HOST, "localhost"]
    return [f"[{GUEST_HOST}]:{port}", f"[localhost]:{port}"]


def _hashed_match(entry: str, name: str) -> bool:
    """Does a hashed host entry ``|1|salt|hash`` stand for ``name``?"""
    import base64  # here: most tasks never read a hashed line, and these cost a few ms at start-up
    import hashlib
    import hmac

    try:
        _, _, salt, digest = entry.split("|", 3)
        mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(mac, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


def line_names_port(line: str, port: int) -> bool:
    """Is this known_hosts line about the guest on ``port``?"""
    text = line.strip()
    if not text or text.startswith("#"):
        return False
    hosts = text.split()[0]
    if hosts.startswith("@"):  # @cert-authority / @revoked markers: the hosts are the next field
        parts = text.split()
        hosts = parts[1] if len(parts) > 1 else ""
    names = host_patterns(port)
    for entry in hosts.split(","):
        if entry in names or (entry.startswith("|1|") and any(_hashed_match(entry, n) for n in names)):
            return True
    return False


def replace_host_keys(port: int, keys: Iterable[str], known_hosts: Path | None = None) -> None:
    """Make ``keys`` (``type base64`` strings) the only ones trusted for the guest on ``port``.

    Other lines stay as they are; the file is replaced atomically under a lock, so concurrent boots
    never lose each other's lines and a reader never sees half a file.
    """
    path = Path(known_hosts) if known_hosts is not None else paths.known_hosts_path()
    with file_lock(path.with_name(f".{path.name}.lock")):
        try:
            old = path.read_text(encoding="utf-8").splitlines()
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            old, mode = [], 0o600
        lines = [line for line in old if not line_names_port(line, port)]
        host = host_patterns(port)[0]
        lines += [f"{host} {key.strip()}" for key in keys]
        if lines == old:
            return
        atomic_write_text(path, "".join(f"{line}\n" for line in lines), mode)


def host_key_lines(port: int, known_hosts: Path | None = None) -> list[str]:
    """The known_hosts lines trusted for the guest on ``port``."""
    path = Path(known_hosts) if known_hosts is not None else paths.known_hosts_path()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [line for line in lines if line_names_port(line, port)]


def forget_host(port: int, known_hosts: Path | None = None) -> None:
    replace_host_keys(port, [], known_hosts)


def pin_host_key(port: int, host_key: Path, known_hosts: Path | None = None) -> None:
    """Trust exactly the key the host generated for this guest (guest contract)."""
    replace_host_keys(port, [public_key(host_key)], known_hosts)


def scan_host_keys(port: int, deadline: float, host: str = GUEST_HOST) -> list[str]:
    """Trust on first use for images without the guest contract: ``ssh-keyscan`` until it answers."""
    while True:
        try:
            result = subprocess.run(
                ["ssh-keyscan", "-T", "3", "-p", str(port), host],
                capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise GuestError("ssh-keyscan not found: install openssh-client") from None
        except subprocess.TimeoutExpired:
            result = None
        keys = []
        for line in (result.stdout.splitlines() if result else []):
            words = line.split()
            if len(words) >= 3 and not line.startswith("#"):
                keys.append(f"{words[1]} {words[2]}")
        if keys:
            return keys
        if time.monotonic() >= deadline:
            raise GuestError(f"the guest's SSH server on port {port} gave no host key (ssh-keyscan)")
        time.sleep(0.2)
