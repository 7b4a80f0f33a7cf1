"""A review as a git branch, ``agent/<vm>-<id>``: the agent's commits on top of the copy's HEAD,
and its uncommitted changes as one last commit, for the user's own git (diff, cherry-pick, merge,
push for a pull request).

Made with the host's git plumbing only, which writes objects and one ref and runs nothing the
agent wrote: the agent's commits arrive as a bundle (``git bundle unbundle``: objects checked by
``index-pack``), the last commit's tree is built in a private index from the review's bytes
(``hash-object --no-filters``: no filter runs), and ``update-ref`` creates the branch only if it
does not exist. Hooks and fsmonitor are switched off for every call.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import DevopsError
from .model import Change
from .snapshot import git

SAFE = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "gc.auto=0",
        "-c", "maintenance.auto=false")
# the caller's environment must not point git at another repository, index or object store
_REDIRECTS = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES",
              "GIT_COMMON_DIR", "GIT_NAMESPACE", "GIT_QUARANTINE_PATH", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT")
FALLBACK_NAME, FALLBACK_EMAIL = "devops-tasks", "devops-tasks@localhost"


class BranchError(DevopsError):
    """The branch could not be made (the review itself is fine)."""


@dataclass
class Branch:
    name: str
    commit: str
    agent_commits: int


def branch_name(vm: str, review_id: str) -> str:
    """``agent/<vm>-<id>``, with what a ref name cannot hold (``..``, a ``.lock`` end) replaced."""
    name = re.sub(r"\.\.+", "-", f"{vm}-{review_id}").strip(".")
    if name.endswith(".lock"):
        name = name[: -len(".lock")] + "-lock"
    return f"agent/{name}"


class Git:
    """The host's git in the project, with hooks off and nothing redirected."""

    def __init__(self, root: Path, index: Optional[Path] = None):
        self.root = Path(root)
        env = {k: v for k, v in os.environ.items() if k not in _REDIRECTS and not k.startswith("GIT_CONFIG_KEY_")
               and not k.startswith("GIT_CONFIG_VALUE_")}
        env["GIT_LITERAL_PATHSPECS"] = "1"  # a path is a path, never a glob
        if index is not None:
            env["GIT_INDEX_FILE"] = str(index)
        self.env = env

    def __call__(self, *args: str | bytes, input: Optional[bytes] = None, check: bool = True, env: Optional[dict] = None,
                 timeout: float = 300) -> bytes:
        return git(self.root, *args, input=input, env={**self.env, **(env or {})}, check=check, timeout=timeout,
                   options=SAFE, error=BranchError)

    def text(self, *args: str, **kwargs) -> str:
        return self(*args, **kwargs).decode("utf-8", "replace").strip()


def import_bundle(git: Git, bundle: Path) -> str:
    """Store the bundle's objects (checked by index-pack) and return its HEAD's commit."""
    git("bundle", "verify", "-q", str(bundle))
    heads = git.text("bundle", "unbundle", str(bundle))
    head = ""
    for line in heads.splitlines():
        oid, _, ref = line.partition(" ")
        if ref == "HEAD":
            head = oid
    if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", head) or git.text("cat-file", "-t", head) != "commit":
        raise BranchError("the agent's bundle has no HEAD commit")
    return head


def identity_env(git: Git) -> dict[str, str]:
    """The host user's git identity, or a stand-in when git has none (commit-tree needs one)."""
    env = {}
    if git("var", "GIT_AUTHOR_IDENT", check=False).strip() == b"":
        env.update(GIT_AUTHOR_NAME=FALLBACK_NAME, GIT_AUTHOR_EMAIL=FALLBACK_EMAIL)
    if git("var", "GIT_COMMITTER_IDENT", check=False).strip() == b"":
        env.update(GIT_COMMITTER_NAME=FALLBACK_NAME, GIT_COMMITTER_EMAIL=FALLBACK_EMAIL)
    return env


