"""Applying a review to the host project: all of it or (on a conflict) nothing, and never anything
that could run code the agent wrote without the user's say.

* Every path is checked first: the host's file must still be what the copy held (else a conflict,
  named; nothing is applied), or already be what the agent left (then it is skipped: applying twice
  changes nothing).
* Nothing under ``.git/``, no set-id bit, no device, fifo or socket, no symlink that leads out of
  the project (also through a symlink of the host's) is ever made; those are listed as refused.
* Files are written under a temporary name beside their place, then renamed over it, through
  folders opened one by one without following symlinks: a symlink on the host never redirects a
  write. New files get this user's ownership and umask; an edited file keeps its mode (only the
  executable bit follows the agent, as in git).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .model import Change, Entry, Refusal, is_git_path, link_escapes, quote_path
from .store import Review, ReviewError

CHUNK = 1 << 20
Current = Union[Entry, str, None]  # an entry, "dir", "other" or None (absent)


class Blocked(Exception):
    """A folder on the way to a path is not a folder (a file, or a symlink) on the host."""


class ConflictError(ReviewError):
    """The host changed what the review changes: nothing was applied."""

    def __init__(self, project: Path, conflicts: list[tuple[bytes, str]]):
        self.conflicts = conflicts
        lines = "; ".join(f"{quote_path(path)}: {why}" for path, why in conflicts[:20])
        more = f" (and {len(conflicts) - 20} more)" if len(conflicts) > 20 else ""
        super().__init__(f"nothing applied to {project}: {len(conflicts)} conflict"
                         f"{'s' if len(conflicts) != 1 else ''} with changes made on the host since the copy: "
                         f"{lines}{more}")


@dataclass
class Outcome:
    applied: list[Change] = field(default_factory=list)
    already: list[Change] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Tree:
    """The project folder, reached only through folders opened without following symlinks."""

    def __init__(self, root: Path):
        self.root = Path(root)
        try:
            self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise ReviewError(f"cannot open the project {self.root}: {exc.strerror or exc}") from None

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "Tree":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def folder(self, parts: list[bytes], create: bool = False) -> int:
        """An fd of the folder ``parts`` below the root (the caller closes it)."""
        fd = os.dup(self.fd)
        try:
            for part in parts:
                if part in (b"", b".", b".."):
                    raise Blocked()
                if create:
                    try:
                        os.mkdir(part, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass
                try:
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except NotADirectoryError:
                    raise Blocked() from None
                except OSError as exc:
                    if exc.errno == 40:  # ELOOP: a symlink
                        raise Blocked() from None
                    raise
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    def split(self, path: bytes) -> tuple[list[bytes], bytes]:
        parts = path.split(b"/")
        return parts[:-1], parts[-1]

    def current(self, path: bytes) -> Current:
        """What is at ``path`` now: an :class:`Entry` (hashed), "dir", "other" or None."""
        parents, name = self.split(path)
        try:
            fd = self.folder(parents)
        except FileNotFoundError:
            return None
        try:
            try:
                info = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(info.st_mode):
                target = os.readlink(name, dir_fd=fd)
                return Entry("l", 0o777, len(target), target=target)
            if stat.S_ISDIR(info.st_mode):
                return "dir"
            if not stat.S_ISREG(info.st_mode):
                return "other"
            file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
            try:
                digest = hashlib.sha256()
                while True:
                    block = os.read(file_fd, CHUNK)
                    if not block:
                        break
                    digest.update(block)
            finally:
                os.close(file_fd)
            return Entry("f", stat.S_IMODE(info.st_mode), info.st_size, digest.hexdigest())
        finally:
            os.close(fd)


def _is(current: Current, entry: Optional[Entry]) -> bool:
    if entry is None:
        return current is None
    return isinstance(current, Entry) and entry.same_as(current)


def link_leaves(root: Path, path: bytes, target: bytes) -> bool:
    """The symlink would lead out of the project, by its words or through the host's symlinks."""
    if link_escapes(path, target):
        return True
    base = os.path.realpath(os.fsencode(root))
    where = os.path.realpath(os.path.join(base, os.path.dirname(path), target))
    return where != base and not where.startswith(base + b"/")


def plan_apply(tree: Tree, changes: list[Change]) -> tuple[list[Change], Outcome, list[tuple[bytes, str]]]:
    """(to do, outcome so far, conflicts) for the host as it is now."""
    todo: list[Change] = []
    outcome = Outcome()
    conflicts: list[tuple[bytes, str]] = []
    emptied = {folder for change in changes if change.new is None for folder in _ancestors(change.path)}
    removed = {change.path for change in changes if change.new is None}
    for change in changes:
        new = change.new
        if is_git_path(change.path) or (new is not None and new.kind not in ("f", "l")):
            outcome.refused.append(Refusal(change.path, "never applied"))
            continue
        if new is not None and new.kind == "l" and link_leaves(tree.root, change.path, new.target):
            outcome.refused.append(Refusal(change.path, f"a symlink out of the project (-> {quote_path(new.target)})"))
            continue
        try:
            now = tree.current(change.path)
        except Blocked:
            if change.old is None and any(folder in removed for folder in _ancestors(change.path)):
                todo.append(change)  # a file on its way is one the review deletes first
            else:
                conflicts.append((change.path, "a folder on its way is a file or a symlink on the host now"))
            continue
        except OSError as exc:
            conflicts.append((change.path, f"cannot read it on the host: {exc.strerror or exc}"))
            continue
        if _is(now, new):
            outcome.already.append(change)
        elif _is(now, change.old):
            todo.append(change)
        elif change.old is None and now == "dir" and change.path in emptied:
            todo.append(change)  # the agent put a file where a folder was: the deletions empty it first
        elif change.old is None:
            conflicts.append((change.path, "a folder on the host" if now == "dir" else "added on the host since the copy"))
        elif now is None:
            conflicts.append((change.path, "deleted on the host since the copy"))
        else:
            conflicts.append((change.path, "changed on the host since the copy"))
    return todo, outcome, conflicts


