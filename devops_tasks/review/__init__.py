"""Reviews: ``inv claude`` works on a copy of the project in the VM; its changes reach the host
project only when the user applies them.

One concern a module:

* :mod:`.snapshot`: which files make the project, and the tar stream that copies them in while it
  records what each one was.
* :mod:`.guest_tool`: the guest's side (prepare ``/app``, the ``lstat`` baseline, what moved, the
  bytes of the files asked for), a standard-library script run as root in the VM.
* :mod:`.changes`: from the guest's listing to a change set, refusals included (pure).
* :mod:`.patch`: the patch and the ``git diff --stat`` summary (pure).
* :mod:`.copy`: :class:`ProjectCopy`, the copy in and the review out over a Fabric connection.
* :mod:`.store`: reviews on disk under the VM's folder.
* :mod:`.branch`: the review as the git branch ``agent/<vm>-<id>``.
* :mod:`.apply`: applying a review to the host project, safely.
* :mod:`.actions`: show, apply, discard, list, and the question after a run.
"""

from .actions import apply_and_report, discard, later, list_lines, offer, project_of, show
from .apply import ConflictError, Outcome, apply_review
from .copy import ProjectCopy, summary_lines
from .store import APPLIED, PENDING, Review, ReviewError, all_reviews, find, reviews_dir

__all__ = [
    "APPLIED",
    "ConflictError",
    "Outcome",
    "PENDING",
    "ProjectCopy",
    "Review",
    "ReviewError",
    "all_reviews",
    "apply_and_report",
    "apply_review",
    "discard",
    "find",
    "later",
    "list_lines",
    "offer",
    "project_of",
    "reviews_dir",
    "show",
    "summary_lines",
]
