"""Kernel modules: resolve names to files and their load order from each module's own ``.modinfo``
(no host ``depmod``/``modprobe`` needed, and nothing the kernel package's postinst would make)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError


def _canon(name: str) -> str:
    return name.replace("-", "_")


def modinfo(path: Path) -> dict[str, list[str]]:
    """The ``key=value`` strings of an ELF64 little-endian module's ``.modinfo`` section."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ImageError(f"{path.name}: not an x86_64 kernel module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]
    info: dict[str, list[str]] = {}
    for name_idx, _type, _flags, _addr, offset, size in sections:
        end = data.index(b"\0", names_off + name_idx)
        if data[names_off + name_idx:end] != b".modinfo":
            continue
        for item in data[offset:offset + size].split(b"\0"):
            key, sep, value = item.decode("utf-8", "replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


SIG_MARKER = b"~Module signature appended~\n"


def strip_signature(data: bytes) -> bytes:
    """The module without its appended signature. Checking an RSA signature per module costs
    ~0.1-0.2 s under TCG; the kernel loads unsigned modules (taint only) when it is not locked down
    (no UEFI Secure Boot: SeaBIOS)."""
    if not data.endswith(SIG_MARKER):
        return data
    end = len(data) - len(SIG_MARKER)
    signer_len, key_id_len = data[end - 9], data[end - 8]
    sig_len, = struct.unpack(">I", data[end - 4:end])
    return data[:end - 12 - sig_len - key_id_len - signer_len]


@dataclass
class KernelTree:
    """An unpacked kernel package: ``boot/vmlinuz-<release>`` and ``lib/modules/<release>``."""

    root: Path

    @property
    def release(self) -> str:
        dirs = sorted((self.root / "lib/modules").glob("*/"))
        if len(dirs) != 1:
            raise ImageError(f"kernel package holds {len(dirs)} module trees, expected one")
        return dirs[0].name

    @property
    def vmlinuz(self) -> Path:
        path = self.root / "boot" / f"vmlinuz-{self.release}"
        if not path.is_file():
            raise ImageError(f"kernel package has no boot/vmlinuz-{self.release}")
        return path

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib/modules" / self.release

    def _index(self) -> dict[str, Path]:
        index: dict[str, Path] = {}
        for path in sorted(self.modules_dir.rglob("*.ko")):
            index[_canon(path.name[:-3])] = path
        return index

    def _builtin(self) -> set[str]:
        builtin = self.modules_dir / "modules.builtin"
        if not builtin.is_file():
            return set()
        return {_canon(Path(line.strip()).name.removesuffix(".ko")) for line in builtin.read_text().splitlines() if line.strip()}

    def load_order(self, names: tuple[str, ...]) -> list[Path]:
        """Module files for ``names`` plus their dependencies, each after what it depends on.
        Built-in modules need no file; an unknown name is an error naming it."""
        index = self._index()
        builtin = self._builtin()
        order: list[Path] = []
        seen: set[str] = set()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            name = _canon(name)
            if name in seen or name in builtin:
                return
            path = index.get(name)
            if path is None:
                wanted_by = f" (needed by {chain[-1]})" if chain else ""
                raise ImageError(f"unknown kernel module '{name}'{wanted_by} in kernel {self.release}: fix 'modules' in the recipe")
            seen.add(name)
            for dep in modinfo(path).get("depends", []):
                for item in filter(None, dep.split(",")):
                    visit(item, chain + (name,))
            order.append(path)

        for name in names:
            visit(name, ())
        return order
