"""From what the guest reports to a change set: the host decides what a change is (pure).

The guest's listing names the entries whose ``lstat`` moved since the copy and those that went
away. Here each is judged against the snapshot: a rewrite of the same bytes is no change; anything
under ``.git/``, a fifo, socket or device, and a symlink out of the project are refused; a set-id
bit is refused while the file itself is a change; a new file that the project's ignore rules leave
out (build output, caches) is not part of the review. Files whose bytes the host needs are listed
in :attr:`Plan.ship`; :func:`finish` turns their bytes' hashes into changes.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import Any, Iterable

from .model import Change, ChangeSet, Entry, Refusal, is_git_path, link_escapes, quote_path, special_kind

GIT_REASON = "under .git/"
SET_ID_REASON = "a set-id bit (the file is applied without it)"


@dataclass(frozen=True)
class GuestEntry:
    """One entry of the guest's listing (see ``guest_tool.listing``)."""

    path: bytes
    kind: str  # f, l, o
    st_mode: int
    size: int
    sha256: str = ""
    target: bytes = b""


def parse_listing(data: Any) -> tuple[list[GuestEntry], list[bytes]]:
    """The guest's JSON (untrusted: its shape is checked) → (entries, gone paths)."""
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list) or not isinstance(data.get("gone"), list):
        raise ValueError("the guest's listing is not what was asked for")
    entries = []
    for item in data["entries"]:
        path, kind, mode, size, sha, target = item
        raw = _path(path)
        if kind not in ("f", "l", "o") or not isinstance(mode, int) or not isinstance(size, int) or size < 0:
            raise ValueError(f"a bad entry in the guest's listing: {item!r:.200}")
        entries.append(GuestEntry(raw, kind, mode, size, str(sha or ""), str(target or "").encode("latin-1")))
    return entries, [_path(path) for path in data["gone"]]


def _path(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("a path in the guest's listing is not a string")
    raw = text.encode("latin-1")
    parts = raw.split(b"/")
    if not raw or raw.startswith(b"/") or b"\0" in raw or any(p in (b"", b".", b"..") for p in parts):
        raise ValueError(f"a bad path in the guest's listing: {text!r:.200}")
    return raw


@dataclass
class Plan:
    """The changes decided from the listing alone, and the files whose bytes must come over."""

    result: ChangeSet = field(default_factory=ChangeSet)
    ship: list[GuestEntry] = field(default_factory=list)

    @property
    def ship_size(self) -> int:
        return sum(entry.size for entry in self.ship)


def plan(snapshot_entries: dict[bytes, Entry], entries: Iterable[GuestEntry], gone: Iterable[bytes],
         ignored: set[bytes]) -> Plan:
    """Judge the guest's listing against the snapshot (``ignored``: new paths the ignore rules leave
    out; see :meth:`.snapshot.Project.ignored`)."""
    out = Plan()
    refused = out.result.refused
    for entry in entries:
        old = snapshot_entries.get(entry.path)
        if is_git_path(entry.path):
            refused.append(Refusal(entry.path, GIT_REASON))
            continue
        if old is None and entry.path in ignored:
            out.result.ignored += 1
            continue
        if entry.kind == "o":
            refused.append(Refusal(entry.path, special_kind(entry.st_mode)))
            continue
        if entry.kind == "l":
            new = Entry("l", 0o777, len(entry.target), target=entry.target)
            if new.same_as(old):
                continue
            if link_escapes(entry.path, entry.target):
                refused.append(Refusal(entry.path, f"a symlink out of the project (-> {quote_path(entry.target)})"))
                continue
            out.result.changes.append(Change(entry.path, old, new))
            continue
        if entry.st_mode & (stat.S_ISUID | stat.S_ISGID):
            refused.append(Refusal(entry.path, SET_ID_REASON))
        mode = stat.S_IMODE(entry.st_mode) & 0o777
        if old is not None and old.kind == "f" and entry.sha256 and entry.sha256 == old.sha256:
            new = Entry("f", mode, entry.size, entry.sha256)
            if not new.same_as(old):  # the executable bit alone
                out.result.changes.append(Change(entry.path, old, new))
            continue
        out.ship.append(entry)
    for path in gone:
        old = snapshot_entries.get(path)
        if is_git_path(path):
            refused.append(Refusal(path, GIT_REASON))
        elif old is not None:
            out.result.changes.append(Change(path, old, None))
    return out


def finish(plan_: Plan, snapshot_entries: dict[bytes, Entry], shipped: Iterable[tuple[GuestEntry, Entry, str]]) -> ChangeSet:
    """Add the shipped files (entry as listed, entry as received, blob name): a file whose bytes
    turn out to be the snapshot's is no change. The changes come out sorted by path."""
    result = plan_.result
    for listed, received, blob in shipped:
        old = snapshot_entries.get(listed.path)
        if received.same_as(old):
            continue
        result.changes.append(Change(listed.path, old, received, blob))
    result.changes.sort(key=lambda change: change.path)
    result.refused.sort(key=lambda refusal: refusal.path)
    return result
