"""From a recipe to a finished qcow2: resolve exact package versions and npm integrities (they make the
version), reuse a finished image with that version when cached, else unpack, assemble and convert in a
private work dir."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import paths
from ..errors import ImageError
from ..fsutil import file_lock, fsync_dir
from . import disk, fixups, rootfs
from .apt import Apt, Package
from .kernel import KernelTree
from .npm import Npm, NpmPin
from .npm import install as install_npm
from .recipe import Recipe
from .tools import disk_full_error, require_tools

# Bump when the builder's output changes for the same recipe and packages.
BUILDER_REVISION = 1
GUEST_CONTRACT = 1
KEEP_CACHED_IMAGES = 2  # per recipe
WORK_SPACE_NEEDED = 1536 << 20  # unpacked root (~250 MB) + raw disk blocks + qcow2 + debs, with margin

Log = Callable[[str], None]


@dataclass
class Plan:
    """What a build will produce: the exact packages and the version they hash to."""

    recipe: Recipe
    packages: list[Package]
    kernel: Package
    version: str
    apt: Apt = field(repr=False)
    npm: list[NpmPin] = field(default_factory=list)  # in the recipe's order
    registry: Npm | None = field(default=None, repr=False)


@dataclass
class BuildResult:
    path: Path
    version: str
    sha256: str
    size: int
    cached: bool
    seconds: float
    packages: list[Package] = field(default_factory=list)
    npm: list[NpmPin] = field(default_factory=list)


def build_cache() -> Path:
    return paths.cache_dir() / "build"


def _builder_digest() -> str:
    """This package's own files (code and guest files): a change to either is a new image version."""
    digest = hashlib.sha256()
    base = Path(__file__).resolve().parent
    for path in sorted(base.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            digest.update(path.relative_to(base).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _version_hash(recipe: Recipe, packages: list[Package], kernel: Package, npm: list[NpmPin] = ()) -> str:
    body = {
        "builder": BUILDER_REVISION,
        "builder_files": _builder_digest(),
        "recipe": recipe.identity(),
        "kernel": kernel.pin(),
        "packages": [p.pin() for p in sorted(packages)],
        "npm": [p.pin() for p in sorted(npm)],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def plan(recipe: Recipe, refresh: bool | None = None, log: Log | None = None) -> Plan:
    """Resolve the recipe against the (cached, daily refreshed) package lists."""
    log = log or (lambda message: None)
    apt = Apt(recipe.apt, build_cache(), log)
    apt.update(refresh)
    key = hashlib.sha256(json.dumps([sorted(recipe.packages), recipe.kernel.package, apt.fingerprint()]).encode()).hexdigest()
    memo = build_cache() / "resolved" / f"{key[:32]}.json"
    try:
        data = json.loads(memo.read_text())
        packages = [Package(*item) for item in data["packages"]]
        kernel = Package(*data["kernel"])
    except (OSError, ValueError, KeyError, TypeError):
        log(f"Resolving packages for recipe {recipe.name}")
        with _naming(recipe):
            packages = apt.resolve(recipe.packages)
            kernel = apt.kernel(recipe.kernel.package)
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"packages": [[p.name, p.version, p.arch] for p in packages],
                                    "kernel": [kernel.name, kernel.version, kernel.arch]}))
    registry = Npm(recipe.npm_registry, build_cache(), log)
    with _naming(recipe):
        pins = [registry.resolve(package) for package in recipe.npm]
    digest = _version_hash(recipe, packages, kernel, pins)
    return Plan(recipe, packages, kernel, f"{recipe.name}-{digest[:16]}", apt, pins, registry)


@contextlib.contextmanager
def _naming(recipe: Recipe):
    """Prefix an error about the recipe's packages, kernel or modules with the recipe file."""
    try:
        yield
    except ImageError as exc:
        raise ImageError(f"{recipe.path}: {exc}") from None


