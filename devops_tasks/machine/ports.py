"""Host ports for the VMs' forwards: an explicit port must be free; the default moves to the next free one.

Ports are shared with everything else on the machine (2222 is often taken), so a port counts as free
only when 127.0.0.1 can really be bound and no other VM's record claims it.
"""

from __future__ import annotations

import socket
from typing import Callable, Iterable

from ..errors import VMError

SEARCH_SPAN = 100


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Can ``host:port`` be bound now? (SO_REUSEADDR as QEMU's slirp does, so TIME_WAIT is no obstacle.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(
    explicit: int | None,
    default: int,
    reserved: Iterable[int] = (),
    free: Callable[[int], bool] = port_free,
    span: int = SEARCH_SPAN,
) -> int:
    """The SSH port to forward: ``explicit`` (must be free) or the first free one from ``default`` on."""
    reserved = set(reserved)
    if explicit is not None:
        if not 0 < explicit < 65536:
            raise VMError(f"invalid SSH port {explicit} (use 1-65535)")
        if explicit in reserved or not free(explicit):
            raise VMError(f"SSH port {explicit} is already in use on 127.0.0.1 (choose another with --port)")
        return explicit
    for port in range(default, min(default + span, 65536)):
        if port not in reserved and free(port):
            return port
    raise VMError(f"no free SSH port in {default}-{default + span - 1} on 127.0.0.1 (choose one with --port)")
