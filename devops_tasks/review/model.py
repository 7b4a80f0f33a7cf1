"""What a review is made of: entries (a file, a symlink), changes, refusals; pure data and rules.

Paths are ``bytes`` relative to the project, ``/``-separated, exactly as the file system holds
them (spaces, newlines, any byte but ``/`` and NUL). In JSON they are UTF-8 with surrogate escapes
(readable, and every byte comes back); for people they are quoted the way git quotes them.
"""

from __future__ import annotations

import posixpath
import stat
from dataclasses import dataclass, field
from typing import Any, Optional

def path_text(path: bytes) -> str:
    """A path for JSON: UTF-8 with surrogate escapes (:func:`path_bytes` gives the bytes back)."""
    return path.decode("utf-8", "surrogateescape")


def path_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


_C_ESCAPES = {7: "a", 8: "b", 9: "t", 10: "n", 11: "v", 12: "f", 13: "r", 34: '"', 92: "\\"}


def quote_path(path: bytes) -> str:
    """``path`` as git prints it: as is when plain, else in double quotes with C escapes and octal
    bytes (``"a\\nb"``, ``"caf\\303\\251"``), so no name can break a line or a terminal."""
    if all(32 < b < 127 and b not in (34, 92) or b == 32 for b in path):
        return path.decode("ascii")
    out = []
    for b in path:
        if b in _C_ESCAPES:
            out.append("\\" + _C_ESCAPES[b])
        elif 32 <= b < 127:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def is_git_path(path: bytes) -> bool:
    """A path through a folder named ``.git`` (any case: case-insensitive file systems), where git
    keeps what it runs: config, hooks."""
    return any(part.lower() == b".git" for part in path.split(b"/"))


def link_escapes(path: bytes, target: bytes) -> bool:
    """The symlink ``path -> target`` points outside the project (judged on the words alone)."""
    if not target or target.startswith(b"/"):
        return True
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return joined == b".." or joined.startswith(b"../")


@dataclass(frozen=True)
class Entry:
    """A file (``f``: mode, size, sha256; sha256 "" when unknown) or a symlink (``l``: target)."""

    kind: str
    mode: int = 0o644
    size: int = 0
    sha256: str = ""
    target: bytes = b""

    @property
    def executable(self) -> bool:
        return bool(self.mode & stat.S_IXUSR)

    def same_as(self, other: Optional["Entry"]) -> bool:
        """The same content, in git's sense: kind, bytes (or target) and the executable bit.
        An unknown hash is never the same as anything."""
        if other is None or other.kind != self.kind:
            return False
        if self.kind == "l":
            return self.target == other.target
        return bool(self.sha256) and self.sha256 == other.sha256 and self.executable == other.executable

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "mode": self.mode}
        if self.kind == "f":
            data.update(size=self.size, sha256=self.sha256)
        else:
            data["target"] = path_text(self.target)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Entry":
        return cls(kind=data["kind"], mode=int(data["mode"]), size=int(data.get("size", 0)),
                   sha256=data.get("sha256", ""), target=path_bytes(data.get("target", "")))


@dataclass
class Change:
    """One path the agent changed: ``old`` is the snapshot's entry (None: added), ``new`` the
    agent's (None: deleted); ``blob`` names the review file holding a new file's bytes."""

    path: bytes
    old: Optional[Entry]
    new: Optional[Entry]
    blob: str = ""

    @property
    def status(self) -> str:
        if self.old is None:
            return "added"
        if self.new is None:
            return "deleted"
        if self.old.kind != self.new.kind:
            return "type"
        if self.old.kind == "f" and self.old.sha256 == self.new.sha256:
            return "mode"
        return "modified"

    def to_json(self) -> dict[str, Any]:
        return {"path": path_text(self.path), "old": self.old.to_json() if self.old else None,
                "new": self.new.to_json() if self.new else None, "blob": self.blob}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Change":
        return cls(path_bytes(data["path"]), Entry.from_json(data["old"]) if data["old"] else None,
                   Entry.from_json(data["new"]) if data["new"] else None, data.get("blob", ""))


@dataclass
class Refusal:
    """What the agent did that is never applied, and why."""

    path: bytes
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"path": path_text(self.path), "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Refusal":
        return cls(path_bytes(data["path"]), data["reason"])


@dataclass
class ChangeSet:
    changes: list[Change] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    ignored: int = 0  # new files the project's ignore rules leave out

    def to_json(self) -> dict[str, Any]:
        return {"changes": [c.to_json() for c in self.changes], "refused": [r.to_json() for r in self.refused],
                "ignored": self.ignored}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ChangeSet":
        return cls([Change.from_json(c) for c in data.get("changes", [])],
                   [Refusal.from_json(r) for r in data.get("refused", [])], int(data.get("ignored", 0)))


def special_kind(mode: int) -> str:
    """What a file that is neither a regular file, a folder nor a symlink is, in words."""
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    return "a special file"
