"""The copy's guest side: a standard-library script the host sends into the VM and runs as root.

``python3 -I guest_tool.py COMMAND ...`` with these commands:

* ``prepare DIR UID``: make ``DIR`` an empty folder owned by ``UID`` (old copies beside it, being
  removed in the background since the last run, go too). Refuses (status 3) when a live mount of
  this tool (another command's project mount) is at or under ``DIR``: removing the folder would
  delete the host's files through it. Dead mounts there are detached first.
* ``baseline DIR OUT``: record every entry's ``lstat`` (inode, size, mtime, ctime, mode) in ``OUT``
  right after the copy was unpacked.
* ``list DIR BASELINE``: the entries whose ``lstat`` differs from the baseline, or that are new
  (JSON on stdout), and the baseline's entries that are gone. A change always moves ``ctime``,
  which nobody can set back, so an unchanged ``lstat`` means unchanged content and no file is read
  unless it kept its size (then its sha256 is given, so the host can tell a rewrite of the same
  bytes from an edit).
* ``clear DIR UID``: after the run, ``DIR`` empty again at once; the old copy is removed in the
  background.
* ``ship DIR``: NUL-separated paths on stdin; for each, on stdout, a header (8-byte signed size,
  -1 when it is no longer a regular file; 4-byte mode) and then exactly that many bytes.

Paths are bytes relative to ``DIR``; in JSON they travel latin-1 decoded (every byte one character,
whatever the guest's locale). The walk never follows a symlink and never leaves ``DIR``'s file
system; files are opened with ``O_NOFOLLOW`` below folders opened the same way. The agent's
processes are ended before ``list`` and ``ship`` run, so the tree holds still; what comes out is
still only data to the host, which decides what a change is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys

MARK = "devops-tasks:"  # the source name of every mount this tool's host side makes
TRASH = ".trash-"  # an old copy beside DIR, being removed in the background
HEADER = struct.Struct(">qI")
CHUNK = 1 << 20


def _latin(path: bytes) -> str:
    return path.decode("latin-1")


def _bytes(text: str) -> bytes:
    return text.encode("latin-1")


def walk(root: bytes):
    """(relative path, lstat) for every entry under ``root``, parents before children; folders on
    another file system (a mount) are listed but not entered."""
    top = os.lstat(root)
    stack = [b""]
    while stack:
        rel = stack.pop()
        where = os.path.join(root, rel) if rel else root
        try:
            entries = sorted(os.scandir(where), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            path = os.path.join(rel, entry.name) if rel else entry.name
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            yield path, info
            if stat.S_ISDIR(info.st_mode) and info.st_dev == top.st_dev:
                stack.append(path)


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISLNK(mode):
        return "l"
    if stat.S_ISDIR(mode):
        return "d"
    return "o"


def open_below(root: bytes, rel: bytes) -> int:
    """A read-only fd of ``root/rel``, every component opened without following a symlink."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        parts = rel.split(b"/")
        for part in parts[:-1]:
            if part in (b"", b".", b".."):
                raise OSError(22, "bad path")
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        if parts[-1] in (b"", b".", b".."):
            raise OSError(22, "bad path")
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)


def sha256_of(root: bytes, rel: bytes) -> str:
    fd = open_below(root, rel)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        digest = hashlib.sha256()
        while True:
            block = os.read(fd, CHUNK)
            if not block:
                return digest.hexdigest()
            digest.update(block)
    finally:
        os.close(fd)


def stamp(info: os.stat_result) -> list:
    return [info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_mode]


# --------------------------------------------------------------------------- commands


def _mounts():
    """(mount point, source) of every mount, deepest first."""
    found = []
    with open("/proc/mounts", "rb") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) >= 2:
                point = fields[1].replace(b"\\040", b" ").replace(b"\\011", b"\t").replace(b"\\012", b"\n")
                found.append((point.replace(b"\\134", b"\\"), fields[0].decode("utf-8", "replace")))
    return sorted(found, key=lambda item: len(item[0]), reverse=True)


def _mounts_under(folder: bytes):
    """(mount point, source, alive) of the mounts at or under ``folder``, deepest first."""
    for point, source in _mounts():
        if point == folder or point.startswith(folder + b"/"):
            try:
                os.statvfs(point)  # asks the file system's process: a dead FUSE mount fails
                alive = True
            except OSError:
                alive = False
            yield point, source, alive


