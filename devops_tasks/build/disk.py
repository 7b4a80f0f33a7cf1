"""Assemble the bootable disk without loop devices, mounts or root: an MBR raw file with a FAT boot
partition (syslinux, kernel, initramfs) and an ext4 root partition made by ``mkfs.ext4 -d``,
converted to a compressed qcow2. Every random or time-based value is fixed for byte-identical output."""

from __future__ import annotations

import gzip
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ImageError
from .kernel import strip_signature
from .rootfs import image_files_dir
from .tools import mbr_bin, run

SECTOR = 512
MIB = 1 << 20
BOOT_START = 1 * MIB
BOOT_SIZE = 63 * MIB
ROOT_START = BOOT_START + BOOT_SIZE
ROOT_DEVICE = "/dev/vda2"


@dataclass
class DiskInputs:
    vmlinuz: Path
    initramfs: bytes
    rootfs: Path
    cmdline: str
    disk_size: int
    epoch: int
    seed: str  # the version hash: UUIDs and volume ids derive from it
    owners: dict[str, tuple[int, int]] = field(default_factory=dict)  # guest path -> (uid, gid); others root's


def _cpio_entry(name: str, mode: int, data: bytes, ino: int, mtime: int, rdev: tuple[int, int] = (0, 0)) -> bytes:
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 2 if mode & 0o040000 else 1, mtime, len(data), 0, 0, rdev[0], rdev[1],
              len(encoded), 0]
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    out = header + encoded
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def initramfs(busybox: Path, modules: list[Path], epoch: int, release: str = "initramfs") -> bytes:
    """A gzip newc cpio written here, deterministically: busybox, the modules (and a flat
    modules.dep for busybox modprobe) with their load order, init."""
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    moddir = f"lib/modules/{release}"
    for directory in ("bin", "dev", "lib", "lib/modules", moddir, "newroot", "proc", "sys"):
        entries.append((directory, 0o040755, b"", (0, 0)))
    entries.append(("dev/console", 0o020600, b"", (5, 1)))
    entries.append(("bin/busybox", 0o100755, busybox.read_bytes(), (0, 0)))
    for applet in ("sh",):
        entries.append((f"bin/{applet}", 0o120777, b"busybox", (0, 0)))
    entries.append(("init", 0o100755, (image_files_dir() / "initramfs/init").read_bytes(), (0, 0)))
    names = []
    for module in modules:
        names.append(module.name[:-3].replace("-", "_"))
        entries.append((f"{moddir}/{module.name}", 0o100644, strip_signature(module.read_bytes()), (0, 0)))
    deps = "".join(f"{module.name}:\n" for module in modules)  # the order is already resolved
    entries.append((f"{moddir}/modules.dep", 0o100644, deps.encode(), (0, 0)))
    entries.append(("lib/modules/load-order", 0o100644, "".join(f"{n}\n" for n in names).encode(), (0, 0)))
    blob = b"".join(
        _cpio_entry(name, mode, data, index + 1, epoch, rdev)
        for index, (name, mode, data, rdev) in enumerate(sorted(entries))
    )
    blob += _cpio_entry("TRAILER!!!", 0, b"", 0, 0)
    return gzip.compress(blob, compresslevel=9, mtime=0)


def _sfdisk_script(seed: str, root_sectors: int) -> bytes:
    label_id = "0x" + seed[:8]
    return (
        "label: dos\n"
        f"label-id: {label_id}\n"
        "unit: sectors\n\n"
        f"start={BOOT_START // SECTOR}, size={BOOT_SIZE // SECTOR}, type=e, bootable\n"
        f"start={ROOT_START // SECTOR}, size={root_sectors}, type=83\n"
    ).encode()


