"""The host side of the copy: which files make the project, and the tar stream that carries them
into the VM while it records what each one was (the snapshot the review is measured against).

In a git work tree the files are git's: tracked and untracked (``git ls-files -co``), ignored ones
left out unless ``include_ignored``, and ``.git`` itself so git works in the VM. Elsewhere the whole
folder. Symlinks travel as symlinks; fifos, sockets and devices stay behind (and are named).
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from ..errors import DevopsError
from .model import Entry, special_kind

COPY_UID = 1000  # the guest's agent user: the copy is theirs
CHUNK = 1 << 20
BLOCK = 512


class SnapshotError(DevopsError):
    """The project cannot be listed or read."""


def git(root: Path, *args: str | bytes, input: Optional[bytes] = None, env: Optional[dict] = None,
        check: bool = True, timeout: float = 120, options: tuple[str, ...] = (),
        error: type[DevopsError] = SnapshotError) -> bytes:
    """``git [OPTIONS] -C root ARGS`` on the host (the user's own git); its stdout. Failures are
    one-line ``error``s naming the git command."""
    try:
        result = subprocess.run(["git", *options, "-C", str(root), *args], input=input, capture_output=True,
                                env=env, timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise error("git is not installed on this machine") from None
    except subprocess.TimeoutExpired:
        raise error(f"git {args[0]!s} in {root} took longer than {timeout:.0f} s") from None
    if check and result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise error(f"git {args[0]!s} in {root} failed: {message[-1] if message else f'status {result.returncode}'}")
    return result.stdout


@dataclass
class Project:
    """The project folder and what git says about it."""

    root: Path
    git_work_tree: bool = False  # git lists its files (the folder is in a work tree)
    git_top: bool = False  # ...and is that work tree's top: reviews become branches there
    copy_git_dir: bool = False  # .git is a folder here: it travels with the files
    head: str = ""  # HEAD's commit when the copy was made ("" none)

    @classmethod
    def inspect(cls, root: Path) -> "Project":
        project = cls(Path(root))
        try:
            top = git(root, "rev-parse", "--show-toplevel", check=False).strip()
        except SnapshotError:  # no git on this machine: a plain folder
            return project
        if not top:
            return project
        project.git_work_tree = True
        project.git_top = os.path.realpath(os.fsdecode(top)) == os.path.realpath(root)
        project.copy_git_dir = project.git_top and (project.root / ".git").is_dir() and not (project.root / ".git").is_symlink()
        project.head = git(root, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False).strip().decode()
        return project

    def ignored(self, paths: Iterable[bytes]) -> set[bytes]:
        """Those of ``paths`` (not in the work tree yet) that git's ignore rules leave out."""
        paths = list(paths)
        if not self.git_work_tree or not paths:
            return set()
        out = git(self.root, "check-ignore", "--stdin", "-z", input=b"\0".join(paths) + b"\0",
                  check=False)
        return {path for path in out.split(b"\0") if path}


@dataclass
class Snapshot:
    """What the copy held: files and symlinks (``entries``), the folders, and what stayed behind."""

    entries: dict[bytes, Entry] = field(default_factory=dict)
    dirs: set[bytes] = field(default_factory=set)
    left_out: list[tuple[bytes, str]] = field(default_factory=list)
    size: int = 0


def walk(root: bytes, rel: bytes = b"") -> Iterator[tuple[bytes, os.stat_result]]:
    """(path, lstat) of ``rel`` under ``root`` and everything below it; symlinks not followed."""
    start = os.path.join(root, rel) if rel else root
    try:
        info = os.lstat(start)
    except FileNotFoundError:
        return
    if rel:
        yield rel, info
    if not stat.S_ISDIR(info.st_mode):
        return
    stack = [rel]
    while stack:
        folder = stack.pop()
        try:
            names = sorted(os.listdir(os.path.join(root, folder) if folder else root))
        except OSError as exc:
            raise SnapshotError(f"cannot list {os.fsdecode(os.path.join(root, folder))}: {exc.strerror}") from None
        for name in names:
            path = os.path.join(folder, name) if folder else name
            try:
                info = os.lstat(os.path.join(root, path))
            except FileNotFoundError:
                continue
            yield path, info
            if stat.S_ISDIR(info.st_mode):
                stack.append(path)


def project_paths(project: Project, include_ignored: bool = False) -> Iterator[tuple[bytes, os.stat_result]]:
    """(path, lstat) of every entry the copy holds, folders included."""
    root = os.fsencode(project.root)
    if not project.git_work_tree:
        yield from walk(root)
        return
    args = ["ls-files", "-z", "-c", "-o"] + ([] if include_ignored else ["--exclude-standard"])
    listed = sorted({p.rstrip(b"/") for p in git(project.root, *args).split(b"\0") if p})
    if project.copy_git_dir:
        listed.append(b".git")
    for path in listed:
        yield from walk(root, path)


class _Stream:
    """Buffered writes to ``sink`` in chunks of about a MiB."""

    def __init__(self, sink: Callable[[bytes], None]):
        self.sink, self.parts, self.size = sink, [], 0

    def write(self, data: bytes) -> None:
        self.parts.append(data)
        self.size += len(data)
        if self.size >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            self.sink(b"".join(self.parts))
            self.parts, self.size = [], 0


def _header(name: bytes, kind: bytes, mode: int, size: int = 0, mtime: float = 0, link: bytes = b"",
            uid: int = COPY_UID) -> bytes:
    info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
    info.type, info.mode, info.size, info.mtime = kind, mode & 0o777, size, int(max(0, mtime))
    info.uid = info.gid = uid
    info.uname = info.gname = ""
    info.linkname = link.decode("utf-8", "surrogateescape")
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")


def _add_file(path: bytes, name: bytes, out: _Stream, uid: int) -> Optional[Entry]:
    """Stream the file (header, bytes, padding); its entry, or None when it cannot be opened (then
    nothing was written). A file that changes while it is read keeps the size it had when opened;
    its hash is then unknown, so applying never takes it for unchanged."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode):
            return None
        size = now.st_size
        out.write(_header(name, tarfile.REGTYPE, now.st_mode, size=size, mtime=now.st_mtime, uid=uid))
        digest, left, steady = hashlib.sha256(), size, True
        while left:
            try:
                block = os.read(fd, min(CHUNK, left))
            except OSError:
                block = b""
            if not block:
                block, steady = b"\0" * min(CHUNK, left), False
            digest.update(block)
            out.write(block)
            left -= len(block)
        if size % BLOCK:
            out.write(b"\0" * (BLOCK - size % BLOCK))
        after = os.fstat(fd)
        steady = steady and (after.st_size, after.st_mtime_ns) == (size, now.st_mtime_ns)
        return Entry("f", stat.S_IMODE(now.st_mode), size, digest.hexdigest() if steady else "")
    finally:
        os.close(fd)


def write_copy(project: Project, sink: Callable[[bytes], None], include_ignored: bool = False,
               paths: Optional[Iterable[tuple[bytes, os.stat_result]]] = None, uid: int = COPY_UID) -> Snapshot:
    """Write the project as a tar stream to ``sink`` (folders before what they hold, everything
    owned by ``uid``, the agent user; no set-id bit) and return what it held."""
    root = os.fsencode(project.root)
    snap = Snapshot()
    out = _Stream(sink)
    for path, info in (paths if paths is not None else project_paths(project, include_ignored)):
        parent = os.path.dirname(path)
        if parent and parent not in snap.dirs:  # a folder git named only through its files
            for folder in _parents(path):
                if folder not in snap.dirs:
                    snap.dirs.add(folder)
                    out.write(_header(folder + b"/", tarfile.DIRTYPE, 0o755, uid=uid))
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            if path not in snap.dirs:
                snap.dirs.add(path)
                out.write(_header(path + b"/", tarfile.DIRTYPE, mode, mtime=info.st_mtime, uid=uid))
        elif stat.S_ISLNK(mode):
            try:
                target = os.readlink(os.path.join(root, path))
            except OSError:
                snap.left_out.append((path, "unreadable"))
                continue
            out.write(_header(path, tarfile.SYMTYPE, 0o777, link=target, mtime=info.st_mtime, uid=uid))
            snap.entries[path] = Entry("l", 0o777, len(target), target=target)
        elif stat.S_ISREG(mode):
            entry = _add_file(os.path.join(root, path), path, out, uid)
            if entry is None:
                snap.left_out.append((path, "unreadable"))
                continue
            snap.entries[path] = entry
            snap.size += entry.size
        else:
            snap.left_out.append((path, special_kind(mode)))
    out.write(b"\0" * (2 * BLOCK))
    out.flush()
    return snap


def _parents(path: bytes) -> list[bytes]:
    parts = path.split(b"/")[:-1]
    return [b"/".join(parts[: i + 1]) for i in range(len(parts))]
