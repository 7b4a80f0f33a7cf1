"""Reviews on disk: ``~/.core/vms/<vm>/reviews/<id>/`` (0700, files 0600).

A review folder holds ``review.json`` (what, where, when, its state and branch), ``changes.json``
(the change set), ``files/`` (the agent's bytes of each new or edited file, by number: never by
the agent's names), ``changes.patch`` and a ``lock``. It is written under a hidden name and renamed
into place when complete, so a run that dies halfway leaves no half review in the list.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from .. import paths
from ..clock import format_time, now_utc, parse_time
from ..errors import DevopsError
from ..fsutil import atomic_write_text, file_lock
from .model import ChangeSet

PENDING, APPLIED = "pending", "applied"
PARTIAL_PREFIX = ".partial-"


class ReviewError(DevopsError):
    """A review cannot be found, read, applied or removed."""


def reviews_dir(vm_name: str) -> Path:
    return paths.vms_dir() / vm_name / "reviews"


def new_id() -> str:
    """``20260614-153012-a1b2``: sorts by time, and a short random tail keeps two runs apart."""
    return now_utc().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


@dataclass
class Review:
    """One review: the agent's change to one project, kept until applied or discarded."""

    folder: Path
    id: str
    vm: str
    project: Path
    created: str
    state: str = PENDING
    include_ignored: bool = False
    changes: int = 0
    refused: int = 0
    size: int = 0  # bytes of the agent's new and edited files
    base: str = ""  # the project's HEAD when the copy was made
    branch: str = ""  # agent/<vm>-<id> in the project's repository
    branch_commit: str = ""
    agent_commits: int = 0
    notes: list[str] = field(default_factory=list)
    stat: list[str] = field(default_factory=list)  # the git diff --stat lines
    applied: str = ""
    order: int = field(default_factory=time.time_ns)  # sorts reviews made within one second

    FIELDS = ("id", "vm", "created", "state", "include_ignored", "changes", "refused", "size", "base", "branch",
              "branch_commit", "agent_commits", "notes", "stat", "applied", "order")

    @property
    def patch_path(self) -> Path:
        return self.folder / "changes.patch"

    @property
    def files_dir(self) -> Path:
        return self.folder / "files"

    def blob(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ReviewError(f"review {self.id}: a bad file name {name!r} in changes.json")
        return self.files_dir / name

    def change_set(self) -> ChangeSet:
        try:
            return ChangeSet.from_json(json.loads((self.folder / "changes.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ReviewError(f"review {self.id}: cannot read {self.folder / 'changes.json'}: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.FIELDS}
        data["project"] = os.fsdecode(self.project)
        return data

    def save(self) -> None:
        atomic_write_text(self.folder / "review.json", json.dumps(self.to_json(), indent=2) + "\n", mode=0o600)

    @classmethod
    def load(cls, folder: Path) -> "Review":
        try:
            data = json.loads((folder / "review.json").read_text(encoding="utf-8"))
            values = {name: data[name] for name in cls.FIELDS if name in data}
            return cls(folder=folder, project=Path(os.fsdecode(data["project"])), **values)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ReviewError(f"cannot read the review in {folder}: {exc}") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One apply or discard of this review at a time."""
        with file_lock(self.folder / "lock"):
            yield

    @property
    def when(self) -> str:
        try:
            return parse_time(self.created).astimezone().strftime("%Y-%m-%d %H:%M")
        except ValueError:
            return self.created


class ReviewWriter:
    """A review being written: ``files/`` fills, then :meth:`commit` moves it into place."""

    def __init__(self, root: Path, review_id: str):
        self.root = Path(root)
        self.id = review_id
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.folder = self.root / f"{PARTIAL_PREFIX}{review_id}"
        self.folder.mkdir(mode=0o700)
        (self.folder / "files").mkdir(mode=0o700)
        self.count = 0

    def new_blob(self) -> tuple[str, Path]:
        self.count += 1
        name = str(self.count)
        return name, self.folder / "files" / name

    def write(self, name: str, data: bytes) -> None:
        fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)

    def commit(self, review: Review, changes: ChangeSet) -> Review:
        self.write("changes.json", json.dumps(changes.to_json(), indent=1).encode("utf-8") + b"\n")
        final = self.root / self.id
        review.folder = self.folder
        review.save()
        os.rename(self.folder, final)
        review.folder = final
        return review

    def abandon(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def all_reviews(vms_root: Optional[Path] = None) -> list[Review]:
    """Every review of every VM, oldest first (unreadable ones are skipped)."""
    root = Path(vms_root) if vms_root is not None else paths.vms_dir()
    found = []
    for folder in sorted(root.glob("*/reviews/*")):
        if folder.name.startswith(".") or not (folder / "review.json").is_file():
            continue
        with contextlib.suppress(ReviewError):
            found.append(Review.load(folder))
    return sorted(found, key=lambda r: (r.created, r.order, r.id))


def same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def find(reviews: list[Review], ref: str = "", project: Optional[Path] = None) -> Review:
    """The review named ``ref`` (its id or a unique start of it), else the latest pending one of
    ``project``."""
    if ref:
        matches = [r for r in reviews if r.id == ref] or [r for r in reviews if r.id.startswith(ref)]
        if not matches:
            raise ReviewError(f"no review {ref!r} (list them: inv claude.diff --list)")
        if len(matches) > 1:
            raise ReviewError(f"--review {ref!r} matches {len(matches)} reviews: "
                              f"{', '.join(r.id for r in matches[:5])}; give more of the id")
        return matches[0]
    mine = [r for r in reviews if r.state == PENDING and (project is None or same_folder(r.project, project))]
    if not mine:
        where = f" for {project}" if project is not None else ""
        raise ReviewError(f"no pending review{where} (list them: inv claude.diff --list)")
    return mine[-1]


def remove(review: Review) -> None:
    """Delete the review's folder."""
    try:
        shutil.rmtree(review.folder)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ReviewError(f"cannot remove {review.folder}: {exc.strerror or exc}") from None


def mark_applied(review: Review) -> None:
    review.state = APPLIED
    review.applied = format_time(now_utc())
    review.save()
