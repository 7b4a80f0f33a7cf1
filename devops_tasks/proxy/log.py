"""The proxy's log: one JSON line per request (time, method, host, port, decision, rule, bytes).

It lives in the VM's folder on the host, out of the guest's reach, mode 0600. Nothing else goes in
a line: no header, no path, no credential. It is rotated (one old file kept) when it passes
:data:`MAX_BYTES` at the start of a run, so it stays bounded.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Iterator

from ..clock import format_time, now_utc

MAX_BYTES = 10 * 1024 * 1024
FIELDS = ("time", "method", "host", "port", "decision", "rule", "bytes")


class ProxyLog:
    """Appends lines to ``path`` (None: keeps nothing). Safe to call from many threads."""

    def __init__(self, path: Path | None, max_bytes: int = MAX_BYTES):
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._fd: int | None = None
        if self.path is not None:
            try:
                if self.path.stat().st_size > max_bytes:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            except FileNotFoundError:
                pass
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.fchmod(self._fd, 0o600)

    def write(self, method: str, host: str, port: int, decision: str, rule: str, nbytes: int = 0) -> dict:
        event = {"time": format_time(now_utc()), "method": method, "host": host, "port": int(port), "decision": decision,
                 "rule": rule, "bytes": int(nbytes)}
        line = (json.dumps(event, ensure_ascii=True, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd is not None:
                os.write(self._fd, line)
        return event

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_events(path: Path) -> Iterator[dict]:
    """The events in ``path`` (a missing file has none; a line that is not an event is skipped)."""
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with handle:
        for line in handle:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and all(key in event for key in FIELDS):
                yield event
