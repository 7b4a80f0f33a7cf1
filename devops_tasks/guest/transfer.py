"""Copying files between the host and a guest: one tar stream over one SSH channel.

The guest's own ``tar`` (GNU or busybox) packs or unpacks; the paths reach the guest's shell
only :func:`shlex.quote`-d, and the host side is Python's :mod:`tarfile`, so spaces, quotes,
newlines and non-ASCII in names are just bytes. Folders are copied whole, modes and mtimes
kept, symlinks copied as symlinks (never followed), owners not (files in the guest become
root's, on the host the user's).

What comes *from* the guest is untrusted (root in the guest can send any tar stream), so the
host writes each entry itself (:class:`SafeWriter`): below the destination only, never through a
symlink, links made as links and never followed, set-id bits dropped, devices and FIFOs skipped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import secrets
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Optional

from ..errors import GuestError

if TYPE_CHECKING:  # pragma: no cover
    import tarfile

    from fabric import Connection

GUEST_MARK = ":"
IDLE_TIMEOUT = 300.0  # seconds without a byte either way before a copy gives up
_PROBE_MARK = "devops-tasks-cp:"


@dataclass(frozen=True)
class CopySpec:
    """``vm.cp SRC DST``: exactly one side is the guest's, written ``:PATH``."""

    source: str
    dest: str
    to_guest: bool


def parse_copy(source: str, dest: str) -> CopySpec:
    src_guest, dst_guest = source.startswith(GUEST_MARK), dest.startswith(GUEST_MARK)
    if src_guest == dst_guest:
        where = "both are" if src_guest else "neither is"
        raise GuestError(f"vm.cp copies between this machine and the VM, but {where} written :PATH "
                         "(e.g. inv vm.cp ./src :/root/src, or inv vm.cp :/root/out ./out)")
    if src_guest:
        source = source[1:]
    else:
        dest = dest[1:]
    for side, text in (("source", source), ("destination", dest)):
        if not text:
            raise GuestError(f"vm.cp: the {side} path is empty")
        if "\0" in text:
            raise GuestError(f"vm.cp: the {side} path holds a NUL byte")
    return CopySpec(source=source, dest=dest, to_guest=dst_guest)


def top_name(path: str) -> str:
    """The name a copied file or folder keeps: the last component of ``path``."""
    name = posixpath.basename(path.rstrip("/"))
    if name in ("", ".", ".."):
        raise GuestError(f"vm.cp: name a file or folder to copy, not {path!r}")
    return name


@dataclass
class CopyResult:
    files: int = 0
    folders: int = 0
    links: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # names of devices, FIFOs, sockets left out
    where: str = ""  # the path the copy has in its destination

    def summary(self) -> str:
        parts = [f"{self.files} file{'s' if self.files != 1 else ''}"]
        if self.folders:
            parts.append(f"{self.folders} folder{'s' if self.folders != 1 else ''}")
        if self.links:
            parts.append(f"{self.links} link{'s' if self.links != 1 else ''}")
        return ", ".join(parts) + f" ({self.bytes} bytes)"


# --------------------------------------------------------------------------- guest side scripts


def probe_script(path: str) -> str:
    """Guest script: what ``path`` is (``dir``, ``file``, ``missing``) and whether its parent is a
    folder (``parent`` / ``noparent``)."""
    parent = posixpath.dirname(path.rstrip("/")) or ("/" if path.startswith("/") else ".")
    p, d = shlex.quote(path), shlex.quote(parent)
    return (
        f"if [ -d {p} ]; then k=dir; elif [ -e {p} ] || [ -L {p} ]; then k=file; else k=missing; fi; "
        f"if [ -d {d} ]; then q=parent; else q=noparent; fi; echo {_PROBE_MARK}$k:$q"
    )


def parse_probe(output: str) -> tuple[str, bool]:
    for line in output.splitlines():
        if line.startswith(_PROBE_MARK):
            kind, _, parent = line[len(_PROBE_MARK):].strip().partition(":")
            return kind, parent == "parent"
    raise GuestError("vm.cp: the VM did not answer the path check")


def unpack_command(folder: str) -> str:
    """Guest command: unpack the tar stream on stdin into ``folder`` (modes kept: root does)."""
    return f"tar -x -f - -C {shlex.quote(folder)}"