def new_mode(current: Current, old: Optional[Entry], new: Entry, umask: int) -> int:
    """The mode a written file gets: an edited file keeps its own (set-id bits dropped), the
    executable bit following the agent; a new one gets this user's umask."""
    if isinstance(current, Entry) and current.kind == "f" and old is not None and old.kind == "f":
        mode = current.mode & 0o777
        if new.executable and not old.executable:
            mode |= (mode & 0o444) >> 2
        elif old.executable and not new.executable:
            mode &= ~0o111
        return mode
    return (0o777 if new.executable else 0o666) & ~umask


def _temp_name(name: bytes) -> bytes:
    return b"." + name[:100] + b".devops-apply-" + secrets.token_hex(4).encode()


def _write(tree: Tree, review: Review, change: Change, current: Current, umask: int) -> None:
    new = change.new
    parents, name = tree.split(change.path)
    fd = tree.folder(parents, create=True)
    try:
        if new.kind == "l":
            temp = _temp_name(name)
            os.symlink(new.target, temp, dir_fd=fd)
            _rename(temp, name, fd)
            return
        mode = new_mode(current, change.old, new, umask)
        if change.status == "mode":  # the same bytes: the mode alone
            file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
            try:
                os.fchmod(file_fd, mode)
            finally:
                os.close(file_fd)
            return
        temp = _temp_name(name)
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd)
        try:
            digest = hashlib.sha256()
            with open(review.blob(change.blob), "rb") as source:
                while True:
                    block = source.read(CHUNK)
                    if not block:
                        break
                    digest.update(block)
                    view = memoryview(block)
                    while view:
                        view = view[os.write(out, view):]
            if digest.hexdigest() != new.sha256:
                raise ReviewError(f"review {review.id}: its copy of {quote_path(change.path)} is damaged")
            os.fchmod(out, mode)
        except BaseException:
            os.close(out)
            os.unlink(temp, dir_fd=fd)
            raise
        os.close(out)
        _rename(temp, name, fd)
    finally:
        os.close(fd)


def _rename(temp: bytes, name: bytes, fd: int) -> None:
    try:
        os.rename(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
    except BaseException:
        try:
            os.unlink(temp, dir_fd=fd)
        except OSError:
            pass
        raise


def _delete(tree: Tree, path: bytes) -> None:
    parents, name = tree.split(path)
    try:
        fd = tree.folder(parents)
    except FileNotFoundError:
        return
    try:
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            pass
    finally:
        os.close(fd)


def _ancestors(path: bytes) -> list[bytes]:
    parts = path.split(b"/")[:-1]
    return [b"/".join(parts[: i + 1]) for i in range(len(parts))]


def _prune(tree: Tree, deleted: list[bytes], kept: list[bytes]) -> None:
    """Remove the folders the deletions emptied, unless the review puts something in them."""
    needed = {folder for path in kept for folder in _ancestors(path)}
    folders = {folder for path in deleted for folder in _ancestors(path)}
    for folder in sorted(folders - needed, key=lambda f: f.count(b"/"), reverse=True):
        parents, name = tree.split(folder)
        try:
            fd = tree.folder(parents)
        except (OSError, Blocked):
            continue
        try:
            os.rmdir(name, dir_fd=fd)
        except OSError:
            pass  # not empty (files the copy left out), or gone
        finally:
            os.close(fd)


def apply_review(review: Review, project: Optional[Path] = None) -> Outcome:
    """Apply ``review`` to its project (or ``project``); :class:`ConflictError` applies nothing."""
    root = Path(project if project is not None else review.project)
    if not root.is_dir():
        raise ReviewError(f"the project {root} of review {review.id} is not a folder any more")
    changes = review.change_set()
    umask = current_umask()
    with review.locked(), Tree(root) as tree:
        todo, outcome, conflicts = plan_apply(tree, changes.changes)
        if conflicts:
            raise ConflictError(root, conflicts)
        deletions = [c for c in todo if c.new is None]
        writes = [c for c in todo if c.new is not None]
        done: list[Change] = []
        try:
            for change in sorted(deletions, key=lambda c: c.path.count(b"/"), reverse=True):
                _delete(tree, change.path)
                done.append(change)
            _prune(tree, [c.path for c in deletions], [c.path for c in writes])
            for change in sorted(writes, key=lambda c: c.path):
                _write(tree, review, change, tree.current(change.path), umask)
                done.append(change)
        except (OSError, Blocked) as exc:
            failed = next((c for c in todo if c not in done), None)
            where = quote_path(failed.path) if failed is not None else "?"
            reason = getattr(exc, "strerror", None) or str(exc) or "a folder on its way is not a folder"
            raise ReviewError(f"applying review {review.id} stopped at {where}: {reason} ({len(done)} of "
                              f"{len(todo)} changes applied; applying again goes on from there)") from None
        outcome.applied = done
    outcome.refused = changes.refused + outcome.refused
    return outcome