def _refuse_live_mount(folder: bytes) -> bool:
    for point, source, alive in _mounts_under(folder):
        if alive and source.startswith(MARK):
            sys.stderr.write(f"{os.fsdecode(point)} holds a live project mount ({source})\n")
            return True
    return False


def prepare(folder: bytes, uid: int) -> int:
    if _refuse_live_mount(folder):
        return 3
    for point, _, _ in _mounts_under(folder):
        subprocess.run(["umount", "-l", point], stderr=subprocess.DEVNULL, check=False)
    if os.path.islink(folder) or os.path.isfile(folder):
        os.unlink(folder)
    elif os.path.isdir(folder):
        shutil.rmtree(folder)
    parent, name = os.path.split(folder)
    for other in os.listdir(parent or b"."):
        if other.startswith(name + TRASH.encode()):  # what a last run left to remove in the background
            shutil.rmtree(os.path.join(parent, other), ignore_errors=True)
    os.mkdir(folder, 0o755)
    os.chown(folder, uid, uid)
    os.chmod(folder, 0o755)
    return 0


def clear(folder: bytes, uid: int) -> int:
    """After a run: ``DIR`` empty at once, the old copy removed in the background (unless some
    mount is in it: then it stays for the next ``prepare``)."""
    if any(True for _ in _mounts_under(folder)):
        return 0
    trash = folder + TRASH.encode() + os.urandom(4).hex().encode()
    os.rename(folder, trash)
    os.mkdir(folder, 0o755)
    os.chown(folder, uid, uid)
    os.chmod(folder, 0o755)
    subprocess.Popen(["rm", "-rf", trash], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)
    return 0


def baseline(folder: bytes, out: str) -> int:
    record = {_latin(path): stamp(info) for path, info in walk(folder)}
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle)
    return 0


def listing(folder: bytes, record_file: str) -> dict:
    """``{"entries": [[path, kind, st_mode, size, sha256, target]...], "gone": [path...]}``."""
    with open(record_file) as handle:
        before = json.load(handle)
    entries = []
    present = set()
    for path, info in walk(folder):
        key = _latin(path)
        kind = kind_of(info.st_mode)
        old = before.get(key)
        if kind != "d":
            present.add(key)
        if old is not None and old == stamp(info):
            continue
        if kind == "d":
            continue  # a folder's own changes are its entries'
        sha, target = "", ""
        if kind == "f" and old is not None and kind_of(old[4]) == "f" and old[1] == info.st_size:
            try:
                sha = sha256_of(folder, path)
            except OSError:
                sha = ""
        elif kind == "l":
            try:
                target = _latin(os.readlink(os.path.join(folder, path)))
            except OSError:
                continue
        entries.append([key, kind, info.st_mode, info.st_size, sha, target])
    gone = [key for key, old in before.items() if kind_of(old[4]) != "d" and key not in present]
    return {"entries": entries, "gone": gone}


def ship(folder: bytes, requests: bytes, out) -> int:
    for rel in requests.split(b"\0"):
        if not rel:
            continue
        try:
            fd = open_below(folder, rel)
        except OSError:
            out.write(HEADER.pack(-1, 0))
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                out.write(HEADER.pack(-1, 0))
                continue
            size = info.st_size
            out.write(HEADER.pack(size, stat.S_IMODE(info.st_mode)))
            left = size
            while left:
                block = os.read(fd, min(CHUNK, left))
                if not block:  # shorter than it was a moment ago: fill, the host finds the hash wrong
                    block = b"\0" * min(CHUNK, left)
                out.write(block)
                left -= len(block)
        finally:
            os.close(fd)
    out.flush()
    return 0


def main(argv) -> int:
    command, args = argv[0], argv[1:]
    os.umask(0o077)
    if command == "prepare":
        return prepare(os.fsencode(args[0]), int(args[1]))
    if command == "baseline":
        return baseline(os.fsencode(args[0]), args[1])
    if command == "clear":
        return clear(os.fsencode(args[0]), int(args[1]))
    if command == "list":
        if _refuse_live_mount(os.fsencode(args[0])):  # another command mounted a host folder there
            return 3
        json.dump(listing(os.fsencode(args[0]), args[1]), sys.stdout)
        sys.stdout.flush()
        return 0
    if command == "ship":
        return ship(os.fsencode(args[0]), sys.stdin.buffer.read(), sys.stdout.buffer)
    sys.stderr.write(f"unknown command {command}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
