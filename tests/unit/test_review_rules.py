"""The pure rules of a review: what is a change, what is refused, the patch git applies, the
summary, finding a review by id."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from devops_tasks.review import changes as ch
from devops_tasks.review.model import Change, Entry, is_git_path, link_escapes, quote_path
from devops_tasks.review.patch import render, summary
from devops_tasks.review.store import Review, ReviewError, find


def test_quote_path_is_gits():
    assert quote_path(b"plain/name.txt") == "plain/name.txt"
    assert quote_path(b"with space") == "with space"
    assert quote_path(b"new\nline") == '"new\\nline"'
    assert quote_path(b"caf\xc3\xa9") == '"caf\\303\\251"'
    assert quote_path(b'q"\\') == '"q\\"\\\\"'
    assert quote_path(b"esc\x1b[31m") == '"esc\\033[31m"'  # nothing reaches a terminal raw


@pytest.mark.parametrize("path, refused", [(b".git/config", True), (b".GIT/hooks/x", True), (b"sub/.git/config", True),
                                           (b".gitignore", False), (b"a/.github/x", False), (b"git/x", False)])
def test_git_paths(path, refused):
    assert is_git_path(path) is refused


@pytest.mark.parametrize("path, target, escapes", [
    (b"a", b"b", False), (b"d/a", b"../b", False), (b"d/a", b"../../b", True), (b"a", b"/etc/passwd", True),
    (b"a", b"..", True), (b"d/e/a", b"../../x/../y", False), (b"a", b"", True)])
def test_link_escapes(path, target, escapes):
    assert link_escapes(path, target) is escapes


def test_same_as_is_gits_idea_of_the_same():
    f = Entry("f", 0o644, 3, "abc")
    assert f.same_as(Entry("f", 0o600, 3, "abc"))  # permissions other than x: the same
    assert not f.same_as(Entry("f", 0o755, 3, "abc"))
    assert not f.same_as(Entry("l", 0o777, 3, target=b"abc")) and not f.same_as(None)
    assert not Entry("f", 0o644, 3, "").same_as(Entry("f", 0o644, 3, ""))  # unknown bytes are never the same


SNAP = {b"keep": Entry("f", 0o644, 4, "k"), b"edit": Entry("f", 0o644, 4, "e"), b"gone": Entry("f", 0o644, 4, "g"),
        b"link": Entry("l", 0o777, 4, target=b"keep"), b"run": Entry("f", 0o755, 4, "r")}


def test_plan_judges_the_listing():
    G = ch.GuestEntry
    entries = [
        G(b"keep", "f", 0o100644, 4, "k"),  # rewritten with the same bytes
        G(b"edit", "f", 0o100644, 5),  # another size: its bytes must come
        G(b"run", "f", 0o104755, 4, "r"),  # a set-id bit alone
        G(b"new", "f", 0o100644, 9),
        G(b"junk.o", "f", 0o100644, 9),  # new and ignored
        G(b".git/config", "f", 0o100644, 9),
        G(b"pipe", "o", stat.S_IFIFO | 0o644, 0),
        G(b"out", "l", 0o120777, 4, target=b"/etc"),
        G(b"link", "l", 0o120777, 4, target=b"edit"),
        G(b"mode", "f", 0o100755, 4, "m"),
    ]
    snap = {**SNAP, b"mode": Entry("f", 0o644, 4, "m")}
    out = ch.plan(snap, entries, [b"gone", b".git/index", b"never-copied"], {b"junk.o"})
    assert [e.path for e in out.ship] == [b"edit", b"new"]
    assert [(c.path, c.status) for c in out.result.changes] == [(b"link", "modified"), (b"mode", "mode"),
                                                                (b"gone", "deleted")]
    assert {r.path: r.reason for r in out.result.refused} == {
        b"run": ch.SET_ID_REASON, b".git/config": "under .git/", b".git/index": "under .git/", b"pipe": "a fifo",
        b"out": "a symlink out of the project (-> /etc)"}
    assert out.result.ignored == 1
    shipped = [(out.ship[0], Entry("f", 0o644, 4, "e"), "1"), (out.ship[1], Entry("f", 0o644, 9, "n"), "2")]
    result = ch.finish(out, snap, shipped)  # edit came back as it was: no change
    assert [c.path for c in result.changes] == [b"gone", b"link", b"mode", b"new"]


@pytest.mark.parametrize("bad", [
    {"entries": [["../x", "f", 0o100644, 1, "", ""]], "gone": []},
    {"entries": [["/etc/passwd", "f", 0o100644, 1, "", ""]], "gone": []},
    {"entries": [["a//b", "f", 0o100644, 1, "", ""]], "gone": []},
    {"entries": [["a", "d", 0o40755, 1, "", ""]], "gone": []},
    {"entries": [["a", "f", 0o100644, -1, "", ""]], "gone": []},
    {"entries": [], "gone": ["a/../../b"]},
    {"entries": [], "gone": [3]},
    [],
])
def test_a_bad_listing_is_refused(bad):
    with pytest.raises(ValueError):
        ch.parse_listing(bad)


def test_the_patch_is_one_git_applies(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    names = {b"edit.txt": b"a\nb\nc\n" * 20, b"gone.txt": b"bye\n", b"no-eol.txt": b"x\ny",
             b"new\nline.txt": b"1\n", b"caf\xc3\xa9 space.txt": b"old\n", b"bin.dat": b"\0\1\2", b"tool": b"#!/bin/sh\n"}
    for name, data in names.items():
        (repo / os.fsdecode(name)).write_bytes(data)
    subprocess.run(["sh", "-ec", "git init -q && git add -A && git -c user.name=u -c user.email=e commit -qm i"],
                   cwd=repo, check=True)
    after = {b"edit.txt": b"a\nB\nc\n" + b"a\nb\nc\n" * 19 + b"tail\n", b"no-eol.txt": b"x\nz",
             b"new\nline.txt": b"2\n", b"caf\xc3\xa9 space.txt": b"new\n", b"added.txt": b"hello\n",
             b"bin.dat": b"\0\1\3"}

    def entry(data, mode=0o644):
        import hashlib
        return Entry("f", mode, len(data), hashlib.sha256(data).hexdigest())

    changes = [Change(p, entry(names[p]), entry(after[p]), "x") for p in (b"edit.txt", b"no-eol.txt", b"new\nline.txt",
                                                                            b"caf\xc3\xa9 space.txt", b"bin.dat")]
    changes += [Change(b"added.txt", None, entry(after[b"added.txt"]), "x"), Change(b"gone.txt", entry(b"bye\n"), None),
                Change(b"tool", entry(b"#!/bin/sh\n"), entry(b"#!/bin/sh\n", 0o755)),
                Change(b"link", None, Entry("l", 0o777, 8, target=b"edit.txt"))]
    patch, stats = render(changes, lambda c: names[c.path], lambda c: after[c.path])
    text_changes = [c for c in changes if c.path != b"bin.dat"]
    text_patch, _ = render(text_changes, lambda c: names[c.path], lambda c: after[c.path])
    (tmp_path / "p").write_bytes(text_patch)
    subprocess.run(["git", "apply", str(tmp_path / "p")], cwd=repo, check=True)
    for path, data in after.items():
        if path != b"bin.dat":
            assert (repo / os.fsdecode(path)).read_bytes() == data
    assert not (repo / "gone.txt").exists() and os.readlink(repo / "link") == "edit.txt"
    assert os.stat(repo / "tool").st_mode & 0o111
    assert b"Binary files a/bin.dat and b/bin.dat differ" in patch
    lines = summary(stats)
    assert lines[-1] == " 9 files changed, 7 insertions(+), 5 deletions(-)"
    assert any(line.startswith(' "new\\nline.txt"') for line in lines)
    assert any("bin.dat" in line and "Bin 3 -> 3 bytes" in line for line in lines)


def review(id_, project="/p", state="pending", order=0):
    return Review(folder=Path("/nowhere"), id=id_, vm="v", project=Path(project), created="2026-01-01T00:00:00Z",
                  state=state, order=order)


def test_find_by_id_prefix_or_the_latest_pending_of_the_project(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    reviews = [review("20260101-000000-aaaa", a), review("20260101-000001-bbbb", b),
               review("20260101-000002-cccc", a, "applied"), review("20260102-000000-dddd", b)]
    assert find(reviews, "20260101-000001").id == "20260101-000001-bbbb"
    assert find(reviews, "20260102-000000-dddd").id == "20260102-000000-dddd"
    with pytest.raises(ReviewError, match="matches 3 reviews"):
        find(reviews, "20260101")
    with pytest.raises(ReviewError, match="no review 'zz'"):
        find(reviews, "zz")
    assert find(reviews, project=a).id == "20260101-000000-aaaa"  # the applied one is not pending
    assert find(reviews, project=b).id == "20260102-000000-dddd"
    with pytest.raises(ReviewError, match="no pending review for"):
        find(reviews, project=tmp_path)
