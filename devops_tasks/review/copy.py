"""The project as a copy in the VM: in before the agent starts, its changes out as a review after.

:class:`ProjectCopy` streams the project into ``/app`` as a tar (owned by the agent user, no
set-id bit), records the copy's ``lstat`` baseline in the guest, and, once the agent's processes
are ended, asks the guest what moved, fetches the bytes the host needs, and stores the review
(with its patch, and in a git project its branch). The host project is never written here: a VM
that dies mid-run loses only the agent's work.

The guest's side is :mod:`.guest_tool`, sent over each run to a root-only folder on the guest's
tmpfs and run with ``python3 -I``. Everything it returns is data checked here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from .. import guest
from ..clock import format_time, now_utc
from ..errors import GuestError
from . import guest_tool
from .branch import BranchError, branch_name, make_branch
from .changes import GuestEntry, finish, parse_listing, plan
from .model import Change, Entry, is_git_path, quote_path
from .patch import TEXT_LIMIT, render, summary
from .snapshot import Project, Snapshot, project_paths, write_copy
from .store import Review, ReviewWriter, new_id, reviews_dir

if TYPE_CHECKING:  # pragma: no cover
    from fabric import Connection

GUEST_TOOL_DIR = "/run/devops-tasks-review"  # the guest's tmpfs, root's alone
IDLE_TIMEOUT = 300.0  # seconds a transfer may stall before it counts as dead
FREE_MARGIN = 256 << 20
Echo = Callable[[str], None]


class CopyError(GuestError):
    """The copy could not be made or read back."""


# --------------------------------------------------------------------------- channels


def run_stream(conn: "Connection", command: str, send: Optional[Callable[[Callable[[bytes], None]], object]] = None,
               receive: Optional[Callable[[Callable[[int], bytes]], object]] = None,
               timeout: float = IDLE_TIMEOUT) -> tuple[int, str, object, object]:
    """Run ``command`` in the guest: ``send`` writes its stdin, then ``receive`` reads its stdout
    (``read(n)`` gives up to n bytes, b"" at the end). (status, stderr, sent, received)."""
    transport = conn.client.get_transport() if conn.is_connected else None
    if transport is None or not transport.is_active():
        raise CopyError("the SSH connection to the VM is closed")
    chan = transport.open_session(timeout=30)
    errors = bytearray()

    def read_errors() -> None:
        with contextlib.suppress(Exception):
            while True:
                chunk = chan.recv_stderr(65536)
                if not chunk:
                    return
                errors.extend(chunk[: max(0, 4000 - len(errors))])

    reader = threading.Thread(target=read_errors, daemon=True)
    try:
        chan.settimeout(timeout)
        chan.exec_command(command)
        reader.start()
        sent = received = None
        if send is not None:
            try:
                sent = send(chan.sendall)
            except OSError:  # the command ended early (its status and stderr say why)
                sent = None
        chan.shutdown_write()
        if receive is not None:
            received = receive(chan.recv)
        while chan.recv(1 << 16):
            pass
        code = chan.recv_exit_status()
        reader.join(timeout=5)
    except OSError as exc:  # socket.timeout included
        raise CopyError(f"talking to the VM failed: {exc.strerror or exc or type(exc).__name__}") from None
    finally:
        chan.close()
    return code, errors.decode("utf-8", "replace").strip(), sent, received


def run_openssh(target: "guest.Target", command: str, send: Optional[Callable[[Callable[[bytes], None]], object]] = None,
                receive: Optional[Callable[[Callable[[int], bytes]], object]] = None,
                timeout: float = IDLE_TIMEOUT) -> tuple[int, str, object, object]:
    """:func:`run_stream` over the OpenSSH client (the VM's shared master): about twice the
    throughput of Paramiko, whose ciphers cost more in the guest. A dead VM ends it through
    ssh's keepalive."""
    argv = guest.ssh_argv(target, ["sh", "-c", command], forward_agent=False, tty=False)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        raise CopyError(f"cannot run ssh: {exc.strerror or exc}") from None
    errors = bytearray()

    def read_errors() -> None:
        with contextlib.suppress(Exception):
            for chunk in iter(lambda: proc.stderr.read1(65536), b""):
                errors.extend(chunk[: max(0, 4000 - len(errors))])

    reader = threading.Thread(target=read_errors, daemon=True)
    reader.start()
    sent = received = None
    try:
        if send is not None:
            try:
                sent = send(proc.stdin.write)
            except OSError:  # the command ended early (its status and stderr say why)
                sent = None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        read = lambda n: os.read(proc.stdout.fileno(), n)  # noqa: E731
        if receive is not None:
            received = receive(read)
        while read(1 << 16):
            pass
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        proc.stdout.close()
        proc.stderr.close()
    return code, errors.decode("utf-8", "replace").strip(), sent, received


def read_all(read: Callable[[int], bytes]) -> bytes:
    parts = []
    while True:
        chunk = read(1 << 20)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


def read_exact(read: Callable[[int], bytes], size: int) -> bytes:
    parts, left = [], size
    while left:
        chunk = read(min(left, 1 << 20))
        if not chunk:
            raise CopyError("the VM's answer ended early")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def human_size(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"  # pragma: no cover


# --------------------------------------------------------------------------- the copy


class ProjectCopy:
    """``with copy.attached(conn, stop_agent):`` around the agent's run; ``copy.review`` after.

    With ``target`` (the VM's) the guest commands go over OpenSSH (:func:`run_openssh`), else over
    the connection's Paramiko session."""

    def __init__(self, root: Path, vm_name: str, include_ignored: bool = False, echo: Echo = print,
                 guest_dir: str = "/app", agent_user: str = "dev", agent_uid: int = 1000,
                 tool_dir: str = GUEST_TOOL_DIR, reviews_root: Optional[Path] = None, python: str = "python3",
                 target: Optional["guest.Target"] = None):
        self.root = Path(root)
        self.vm_name = vm_name
        self.include_ignored = include_ignored
        self.echo = echo
        self.guest_dir = guest_dir
        self.agent_user = agent_user
        self.agent_uid = agent_uid
        self.tool_dir = tool_dir
        self.reviews_root = Path(reviews_root) if reviews_root is not None else reviews_dir(vm_name)
        self.python = python
        self.project: Optional[Project] = None
        self.snapshot: Optional[Snapshot] = None
        self.review: Optional[Review] = None
        self.lost = ""  # why the agent's changes could not be collected ("" when they were)
        self._run = run_stream if target is None else (
            lambda _conn, command, **kw: run_openssh(target, command, **kw))

    # -- guest commands ---------------------------------------------------------------------
    def _tool(self, *words: str) -> str:
        return shlex.join([self.python, "-I", f"{self.tool_dir}/guest_tool.py", *words])

    @property
    def _baseline(self) -> str:
        return f"{self.tool_dir}/baseline.json"

    def _as_agent(self, script: str, *args: str) -> str:
        if not self.agent_user:
            return shlex.join(["sh", "-c", script, "sh", *args])
        return shlex.join(["su", "-s", "/bin/sh", self.agent_user, "-c", script, "--", "sh", *args])

    # -- in -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def attached(self, conn: "Connection", stop_agent: Callable[[], None] = lambda: None) -> Iterator["ProjectCopy"]:
        """Copy in; after the block (also on Ctrl-C or an error) end the agent and collect."""
        self.copy_in(conn)
        try:
            yield self
        finally:
            with contextlib.suppress(Exception):
                stop_agent()
            self.collect(conn)

    def copy_in(self, conn: "Connection") -> Snapshot:
        project = self.project = Project.inspect(self.root)
        listed = list(project_paths(project, self.include_ignored))
        files = sum(1 for _, info in listed if not stat.S_ISDIR(info.st_mode))
        size = sum(info.st_size for _, info in listed if stat.S_ISREG(info.st_mode))
        self.echo(f"Copying {self.root} into the VM at {self.guest_dir} ({files} files, {human_size(size)})...")
        started = time.monotonic()
        source = Path(guest_tool.__file__).read_bytes()
        tool_dir = shlex.quote(self.tool_dir)
        install = (f"umask 077; rm -rf {tool_dir} && mkdir -p {tool_dir} && chmod 700 {tool_dir}"
                   f" && cat > {tool_dir}/guest_tool.py")
        code, errors, _, _ = self._run(conn, install, send=lambda write: write(source), timeout=60)
        if code != 0:
            raise CopyError(f"preparing the copy in the VM failed: {errors or f'status {code}'}")
        command = (f"{self._tool('prepare', self.guest_dir, str(self.agent_uid))} && cd {shlex.quote(self.guest_dir)}"
                   f" && tar -x -f - && {self._tool('baseline', self.guest_dir, self._baseline)}")
        code, errors, snap, _ = self._run(conn, command, send=lambda write: write_copy(project, write, paths=listed,
                                                                                    uid=self.agent_uid))
        if code == 3:
            raise CopyError(f"{self.guest_dir} in the VM holds a live project mount of another command "
                            f"(inv test / serve / claude --live on this VM): stop it first ({errors})")
        if code != 0 or snap is None:
            raise CopyError(f"copying the project into the VM failed: {errors or f'status {code}'}")
        self.snapshot = snap
        for path, why in snap.left_out[:10]:
            self.echo(f"Left out of the copy: {quote_path(path)} ({why})")
        if len(snap.left_out) > 10:
            self.echo(f"Left out of the copy: {len(snap.left_out) - 10} more")
        self.echo(f"Copied in {time.monotonic() - started:.1f} s; the agent works on the copy, "
                  f"{self.root} is not writable from the VM")
        return snap

    # -- out ----------------------------------------------------------------------------------
    def collect(self, conn: "Connection") -> Optional[Review]:
        """Read the agent's changes back as a review (None: no change). Never raises for a lost VM
        (``self.lost`` says why); a KeyboardInterrupt here drops the half-made review and goes on."""
        if self.snapshot is None:
            return None
        writer: Optional[ReviewWriter] = None
        try:
            writer = ReviewWriter(self.reviews_root, new_id())
            review = self._collect(conn, writer)
            if review is None:
                writer.abandon()
            self.review = review
        except KeyboardInterrupt:
            if writer is not None:
                writer.abandon()
            self.lost = "interrupted while reading them back"
            self.echo(f"Interrupted while reading the agent's changes back: no review kept; {self.root} on the "
                      "host is untouched")
            raise
        except Exception as exc:  # the VM or its connection went away, or the guest answered nonsense
            if writer is not None:
                writer.abandon()
            reason = str(exc) or type(exc).__name__
            self.lost = reason
            self.echo(f"The agent's changes could not be read back from the VM ({reason}): they are lost; "
                      f"{self.root} on the host is untouched")
            return None
        with contextlib.suppress(Exception):
            self._run(conn, self._clear_script(), timeout=60)
        return self.review

    def _clear_script(self) -> str:
        """Guest script: the copy goes (in the background), then the tool and its baseline."""
        return f"{self._tool('clear', self.guest_dir, str(self.agent_uid))}; rm -rf {shlex.quote(self.tool_dir)}"

    def _collect(self, conn: "Connection", writer: ReviewWriter) -> Optional[Review]:
        project, snap = self.project, self.snapshot
        code, errors, _, raw = self._run(conn, self._tool("list", self.guest_dir, self._baseline), receive=read_all)
        if code == 3:
            raise CopyError(f"{self.guest_dir} in the VM holds another command's project mount now ({errors})")
        if code != 0:
            raise CopyError(f"listing the copy failed: {errors or f'status {code}'}")
        try:
            entries, gone = parse_listing(json.loads(raw))
        except (ValueError, TypeError) as exc:
            raise CopyError(f"the VM's listing of the copy is unreadable: {exc}") from None
        new_paths = [e.path for e in entries if e.path not in snap.entries and not is_git_path(e.path)]
        ignored = set() if self.include_ignored else project.ignored(new_paths)
        work = plan(snap.entries, entries, gone, ignored)
        self._check_room(work.ship_size, work.ship)
        shipped = self._ship(conn, writer, work.ship) if work.ship else []
        changes = finish(work, snap.entries, shipped)
        used = {c.blob for c in changes.changes if c.blob}
        for _, _, blob in shipped:
            if blob not in used:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(writer.folder / "files" / blob)
        bundle = self._bundle(conn, writer) if project.copy_git_dir else None
        if not changes.changes and bundle is None:
            self._say_nothing(changes)
            return None
        review = Review(folder=writer.folder, id=writer.id, vm=self.vm_name, project=self.root,
                        created=format_time(now_utc()), include_ignored=self.include_ignored,
                        changes=len(changes.changes), refused=len(changes.refused),
                        size=sum(c.new.size for c in changes.changes if c.new is not None and c.new.kind == "f"),
                        base=project.head)
        blob = lambda name: writer.folder / "files" / name  # noqa: E731
        patch, stats = render(changes.changes, self._host_bytes, lambda c: blob(c.blob).read_bytes() if c.blob else None)
        writer.write("changes.patch", patch)
        review.stat = summary(stats)
        if project.git_top:
            name = branch_name(self.vm_name, writer.id)
            try:
                made, notes = make_branch(self.root, name, project.head, bundle, changes.changes, blob,
                                          f"Uncommitted changes of the agent in VM {self.vm_name} (review {writer.id})",
                                          scratch=writer.folder)
                review.notes += notes
                if made is not None:
                    review.branch, review.branch_commit, review.agent_commits = made.name, made.commit, made.agent_commits
            except BranchError as exc:
                review.notes.append(f"no branch: {exc}")
        if bundle is not None:
            with contextlib.suppress(OSError):
                bundle.unlink()
        if not changes.changes and not review.branch:
            self._say_nothing(changes)
            return None
        return writer.commit(review, changes)

    def _say_nothing(self, changes) -> None:
        self.echo("No changes to the project.")
        if changes.refused:
            for line in refused_lines(changes.refused):
                self.echo(line)

    def _host_bytes(self, change: Change) -> Optional[bytes]:
        """The host's bytes of a file as the snapshot had them (None when the host changed it)."""
        old = change.old
        if old is None or old.size > TEXT_LIMIT:
            return None
        try:
            data = (self.root / os.fsdecode(change.path)).read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == old.sha256 else None

    def _check_room(self, size: int, ship: list[GuestEntry]) -> None:
        self.reviews_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        free = shutil.disk_usage(self.reviews_root).free
        if size + FREE_MARGIN > free:
            biggest = max(ship, key=lambda e: e.size)
            raise CopyError(f"the agent's new and edited files ({human_size(size)}; the largest: "
                            f"{quote_path(biggest.path)}, {human_size(biggest.size)}) do not fit in "
                            f"{self.reviews_root} ({human_size(free)} free)")

    def _ship(self, conn: "Connection", writer: ReviewWriter, ship: list[GuestEntry]) -> list[tuple[GuestEntry, Entry, str]]:
        requests = b"".join(entry.path + b"\0" for entry in ship)
        got: list[tuple[GuestEntry, Entry, str]] = []

        def receive(read: Callable[[int], bytes]) -> None:
            for entry in ship:
                size, mode = guest_tool.HEADER.unpack(read_exact(read, guest_tool.HEADER.size))
                if size < 0:
                    continue  # no longer a regular file
                if size > entry.size:
                    raise CopyError(f"the VM sent more bytes of {quote_path(entry.path)} than it listed")
                name, path = writer.new_blob()
                digest = hashlib.sha256()
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    left = size
                    while left:
                        chunk = read(min(left, 1 << 20))
                        if not chunk:
                            raise CopyError("the VM's answer ended early")
                        digest.update(chunk)
                        out.write(chunk)
                        left -= len(chunk)
                got.append((entry, Entry("f", stat.S_IMODE(mode) & 0o777, size, digest.hexdigest()), name))

        code, errors, _, _ = self._run(conn, self._tool("ship", self.guest_dir), send=lambda write: write(requests),
                                        receive=receive)
        if code != 0:
            raise CopyError(f"reading the agent's files failed: {errors or f'status {code}'}")
        return got

    def _bundle(self, conn: "Connection", writer: ReviewWriter) -> Optional[Path]:
        """The agent's commits since the copy's HEAD as a git bundle (None: there are none).

        Made in the guest by the agent user's git (the VM is the agent's already); only its bytes
        reach the host."""
        base = self.project.head
        script = (
            'cd "$1" || exit 3; command -v git >/dev/null 2>&1 || exit 3\n'
            "g() { git -c core.fsmonitor=false -c core.hooksPath=/dev/null -c gc.auto=0 \"$@\"; }\n"
            'h=$(g rev-parse -q --verify "HEAD^{commit}") || exit 3\n'
            '[ "$h" = "$2" ] && exit 4\n'
            'if [ -n "$2" ] && g cat-file -e "$2^{commit}" 2>/dev/null; then g bundle create -q - HEAD "^$2"; exit; fi\n'
            "g bundle create -q - HEAD\n"
        )
        path = writer.folder / "agent.bundle"

        def receive(read: Callable[[int], bytes]) -> int:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            total = 0
            with os.fdopen(fd, "wb") as out:
                while True:
                    chunk = read(1 << 20)
                    if not chunk:
                        return total
                    out.write(chunk)
                    total += len(chunk)

        code, _, _, size = self._run(conn, self._as_agent(script, self.guest_dir, base), receive=receive)
        if code != 0 or not size:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        return path


def refused_lines(refused) -> list[str]:
    """What was refused, short: the paths under .git/ in one line (objects and logs counted)."""
    git = [r.path for r in refused if r.reason == "under .git/"]
    other = [r for r in refused if r.reason != "under .git/"]
    lines = []
    if git:
        named = [p for p in git if not any(part in (b"objects", b"logs") for part in p.split(b"/")[1:2])]
        shown = ", ".join(quote_path(p) for p in named[:8])
        rest = len(git) - len(named[:8])
        lines.append("Refused, never applied: under .git/: " + (shown or "")
                     + (f"{', ' if shown else ''}{rest} more (objects, logs)" if rest else ""))
    for item in other[:20]:
        lines.append(f"Refused, never applied: {quote_path(item.path)}: {item.reason}")
    if len(other) > 20:
        lines.append(f"Refused, never applied: {len(other) - 20} more")
    return lines


def summary_lines(review: Review) -> list[str]:
    """The report of a review: the stat summary, refusals, notes, patch and branch."""
    changes = review.change_set()
    lines = [f"Changes in the copy (review {review.id}, VM {review.vm}, {review.when}):"]
    lines += review.stat
    lines += refused_lines(changes.refused)
    if changes.ignored:
        lines.append(f"Left out: {changes.ignored} new file{'s' if changes.ignored != 1 else ''} the project's "
                     "ignore rules skip (--include-ignored keeps them)")
    lines += [f"Note: {note}" for note in review.notes]
    lines.append(f"Patch: {review.patch_path}")
    if review.branch:
        commits = (f" (with {review.agent_commits} commit{'s' if review.agent_commits != 1 else ''} of the agent's)"
                   if review.agent_commits else "")
        lines.append(f"Branch: {review.branch}{commits}")
    return lines