def pack_command(path: str) -> str:
    """Guest command: ``path`` (file or folder, links as links) as a tar stream on stdout."""
    parent = posixpath.dirname(path.rstrip("/")) or ("/" if path.startswith("/") else ".")
    return f"cd {shlex.quote(parent)} && tar -c -f - ./{shlex.quote(top_name(path))}"


def _probe(conn: "Connection", path: str) -> tuple[str, bool]:
    from .commands import capture

    code, out, err = capture(conn, probe_script(path), timeout=60)
    if code != 0:
        raise GuestError(f"vm.cp: checking {path!r} in the VM failed: {err.strip() or f'status {code}'}")
    return parse_probe(out)


# --------------------------------------------------------------------------- host → guest


def plan_to_guest(source: Path, dest: str, kind: str, parent_ok: bool, source_is_dir: bool) -> tuple[str, str]:
    """Where the copy lands in the guest: (folder to unpack in, name of the copy), as ``cp -r``
    does: into ``dest`` when it is a folder, else as ``dest``."""
    name = top_name(os.path.abspath(source))  # "dir/", "." and "a/.." name folders too
    if kind == "dir":
        return dest, name
    if dest.endswith("/"):
        raise GuestError(f"vm.cp: the VM has no folder {dest!r}")
    if kind == "file" and source_is_dir:
        raise GuestError(f"vm.cp: {dest!r} in the VM is a file, not a folder: cannot copy the folder "
                         f"{str(source)!r} onto it")
    if not parent_ok:
        parent = posixpath.dirname(dest) or "."
        raise GuestError(f"vm.cp: the VM has no folder {parent!r} (create it first)")
    return posixpath.dirname(dest) or ".", posixpath.basename(dest)


def copy_to_guest(conn: "Connection", source: os.PathLike | str, dest: str) -> CopyResult:
    """Copy the host's ``source`` (a file or a whole folder) into the guest at ``dest``."""
    src = Path(source)
    try:
        info = os.lstat(src)
    except FileNotFoundError:
        raise GuestError(f"vm.cp: {str(src)!r} does not exist on this machine") from None
    except OSError as exc:
        raise GuestError(f"vm.cp: cannot read {str(src)!r}: {exc.strerror}") from None
    kind, parent_ok = _probe(conn, dest)
    folder, name = plan_to_guest(src, dest, kind, parent_ok, stat.S_ISDIR(info.st_mode))
    result = CopyResult(where=posixpath.join(folder, name))

    def send(chan) -> None:
        import tarfile

        with tarfile.open(fileobj=_ChannelWriter(chan), mode="w|", format=tarfile.GNU_FORMAT) as tar:
            _add_tree(tar, src, name, result)

    _exchange(conn, unpack_command(folder), send=send, what=f"copying into {folder!r} in the VM")
    return result


def _as_root(member: tarfile.TarInfo) -> tarfile.TarInfo:
    member.uid = member.gid = 0
    member.uname = member.gname = "root"
    return member


