"""What a user does with a review: see it, apply it, drop it, list them all; and the question at the
end of a run (``Apply N changes to <project>? [y/N/d]``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from .apply import Outcome, apply_review
from .branch import delete_branch
from .copy import human_size, refused_lines, summary_lines
from .store import APPLIED, Review, mark_applied, remove

Echo = Callable[[str], None]
Ask = Callable[[str], str]


def later(review: Review) -> str:
    return (f"Apply it with: inv claude.apply --review {review.id}  (see it: inv claude.diff --review {review.id}; "
            f"drop it: inv claude.discard --review {review.id})")


def question(review: Review) -> str:
    return f"Apply {review.changes} change{'s' if review.changes != 1 else ''} to {review.project}? [y/N/d] "


def write_bytes(data: bytes) -> None:
    out = getattr(sys.stdout, "buffer", None)
    sys.stdout.flush()
    if out is not None:
        out.write(data)
        out.flush()
    else:  # pragma: no cover - a text-only stdout
        sys.stdout.write(data.decode("utf-8", "replace"))


def show(review: Review, echo: Echo, write: Callable[[bytes], None] = write_bytes, patch: bool = True) -> None:
    """The summary, then the patch."""
    for line in summary_lines(review):
        echo(line)
    if patch:
        try:
            write(review.patch_path.read_bytes())
        except OSError as exc:
            echo(f"(cannot read {review.patch_path}: {exc.strerror or exc})")


def apply_and_report(review: Review, echo: Echo) -> Outcome:
    """Apply the review (all or, on a conflict, nothing: ``ConflictError``), mark it applied, say what
    happened."""
    outcome = apply_review(review)
    if review.state != APPLIED:
        mark_applied(review)
    if outcome.applied:
        echo(f"Applied {len(outcome.applied)} change{'s' if len(outcome.applied) != 1 else ''} to {review.project}"
             f" (review {review.id})")
    if outcome.already:
        echo(f"Already applied: {len(outcome.already)} change{'s' if len(outcome.already) != 1 else ''}")
    if not outcome.applied and not outcome.already:
        echo("Nothing to apply")
    for line in refused_lines(outcome.refused):
        echo(line)
    return outcome


def discard(review: Review, echo: Echo) -> None:
    """Drop the review, and its branch while it still points where the review made it."""
    with review.locked():
        if review.branch and delete_branch(review.project, review.branch, review.branch_commit):
            echo(f"Deleted branch {review.branch}")
        elif review.branch:
            echo(f"Kept branch {review.branch} (it moved since the review made it)")
        remove(review)
    echo(f"Discarded review {review.id}")


def offer(review: Review, tty: bool, echo: Echo, ask: Optional[Ask] = None,
          write: Callable[[bytes], None] = write_bytes) -> bool:
    """After a run: show the review; on a terminal ask to apply it (``d`` shows the patch first).
    Without a terminal nothing is applied. Whether it was applied."""
    from .apply import ConflictError

    show(review, echo, write, patch=False)
    if not tty or not review.changes:
        echo(("Not applied (no terminal). " if review.changes else "") + later(review))
        return False
    ask = ask or input
    while True:
        try:
            answer = ask(question(review)).strip().lower()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C: no
            echo("")
            answer = ""
        if answer in ("d", "diff"):
            write(review.patch_path.read_bytes())
            continue
        if answer in ("y", "yes"):
            try:
                apply_and_report(review, echo)
            except ConflictError as exc:
                echo(f"Error: {exc}")
                echo(later(review))
                return False
            return True
        echo("Not applied. " + later(review))
        return False


def list_lines(reviews: list[Review]) -> list[str]:
    """One line per review: id, VM, time, state, changes, size, branch, project."""
    if not reviews:
        return ["No reviews (a run of inv claude on a copy makes one when the agent changed something)"]
    rows = [("ID", "VM", "TIME", "STATE", "CHANGES", "SIZE", "BRANCH", "PROJECT")]
    for r in reviews:
        rows.append((r.id, r.vm, r.when, r.state, str(r.changes), human_size(r.size), r.branch or "-", str(r.project)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]


def project_of(path: Optional[str]) -> Path:
    return Path(path or ".").expanduser().resolve()