def make_branch(root: Path, name: str, base: str, bundle: Optional[Path], changes: list[Change],
                blob_path: Callable[[str], Path], message: str, scratch: Path) -> tuple[Optional[Branch], list[str]]:
    """Create ``refs/heads/<name>``; (the branch or None when there is nothing to hold, notes).

    ``base``: the copy's HEAD ("" in a repository without commits). ``bundle``: the agent's commits
    since it (None: none). ``scratch``: a private folder for the index and symlink targets.
    """
    notes: list[str] = []
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        index = Path(tmp) / "index"
        git = Git(root, index)
        tip = base
        if bundle is not None:
            try:
                tip = import_bundle(git, bundle)
            except BranchError as exc:
                notes.append(f"the agent's commits could not be taken over ({exc}); the branch starts at the copy's HEAD")
                tip = base
        if tip:
            git("read-tree", tip)
        else:
            git("read-tree", "--empty")
        tracked = set(git("ls-files", "-z", "--cached").split(b"\0"))
        if base and base != tip:
            tracked |= set(git("ls-tree", "-r", "-z", "--name-only", base).split(b"\0"))
        rows: list[tuple[str, bytes, str, bytes]] = []  # (mode, path, "delete"/"file"/"oid", value)
        untracked = 0
        for number, change in enumerate(changes):
            if change.old is not None and change.path not in tracked:
                if change.new is not None:
                    untracked += 1  # a file the host does not track: in the review only
            elif change.new is None:
                rows.append(("0", change.path, "delete", b""))
            elif change.new.kind == "l":
                target = Path(tmp) / f"link-{number}"
                target.write_bytes(change.new.target)
                rows.append(("120000", change.path, "file", os.fsencode(target)))
            else:
                mode = "100755" if change.new.executable else "100644"
                if change.status == "mode":  # the executable bit alone: the blob is the index's
                    row = git("ls-files", "-z", "-s", "--", change.path)
                    if row.count(b" ") >= 2:
                        rows.append((mode, change.path, "oid", row.split(b" ")[1]))
                else:
                    rows.append((mode, change.path, "file", os.fsencode(blob_path(change.blob))))
        files = [value for _, _, kind, value in rows if kind == "file"]
        hashed = iter(git("hash-object", "-w", "--no-filters", "--stdin-paths",
                          input=b"".join(f + b"\n" for f in files)).split() if files else [])
        zero = b"0" * (len(tip) if tip else 40)
        lines = []
        for mode, path, kind, value in rows:
            oid = zero if kind == "delete" else next(hashed) if kind == "file" else value
            lines.append(mode.encode() + b" " + oid + b"\t" + path + b"\0")
        if lines:
            git("update-index", "-z", "--index-info", input=b"".join(lines))
        tree = git.text("write-tree")
        if untracked:
            notes.append(f"{untracked} change{'s' if untracked != 1 else ''} to files git does not track "
                         "are in the review only")
        tip_tree = git.text("rev-parse", f"{tip}^{{tree}}") if tip else ""
        if tree == tip_tree or (not tip and not lines):
            head = tip
        else:
            parents = ["-p", tip] if tip else []
            head = git.text("commit-tree", tree, *parents, "-m", message, env=identity_env(git))
        if not head or head == base:
            return None, notes
        # the new objects and this one ref are all that changes in .git (no reflog either)
        git("-c", "core.logAllRefUpdates=false", "update-ref", f"refs/heads/{name}", head, "")
        count = int(git.text("rev-list", "--count", head, *([f"^{base}"] if base else [])) or 0)
        agent = count - (0 if head == tip else 1)
        return Branch(name, head, max(0, agent)), notes


def delete_branch(root: Path, name: str, commit: str) -> bool:
    """Delete the branch if it still points where the review made it; whether it did."""
    git = Git(root)
    try:
        git("update-ref", "-d", f"refs/heads/{name}", commit)
        return True
    except BranchError:
        return False