def _add_tree(tar: tarfile.TarFile, path: Path, arcname: str, result: CopyResult) -> None:
    """``path`` and (for a folder) everything below it, sorted, links as links."""
    try:
        member = tar.gettarinfo(str(path), arcname)
    except OSError as exc:
        raise GuestError(f"vm.cp: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if member is None or not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        result.skipped.append(str(path))
        return
    _as_root(member)
    if member.isreg():
        try:
            with open(path, "rb") as handle:
                tar.addfile(member, handle)
        except OSError as exc:
            raise GuestError(f"vm.cp: cannot read {str(path)!r}: {exc.strerror or exc}") from None
        result.files += 1
        result.bytes += member.size
    elif member.isdir():
        tar.addfile(member)
        result.folders += 1
        try:
            children = sorted(os.listdir(path))
        except OSError as exc:
            raise GuestError(f"vm.cp: cannot list {str(path)!r}: {exc.strerror or exc}") from None
        for child in children:
            _add_tree(tar, path / child, f"{arcname}/{child}", result)
    elif member.islnk():  # a second name of a file already sent
        tar.addfile(member)
        result.files += 1
    else:
        tar.addfile(member)
        result.links += 1


# --------------------------------------------------------------------------- guest → host


def plan_from_guest(source: str, dest: Path, source_is_dir: bool) -> tuple[Path, str]:
    """Where the copy lands on the host: (folder, name of the copy), as ``cp -r`` does."""
    name = top_name(source)
    if dest.is_dir():
        return dest, name
    if str(dest).endswith("/"):
        raise GuestError(f"vm.cp: there is no folder {str(dest)!r} on this machine")
    if (dest.exists() or dest.is_symlink()) and source_is_dir:
        raise GuestError(f"vm.cp: {str(dest)!r} is a file, not a folder: cannot copy the folder {source!r} onto it")
    parent = dest.parent
    if not parent.is_dir():
        raise GuestError(f"vm.cp: there is no folder {str(parent)!r} on this machine (create it first)")
    return parent, dest.name


def copy_from_guest(conn: "Connection", source: str, dest: os.PathLike | str) -> CopyResult:
    """Copy the guest's ``source`` (a file or a whole folder) to ``dest`` on the host."""
    kind, _ = _probe(conn, source)
    if kind == "missing":
        raise GuestError(f"vm.cp: {source!r} does not exist in the VM")
    folder, name = plan_from_guest(source, Path(dest), kind == "dir")
    result = CopyResult(where=str(folder / name))

    def receive(chan) -> None:
        import tarfile

        with SafeWriter(folder, top_name(source), name, result) as writer, \
                tarfile.open(fileobj=_ChannelReader(chan), mode="r|") as tar:
            for member in tar:
                writer.write(member, tar)

    _exchange(conn, pack_command(source), receive=receive, what=f"copying {source!r} from the VM")
    return result


class SafeWriter:
    """Writes tar members below ``folder`` without trusting them.

    Names are made relative (``./`` stripped), must start with ``top`` (renamed ``rename``) and hold
    no ``..``; every folder on the way is opened with ``O_NOFOLLOW`` relative to the one before, so
    a symlink (or a file) where a folder should be stops the copy; a file is written to a fresh
    temporary name and renamed over the old entry, so an existing symlink is replaced, never
    written through. Folder modes and times are set last (a read-only folder still gets its files).
    """

    def __init__(self, folder: Path, top: str, rename: str, result: CopyResult):
        self.top, self.rename, self.result = top, rename, result
        self.root = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        self.folders: list[tuple[tuple[str, ...], int, float]] = []

    def __enter__(self) -> "SafeWriter":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                for parts, mode, mtime in sorted(self.folders, key=lambda item: -len(item[0])):
                    self._finish_folder(parts, mode, mtime)
        finally:
            os.close(self.root)

    def parts(self, name: str) -> tuple[str, ...]:
        raw = name
        while name.startswith("./"):
            name = name[2:]
        parts = tuple(part for part in name.split("/") if part not in ("", "."))
        if not parts or ".." in parts or name.startswith("/") or parts[0] != self.top:
            raise GuestError(f"vm.cp: refused an entry the VM sent outside the copy: {raw!r}")
        return (self.rename, *parts[1:])

    def _open_parent(self, parts: tuple[str, ...]) -> int:
        """A descriptor of the folder that holds ``parts[-1]`` (made 0700 when missing)."""
        fd = os.dup(self.root)
        try:
            for part in parts[:-1]:
                try:
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(part, 0o700, dir_fd=fd)
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nxt
            return fd
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise GuestError(f"vm.cp: refused to write {'/'.join(parts)!r}: a link or a file stands where "
                                 "a folder should be") from None
            raise

    def write(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        parts = self.parts(member.name)
        try:
            self._write(parts, member, tar)
        except GuestError:
            raise
        except OSError as exc:
            raise GuestError(f"vm.cp: cannot write {'/'.join(parts)!r}: {exc.strerror or exc}") from None

    def _write(self, parts: tuple[str, ...], member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        mode = member.mode & 0o777  # set-id and sticky bits dropped
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            self.result.skipped.append("/".join(parts))
            return
        parent = self._open_parent(parts)
        name = parts[-1]
        try:
            existing = _lstat(name, parent)
            if member.isdir():
                if existing is None:
                    os.mkdir(name, 0o700, dir_fd=parent)
                elif not stat.S_ISDIR(existing.st_mode):
                    raise GuestError(f"vm.cp: {'/'.join(parts)!r} exists and is not a folder: not replaced by one")
                self.folders.append((parts, mode, member.mtime))
                self.result.folders += 1
                return
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                raise GuestError(f"vm.cp: {'/'.join(parts)!r} is a folder: not replaced by a file")
            tmp = f".devops-tasks-cp.{secrets.token_hex(8)}"
            try:
                if member.isreg():
                    self._write_file(tmp, parent, tar.extractfile(member), mode, member.mtime)
                    self.result.files += 1
                    self.result.bytes += member.size
                elif member.issym():
                    os.symlink(member.linkname, tmp, dir_fd=parent)
                    self.result.links += 1
                else:  # a hard link to an entry written before
                    target = self.parts(member.linkname)
                    source_parent = self._open_parent(target)
                    try:
                        os.link(target[-1], tmp, src_dir_fd=source_parent, dst_dir_fd=parent,
                                follow_symlinks=False)
                    finally:
                        os.close(source_parent)
                    self.result.files += 1
                os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=parent)
                raise
        finally:
            os.close(parent)

    @staticmethod
    def _write_file(name: str, parent: int, data: Optional[IO[bytes]], mode: int, mtime: float) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=parent)
        try:
            while data is not None:
                chunk = data.read(1 << 20)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)

    def _finish_folder(self, parts: tuple[str, ...], mode: int, mtime: float) -> None:
        parent = self._open_parent(parts)
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            os.fchmod(fd, mode)
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)