def _is_static(path: Path) -> bool:
    """True when the ELF file has no program interpreter (runs without libraries)."""
    data = path.read_bytes()[:65536]
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + index * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _check_space(directory: Path, needed: int, what: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ImageError(
            f"not enough free disk space in {directory} for {what}: {free >> 20} MB free, "
            f"about {needed >> 20} MB needed; free some space and build again"
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _assemble(p: Plan, work: Path, out: Path, log: Log) -> None:
    recipe = p.recipe
    debs = p.apt.download([*p.packages, p.kernel])
    with _naming(recipe):
        tarballs = [p.registry.download(pin) for pin in p.npm] if p.registry else []
    log(f"Unpacking {len(p.packages)} packages and kernel {p.kernel.name}")
    tree = KernelTree(_kernel_tree(debs[p.kernel]))
    with _naming(recipe):
        modules = tree.load_order(recipe.modules)  # an unknown module fails here, before the slow part
    root = work / "root"
    rootfs.extract([debs[pkg] for pkg in p.packages], root, jobs=max(2, os.cpu_count() or 2))
    epoch = rootfs.newest_mtime(root)
    rootfs.remove_excluded(root, recipe.exclude)
    for line in fixups.apply(root):
        log(f"Made {line}")
    rootfs.busybox_links(root)
    for package, tarball in zip(recipe.npm, tarballs):
        with _naming(recipe):
            install_npm(tarball, package, root)
    rootfs.guest_files(root, recipe)
    count = rootfs.normalize(root, epoch)
    if recipe.python_bytecode:
        rootfs.compile_python(root)
        count = rootfs.normalize(root, epoch)
    busybox = root / "bin/busybox"
    if not _is_static(busybox.resolve()):
        raise ImageError(f"{recipe.path}: /bin/busybox is not static: use the busybox-static package")
    needed = rootfs.tree_size(root) * 5 // 4 + (64 << 20)
    if needed > recipe.disk_size - disk.ROOT_START:
        raise ImageError(f"{recipe.path}: disk_size {recipe.disk_size >> 20}M is too small for the root file "
                         f"system (about {needed >> 20}M needed)")
    _check_space(work, 2 * needed, "writing the disk")  # the raw disk's blocks, then the qcow2
    log(f"Writing the disk ({count} files, kernel {tree.release}, {len(modules)} modules)")
    inputs = disk.DiskInputs(
        vmlinuz=tree.vmlinuz,
        initramfs=disk.initramfs(busybox.resolve(), modules, epoch, tree.release),
        rootfs=root,
        cmdline=recipe.kernel.cmdline,
        disk_size=recipe.disk_size,
        epoch=epoch,
        seed=hashlib.sha256(p.version.encode()).hexdigest() + hashlib.sha256(b"2" + p.version.encode()).hexdigest(),
        owners=dict(rootfs.OWNERS),
    )
    raw = work / "disk.raw"
    disk.build_raw(inputs, raw, work)
    shutil.rmtree(root)
    disk.to_qcow2(raw, out)


def _kernel_tree(deb: Path) -> Path:
    """The unpacked kernel package, kept in the cache (one per kernel version: ~100 MB, ~4 s to unpack)."""
    kernels = build_cache() / "kernels"
    target = kernels / deb.stem
    if (target / ".complete").exists():
        return target
    kernels.mkdir(parents=True, exist_ok=True)
    for old in kernels.iterdir():  # keep only the newest kernel
        if old.name != deb.stem:
            shutil.rmtree(old, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=".unpack-", dir=kernels))
    try:
        rootfs.extract([deb], partial)
        (partial / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _remove_leftovers(cache: Path) -> None:
    for stale in (cache / "work").iterdir():
        shutil.rmtree(stale, ignore_errors=True)
    for stale in [*(cache / "images").glob(".*.tmp"), *(cache / "debs").glob(".partial-*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                stale.unlink()


def _prune(images: Path, keep: str) -> None:
    """Keep the newest KEEP_CACHED_IMAGES builds of each recipe (a build of one recipe never
    pushes another recipe's image out of a shared cache)."""
    recipe = keep.rpartition("-")[0]
    found = sorted((path for path in images.glob("*.qcow2") if path.stem.rpartition("-")[0] == recipe),
                   key=lambda path: path.stat().st_mtime, reverse=True)
    for old in found[KEEP_CACHED_IMAGES:]:
        if old.stem != keep:
            with contextlib.suppress(OSError):
                old.unlink()
                old.with_suffix(".sha256").unlink()


def cached_image(p: Plan) -> tuple[Path, str] | None:
    """The finished image for this exact version, if an earlier build left it in the cache."""
    image = build_cache() / "images" / f"{p.version}.qcow2"
    stamp = image.with_suffix(".sha256")
    try:
        digest = stamp.read_text().strip()
    except OSError:
        return None
    if image.is_file() and disk.check_name(digest):
        return image, digest
    return None


def produce(p: Plan, log: Log, force: bool = False) -> tuple[Path, str, bool]:
    """The cached image for the plan's version, building it first when absent (or ``force``).
    -> (path, sha256, cached)"""
    hit = None if force else cached_image(p)
    if hit:
        return (*hit, True)
    cache = build_cache()
    with file_lock(cache / "build.lock"):
        hit = None if force else cached_image(p)
        if hit:
            return (*hit, True)
        images = cache / "images"
        images.mkdir(parents=True, exist_ok=True)
        (cache / "work").mkdir(parents=True, exist_ok=True)
        _remove_leftovers(cache)  # of builds killed before their cleanup ran (we hold the lock)
        _check_space(cache, WORK_SPACE_NEEDED, "building the image")
        work = Path(tempfile.mkdtemp(prefix="build-", dir=cache / "work"))
        try:
            tmp = images / f".{p.version}.qcow2.tmp"
            _assemble(p, work, tmp, log)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            digest = sha256_file(tmp)
            image = images / f"{p.version}.qcow2"
            os.replace(tmp, image)
            image.with_suffix(".sha256").write_text(digest + "\n")
            fsync_dir(images)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full_error(cache, "building the image") from exc
            raise ImageError(f"building the image failed: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(OSError):
                (images / f".{p.version}.qcow2.tmp").unlink()
        _prune(images, p.version)
        return image, digest, False


def copy_atomic(source: Path, dest: Path) -> None:
    """Copy to a temp file beside ``dest``, fsync, rename: ``dest`` is the old or the new file, never half."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _check_space(dest.parent, source.stat().st_size + (16 << 20), f"writing {dest.name}")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, 4 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full_error(dest.parent, f"writing {dest.name}") from exc
        if isinstance(exc, OSError):
            raise ImageError(f"cannot write {dest}: {exc.strerror or exc}") from exc
        raise


def build(recipe: Recipe, output: Path | None = None, install: bool = True, refresh: bool | None = None,
          log: Log | None = None, force: bool = False) -> BuildResult:
    """Build (or reuse) the image and deliver it to ``output``, or install it with its manifest entry."""
    from ..manifest import ImageInfo, Manifest

    log = log or (lambda message: None)
    start = time.monotonic()
    require_tools()
    manifest = Manifest.load() if output is None and install else None  # invalid manifest: fail before any change
    p = plan(recipe, refresh=refresh, log=log)
    image, digest, cached = produce(p, log, force=force)
    if cached:
        log(f"Reusing the cached build of {p.version}")
    target = Path(output) if output is not None else paths.image_path()
    if output is not None or install:
        copy_atomic(image, target)
    if manifest is not None:
        # same lock as the ImageManager: read-modify-write, then an atomic save (manifest last)
        with file_lock(paths.manifest_path().with_name(paths.manifest_path().name + ".lock")):
            manifest = Manifest.load()
            manifest.set(paths.image_name(), ImageInfo(version=p.version, source="build", sha256=digest,
                                                       guest_contract=GUEST_CONTRACT))
            manifest.save()
    return BuildResult(path=target if (output is not None or install) else image, version=p.version,
                       sha256=digest, size=image.stat().st_size, cached=cached,
                       seconds=time.monotonic() - start, packages=[*p.packages, p.kernel], npm=p.npm)