def build_raw(inputs: DiskInputs, raw: Path, work: Path) -> None:
    """Write the whole disk into ``raw`` (a sparse file of ``disk_size`` bytes)."""
    disk_size = inputs.disk_size // MIB * MIB
    root_bytes = disk_size - ROOT_START
    env = {"SOURCE_DATE_EPOCH": str(inputs.epoch), "E2FSPROGS_FAKE_TIME": str(inputs.epoch),
           "MKE2FS_CONFIG": str(image_files_dir() / "mke2fs.conf"), "MTOOLS_SKIP_CHECK": "1", "TZ": "UTC"}
    with open(raw, "wb") as handle:
        handle.truncate(disk_size)
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(raw)], "writing the partition table",
        input=_sfdisk_script(inputs.seed, root_bytes // SECTOR), env=env, space_dir=raw.parent)

    root_uuid = str(uuid.UUID(inputs.seed[:32]))
    hash_seed = str(uuid.UUID(inputs.seed[32:64]))
    run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-L", "devops-root", "-U", root_uuid,
         "-E", f"offset={ROOT_START},root_owner=0:0,hash_seed={hash_seed},lazy_itable_init=0,lazy_journal_init=0,nodiscard",
         "-d", str(inputs.rootfs), str(raw), str(root_bytes // 1024) + "k"],
        "making the ext4 root file system", env=env, space_dir=raw.parent)
    _fix_ext4(raw, work, inputs.epoch, env, inputs.owners)

    boot = work / "boot"
    boot.mkdir(exist_ok=True)
    (boot / "vmlinuz").write_bytes(inputs.vmlinuz.read_bytes())
    (boot / "initrd.img").write_bytes(inputs.initramfs)
    cfg = (image_files_dir() / "syslinux.cfg").read_text().replace("@CMDLINE@", f"root={ROOT_DEVICE} {inputs.cmdline}")
    (boot / "syslinux.cfg").write_text(cfg)
    for item in boot.iterdir():
        os.utime(item, (inputs.epoch, inputs.epoch))
    image_at = f"{raw}@@{BOOT_START}"
    run(["mkfs.vfat", "-F", "16", "-n", "DEVOPSBOOT", "-i", inputs.seed[-8:], "--invariant",
         f"--offset={BOOT_START // SECTOR}", str(raw), str(BOOT_SIZE // 1024)],
        "making the FAT boot partition", env=env, space_dir=raw.parent)
    for name in ("vmlinuz", "initrd.img", "syslinux.cfg"):
        run(["mcopy", "-o", "-m", "-i", image_at, str(boot / name), f"::{name}"],
            f"copying {name} to the boot partition", env=env, space_dir=raw.parent)
    run(["syslinux", "--offset", str(BOOT_START), "--install", str(raw)], "installing syslinux",
        env=env, space_dir=raw.parent)
    mbr = mbr_bin()
    if mbr is None:
        raise ImageError("syslinux's mbr.bin is missing: run 'apt-get install syslinux-common'")
    code = mbr.read_bytes()[:440]
    with open(raw, "r+b") as handle:
        handle.write(code)


def _used_inodes(fs: str, env: dict) -> list[int]:
    """In-use inode numbers: all inodes minus dumpe2fs's per-group free ranges."""
    out = run(["dumpe2fs", fs], "reading the ext4 layout", env=env).stdout.decode()
    total = int(re.search(r"^Inode count:\s+(\d+)", out, re.M).group(1))
    used = bytearray(b"\1") * (total + 1)
    used[0] = 0
    for ranges in re.findall(r"^\s+Free inodes: (.*)$", out, re.M):
        for item in filter(None, (part.strip() for part in ranges.split(","))):
            first, _, last = item.partition("-")
            for ino in range(int(first), int(last or first) + 1):
                used[ino] = 0
    return [ino for ino in range(1, total + 1) if used[ino]]


def _fix_ext4(raw: Path, work: Path, epoch: int, env: dict, owners: dict[str, tuple[int, int]]) -> None:
    """mke2fs -d copies each host file's ctime (the time it was unpacked, never settable from user
    space) and atime (reading the staging tree moves it): reset both to the fixed epoch on every
    used inode (root and 11+; 1-10 are reserved). Then give ``owners`` their uid and gid."""
    fs = f"{raw}?offset={ROOT_START}"
    # Without root, dpkg-deb could not give files their owners: make everything root's instead of
    # the builder's (a root build keeps Debian's owners).
    owner = "" if os.geteuid() == 0 else "sif <{ino}> uid 0\nsif <{ino}> gid 0\n"
    commands = "".join(f"sif <{ino}> ctime @{epoch}\nsif <{ino}> atime @{epoch}\n" + owner.format(ino=ino)
                       for ino in _used_inodes(fs, env) if ino == 2 or ino >= 11)
    commands += "".join(f"sif {path} uid {uid}\nsif {path} gid {gid}\n" for path, (uid, gid) in sorted(owners.items()))
    script = work / "debugfs.cmds"
    script.write_text(commands)
    result = run(["debugfs", "-w", "-f", str(script), fs], "fixing ext4 timestamps", env=env, space_dir=raw.parent)
    errors = [line for line in result.stderr.decode().splitlines() if line.strip() and not line.startswith("debugfs ")]
    if errors:
        raise ImageError(f"fixing ext4 timestamps: debugfs: {errors[0]}")


def to_qcow2(raw: Path, out: Path) -> None:
    """Compressed qcow2 (zstd: ~5x faster than zlib to write; QEMU >= 5.1 reads it)."""
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd",
         str(raw), str(out)], "converting the disk to qcow2", space_dir=out.parent)


def check_name(text: str) -> bool:
    return bool(re.match(r"^[0-9a-f]{64}$", text))
