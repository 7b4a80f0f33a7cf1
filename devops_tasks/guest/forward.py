"""Local port forwards: 127.0.0.1:PORT on the host to a port in the guest, over a Fabric connection."""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import threading
from typing import TYPE_CHECKING, Optional

from ..errors import GuestError
from .connection import LOOPBACK

if TYPE_CHECKING:  # pragma: no cover
    from fabric import Connection


def bind_local(port: int, host: str = LOOPBACK) -> socket.socket:
    """A listening socket on host:port, or a clear error when the port is taken."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise GuestError(f"invalid port {port!r} (use 1-65535)")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise GuestError(
                f"port {port} on {host} is already in use on this machine; choose another with --port"
            ) from None
        if exc.errno == errno.EACCES:
            raise GuestError(f"no permission to listen on {host}:{port}; choose a port above 1023") from None
        raise GuestError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class Forward:
    """Forward ``127.0.0.1:local_port`` on the host to ``remote_host:remote_port`` as the guest
    sees it, over the connection, for the ``with`` block (Ctrl-C safe).

    The listening socket is bound in the constructor, so a taken port fails before anything starts.
    """

    def __init__(
        self,
        conn: "Connection",
        local_port: int,
        remote_port: Optional[int] = None,
        remote_host: str = LOOPBACK,
        local_host: str = LOOPBACK,
        sock: Optional[socket.socket] = None,
    ):
        self.conn = conn
        self.local_port = local_port
        self.remote_port = remote_port or local_port
        self.remote_host = remote_host
        self.listener = sock if sock is not None else bind_local(local_port, local_host)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._open: set = set()

    def __enter__(self) -> "Forward":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        thread = threading.Thread(target=self._accept_loop, name="forward-accept", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            items = list(self._open)
        for item in items:
            with contextlib.suppress(Exception):
                item.close()
        for thread in self._threads:
            thread.join(timeout=2)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.listener], [], [], 0.2)
            except (OSError, ValueError):
                return
            if not ready:
                continue
            try:
                client, peer = self.listener.accept()
            except OSError:
                continue
            thread = threading.Thread(target=self._serve, args=(client, peer), daemon=True)
            thread.start()

    def _serve(self, client: socket.socket, peer) -> None:
        transport = self.conn.client.get_transport()
        try:
            chan = transport.open_channel(
                "direct-tcpip", (self.remote_host, self.remote_port), peer, timeout=10
            )
        except Exception:
            client.close()  # nothing listens in the guest yet: refuse like a closed port
            return
        with self._lock:
            self._open.update((client, chan))
        try:
            client_open = chan_open = True
            while (client_open or chan_open) and not self._stop.is_set():
                watch = [s for s, is_open in ((client, client_open), (chan, chan_open)) if is_open]
                ready, _, _ = select.select(watch, [], [], 0.5)
                if client in ready:
                    data = client.recv(1 << 16)
                    if data:
                        chan.sendall(data)
                    else:
                        client_open = False
                        chan.shutdown_write()
                if chan in ready:
                    data = chan.recv(1 << 16)
                    if data:
                        client.sendall(data)
                    else:
                        chan_open = False
                        client.shutdown(socket.SHUT_WR)
        except (OSError, EOFError):
            pass
        finally:
            with self._lock:
                self._open.discard(client)
                self._open.discard(chan)
            with contextlib.suppress(Exception):
                chan.close()
            with contextlib.suppress(OSError):
                client.close()
