"""The serial console: attach a terminal to QEMU's console socket, or copy its log.

A small Python relay rather than socat, so the detach key is ours (Ctrl-], as in telnet) and it works
wherever Python does. QEMU's socket chardev serves one client at a time.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from pathlib import Path

from ..errors import VMError

DETACH = b"\x1d"
DETACH_NAME = "Ctrl-]"


@contextlib.contextmanager
def raw_terminal(fd: int):
    """Put a tty in raw mode (keys go to the guest, Ctrl-C included) and always restore it."""
    if not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)  # not TCSAFLUSH: keys typed ahead still reach the guest
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def relay(socket_path: str | Path, stdin_fd: int, stdout_fd: int, detach: bytes = DETACH) -> None:
    """Copy bytes both ways until the detach key, end of input, or the VM closing the console."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(socket_path))
    except OSError as exc:
        sock.close()
        raise VMError(f"cannot attach to the serial console {socket_path}: {exc.strerror or exc}") from None
    with sock, raw_terminal(stdin_fd):
        while True:
            ready, _, _ = select.select([sock, stdin_fd], [], [])
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                _write_all(stdout_fd, data)
            if stdin_fd in ready:
                data = os.read(stdin_fd, 4096)
                if not data:
                    return
                if detach in data:
                    before = data[: data.index(detach)]
                    if before:
                        sock.sendall(before)
                    return
                sock.sendall(data)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def copy_log(log: Path, out, follow: bool = False, interval: float = 0.2) -> None:
    """Write the log to ``out`` (a binary stream); ``follow`` keeps going like ``tail -F`` until Ctrl-C,
    reopening the file when a new boot rotates it."""
    pos, inode = 0, None
    try:
        while True:
            try:
                with open(log, "rb") as handle:
                    st = os.fstat(handle.fileno())
                    if st.st_ino != inode or st.st_size < pos:
                        pos, inode = 0, st.st_ino
                    handle.seek(pos)
                    data = handle.read()
            except FileNotFoundError:
                data = b""
            if data:
                pos += len(data)
                out.write(data)
                out.flush()
            if not follow:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return
