"""The ``image`` collection: install, update, list and prune the dev image."""

from __future__ import annotations

import json
import time

from invoke import Collection

from .common import configure, core_config, task


def _manager(c, quiet: bool = False):
    from ..images import ImageManager

    return ImageManager(core_config(c), quiet=bool(quiet))


def go_duration(seconds: float) -> str:
    """Go's ``time.Duration.Round(time.Second).String()``: ``0s``, ``42s``, ``1m30s``, ``1h2m3s``."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def human_size(size: int | None) -> str:
    if size is None:
        return "missing"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


@task(
    help={
        "source": "Where to download from: auto, github, cdn, registry or build (default: images.source)",
        "quiet": "Hide the progress bar",
    }
)
def install(c, source=None, quiet=False):
    """Download and install the dev image (first working source)."""
    images = _manager(c, quiet)
    images.source_kind(source or "")
    print(f"Image: {images.image_name}")
    if images.is_installed():
        print("Dev environment already installed")
        return
    print("Downloading dev environment...")
    start = time.monotonic()
    images.install(source=source or "")
    print(f"Installed in {go_duration(time.monotonic() - start)}")
    print("Start with: inv vm.boot")


@task(help={"apply": "Download and install the update when there is one"})
def update(c, apply=False):
    """Check for a newer dev image (and install it with --apply)."""
    from ..images import UpdateCheckError

    images = _manager(c)
    print("Checking for updates...")
    try:
        current, latest, has_update = images.check_update()
    except UpdateCheckError as exc:
        print(f"Current: {exc.current}")
        raise
    print(f"Current: {current}")
    print(f"Latest: {latest}")
    if not has_update:
        print("Already up to date")
        return
    print("Update available")
    if not apply:
        print("Install it with: inv image.update --apply")
        return
    start = time.monotonic()
    _, _, info = images.update()  # refuses while a VM runs on the image
    if info is None:  # the source changed its mind between check and apply
        print("Already up to date")
        return
    print(f"Updated in {go_duration(time.monotonic() - start)}")
    print("Existing VM disks (overlays) are based on the old image: they will be recreated fresh on next boot")


@task(help={"json": "Print JSON instead of a table"})
def list_(c, json_=False):
    """List installed images (version, source, size, sha256, verified, date)."""
    rows = _manager(c).list()
    if json_:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("No images installed (run: inv image.install)")
        return
    for row in rows:
        mark = " (current)" if row["current"] else ""
        print(f"{row['name']}{mark}")
        print(f"  Version: {row['version']}")
        print(f"  Source: {row['source']}")
        print(f"  Size: {human_size(row['size'])}")
        print(f"  SHA256: {row['sha256'] or '(not published)'}")
        print(f"  Verified: {'yes' if row['verified'] else 'no (no published checksum)'}")
        print(f"  Downloaded: {row['downloaded']}")


@task
def prune(c):
    """Remove partial downloads and image files nothing references."""
    result = _manager(c).prune()
    for path in result.removed:
        print(f"Removed {path}")
    for what in result.skipped:
        print(f"Kept {what}")
    if not result.removed:
        print("Nothing to remove")
    print(f"Freed {human_size(result.freed)}")


@task(
    help={
        "recipe": "Recipe name under config/ or a path to a .yaml recipe (default: images.build.recipe)",
        "output": "Write the qcow2 here instead of installing it as the dev image",
        "force": "Rebuild even when the cached image for this recipe is up to date",
    }
)
def build(c, recipe=None, output=None, force=False):
    """Build a dev image from Debian packages (a YAML recipe) and install it."""
    from ..build import build_image

    recipe = recipe or core_config(c).images.build.recipe
    print(f"Building image from recipe {recipe}...")
    result = build_image(recipe, output=output, log=print, refresh=True if force else None, force=force)
    where = result.path if output else f"{result.path} (installed)"
    print(f"Image: {where}")
    print(f"Version: {result.version}")
    print(f"SHA256: {result.sha256}")
    print(f"Built in {go_duration(result.seconds)}{' (cached)' if result.cached else ''}")
    if not output:
        print("Start with: inv vm.boot")


ns = configure(Collection("image"))
ns.add_task(install)
ns.add_task(update)
ns.add_task(list_, name="list")
ns.add_task(prune)
ns.add_task(build)
