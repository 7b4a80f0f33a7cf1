"""A review in git's formats: the patch (``git diff``'s, so ``git apply`` takes it) and the summary
(``git diff --stat``'s). Pure: the bytes come from the caller.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable, Optional

from .model import Change, Entry, quote_path

TEXT_LIMIT = 4 << 20  # larger files are shown as binary: a line diff of them says little and costs much
_LINES = re.compile(rb"[^\n]*\n|[^\n]+\Z")


@dataclass
class FileStat:
    path: bytes
    added: int = 0
    removed: int = 0
    binary: bool = False
    old_size: int = 0
    new_size: int = 0
    unknown: bool = False  # the old bytes were not available


def git_mode(entry: Entry) -> str:
    if entry.kind == "l":
        return "120000"
    return "100755" if entry.executable else "100644"


def is_text(data: bytes) -> bool:
    return len(data) <= TEXT_LIMIT and b"\0" not in data[:8000]


def _lines(data: bytes) -> list[bytes]:
    return _LINES.findall(data)


def _range(start: int, stop: int) -> str:
    beginning, length = start + 1, stop - start
    if length == 1:
        return f"{beginning}"
    if not length:
        beginning -= 1
    return f"{beginning},{length}"


def _emit(out: list[bytes], prefix: bytes, line: bytes) -> None:
    out.append(prefix + line)
    if not line.endswith(b"\n"):
        out.append(b"\n\\ No newline at end of file\n")


def hunks(old: bytes, new: bytes, context: int = 3) -> tuple[list[bytes], int, int]:
    """Unified diff hunks of two texts; (lines, added, removed)."""
    a, b = _lines(old), _lines(new)
    out: list[bytes] = []
    added = removed = 0
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for group in matcher.get_grouped_opcodes(context):
        first, last = group[0], group[-1]
        out.append(f"@@ -{_range(first[1], last[2])} +{_range(first[3], last[4])} @@\n".encode())
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                for line in a[i1:i2]:
                    _emit(out, b" ", line)
                continue
            for line in a[i1:i2]:
                _emit(out, b"-", line)
                removed += 1
            for line in b[j1:j2]:
                _emit(out, b"+", line)
                added += 1
    return out, added, removed


def _content(entry: Optional[Entry], data: Optional[bytes]) -> Optional[bytes]:
    if entry is None:
        return b""
    if entry.kind == "l":
        return entry.target
    return data


def _section(path: bytes, old: Optional[Entry], new: Optional[Entry], old_data: Optional[bytes],
             new_data: Optional[bytes], out: list[bytes], stat: FileStat) -> None:
    a, b = quote_path(b"a/" + path), quote_path(b"b/" + path)
    out.append(f"diff --git {a} {b}\n".encode())
    if old is None:
        out.append(f"new file mode {git_mode(new)}\n".encode())
    elif new is None:
        out.append(f"deleted file mode {git_mode(old)}\n".encode())
    elif git_mode(old) != git_mode(new):
        out.append(f"old mode {git_mode(old)}\nnew mode {git_mode(new)}\n".encode())
    stat.old_size = old.size if old is not None else 0
    stat.new_size = new.size if new is not None else 0
    if old is not None and new is not None and old.kind == new.kind == "f" and old.sha256 == new.sha256:
        return  # the mode alone
    before, after = _content(old, old_data), _content(new, new_data)
    if before is None:
        stat.unknown = True
        out.append(b"# the host's copy of this file changed since the snapshot: no diff\n")
        return
    if before == after and before is not LARGE:
        return
    minus = "/dev/null" if old is None else a
    plus = "/dev/null" if new is None else b
    if not (is_text(before) and is_text(after)):
        stat.binary = True
        out.append(f"Binary files {minus} and {plus} differ\n".encode())
        return
    out.append(f"--- {minus}\n+++ {plus}\n".encode())
    lines, stat.added, stat.removed = hunks(before, after)
    out.extend(lines)


LARGE = b"\0(large)"  # stands for a file too large to diff: shown as binary, sizes from its entry


def _read(read: Callable[[Change], Optional[bytes]], change: Change, entry: Optional[Entry]) -> Optional[bytes]:
    if entry is None or entry.kind != "f":
        return None
    if entry.size > TEXT_LIMIT:
        return LARGE
    return read(change)


def render(changes: list[Change], old_bytes: Callable[[Change], Optional[bytes]],
           new_bytes: Callable[[Change], Optional[bytes]]) -> tuple[bytes, list[FileStat]]:
    """The patch of ``changes`` and one :class:`FileStat` each. ``old_bytes``/``new_bytes`` give a
    file's bytes before/after (None: not available); symlinks need neither."""
    out: list[bytes] = []
    stats = []
    for change in changes:
        stat = FileStat(change.path)
        old, new = change.old, change.new
        same = old is not None and new is not None and old.kind == new.kind == "f" and old.sha256 == new.sha256
        old_data = None if same else _read(old_bytes, change, old)  # the mode alone needs no bytes
        new_data = None if same else _read(new_bytes, change, new)
        if old is not None and new is not None and old.kind != new.kind:  # git: a deletion and an addition
            _section(change.path, old, None, old_data, None, out, stat)
            second = FileStat(change.path)
            _section(change.path, None, new, None, new_data, out, second)
            stat.added, stat.new_size, stat.binary = second.added, second.new_size, stat.binary or second.binary
        else:
            _section(change.path, old, new, old_data, new_data, out, stat)
        stats.append(stat)
    return b"".join(out), stats


def summary(stats: list[FileStat], width: int = 80) -> list[str]:
    """``git diff --stat`` lines: `` path | 3 ++-`` ... and the totals line."""
    if not stats:
        return []
    names = [quote_path(s.path) for s in stats]
    name_width = min(max(len(n) for n in names), max(20, width // 2))
    counts = [s.added + s.removed for s in stats]
    count_width = max(len(str(c)) for c in counts)
    bar_room = max(10, width - name_width - count_width - 6)
    most = max(counts) or 1
    lines = []
    for stat, name, count in zip(stats, names, counts):
        if len(name) > name_width:
            name = "..." + name[-(name_width - 3):]
        if stat.unknown:
            detail = "?"
        elif stat.binary:
            detail = f"Bin {stat.old_size} -> {stat.new_size} bytes"
        else:
            scale = min(1.0, bar_room / most)
            plus, minus = stat.added, stat.removed
            if scale < 1:
                plus, minus = (max(1, round(n * scale)) if n else 0 for n in (plus, minus))
            detail = f"{count:>{count_width}} " + "+" * plus + "-" * minus
        lines.append(f" {name:<{name_width}} | {detail}".rstrip())
    added, removed = sum(s.added for s in stats), sum(s.removed for s in stats)
    total = f" {len(stats)} file{'s' if len(stats) != 1 else ''} changed"
    if added:
        total += f", {added} insertion{'s' if added != 1 else ''}(+)"
    if removed:
        total += f", {removed} deletion{'s' if removed != 1 else ''}(-)"
    lines.append(total)
    return lines