def _lstat(name: str, parent: int) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- the channel


class _ChannelWriter:
    """A write-only file over a channel's stdin (what ``tarfile`` mode ``w|`` needs)."""

    def __init__(self, chan):
        self.chan = chan

    def write(self, data: bytes) -> int:
        self.chan.sendall(data)
        return len(data)


class _ChannelReader:
    """A read-only file over a channel's stdout (what ``tarfile`` mode ``r|`` needs)."""

    def __init__(self, chan):
        self.chan = chan

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while True:
                chunk = self.chan.recv(1 << 16)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
        out = bytearray()
        while len(out) < size:
            chunk = self.chan.recv(size - len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)


def _exchange(conn: "Connection", command: str, what: str, send: Optional[Callable] = None,
              receive: Optional[Callable] = None) -> None:
    """Run ``command`` in the guest on a channel of its own; ``send`` writes its stdin, ``receive``
    reads its stdout. The guest's status and last error line decide success."""
    import tarfile
    import threading

    transport = conn.client.get_transport() if conn.is_connected else None
    if transport is None:
        conn.open()
        transport = conn.client.get_transport()
    chan = transport.open_session(timeout=IDLE_TIMEOUT)
    errors: list[bytes] = []

    def read_errors() -> None:
        with contextlib.suppress(OSError, EOFError):
            while True:
                chunk = chan.recv_stderr(4096)
                if not chunk:
                    return
                if sum(map(len, errors)) < 8192:
                    errors.append(chunk)

    reader = threading.Thread(target=read_errors, name="cp-stderr", daemon=True)
    failure: Optional[BaseException] = None
    try:
        chan.settimeout(IDLE_TIMEOUT)
        chan.exec_command(command)
        reader.start()
        try:
            if send is not None:
                send(chan)
            chan.shutdown_write()  # the guest's stdin ends here
            if receive is not None:
                receive(chan)
                while chan.recv(1 << 16):  # what follows the tar's end (padding)
                    pass
        except (OSError, EOFError, tarfile.TarError) as exc:
            failure = exc
        code = chan.recv_exit_status()
        reader.join(timeout=5)
    finally:
        chan.close()
    detail = b"".join(errors).decode("utf-8", "replace").strip().splitlines()
    if code != 0:
        raise GuestError(f"vm.cp: {what} failed: {detail[-1] if detail else f'status {code}'}")
    if failure is not None:
        reason = getattr(failure, "strerror", None) or str(failure) or type(failure).__name__
        raise GuestError(f"vm.cp: {what} failed: {reason}")
