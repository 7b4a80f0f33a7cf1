"""What Debian's maintainer scripts would have done for the packages the recipes use.

The builder unpacks .debs without running their scripts (no root, no chroot, byte-identical
output), so the few things those scripts make that programs rely on are made here instead, each
only when its package's files are in the tree: the CA bundle (ca-certificates), the alternatives
links (``cc``, ``c++``, ``php`` ...) and PHP's ``php.ini`` and extension links.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# link -> candidates, best first (globs; the highest version wins among a glob's matches). The
# packages register these with update-alternatives in their postinst.
ALTERNATIVES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("/usr/bin/cc", ("/usr/bin/gcc", "/usr/bin/clang")),
    ("/usr/bin/c++", ("/usr/bin/g++", "/usr/bin/clang++")),
    ("/usr/bin/c89", ("/usr/bin/c89-gcc",)),
    ("/usr/bin/c99", ("/usr/bin/c99-gcc",)),
    ("/usr/bin/php", ("/usr/bin/php.default", "/usr/bin/php[0-9].[0-9]")),
    ("/usr/bin/phar", ("/usr/bin/phar.default", "/usr/bin/phar[0-9].[0-9]")),
    ("/usr/bin/phar.phar", ("/usr/bin/phar.phar.default", "/usr/bin/phar.phar[0-9].[0-9]")),
)

CA_SOURCE = "usr/share/ca-certificates"
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"
_PRIORITY_RE = re.compile(r"^\s*;\s*priority\s*=\s*(\d+)", re.MULTILINE)
_PHP_SHARE_RE = re.compile(r"^php(\d+\.\d+)-")


def apply(root: Path) -> list[str]:
    """Every fix-up the tree needs; -> one line per thing made (for the build log)."""
    done = []
    count = ca_bundle(root)
    if count:
        done.append(f"CA bundle ({count} certificates)")
    links = alternatives(root)
    if links:
        done.append("alternatives " + ", ".join(links))
    modules = php(root)
    if modules:
        done.append(f"PHP extensions enabled: {', '.join(modules)}")
    return done


def ca_bundle(root: Path) -> int:
    """/etc/ssl/certs/ca-certificates.crt from every certificate the ca-certificates package ships
    (update-ca-certificates with its default configuration, which enables them all); -> count."""
    source = root / CA_SOURCE
    if not source.is_dir():
        return 0
    certs = sorted(p for p in source.rglob("*.crt") if p.is_file())
    if not certs:
        return 0
    bundle = root / CA_BUNDLE
    bundle.parent.mkdir(parents=True, exist_ok=True)
    with open(bundle, "wb") as out:
        for cert in certs:
            data = cert.read_bytes()
            out.write(data if data.endswith(b"\n") else data + b"\n")
    os.chmod(bundle, 0o644)
    return len(certs)


def _version_key(path: Path) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name))


def _candidate(root: Path, patterns: tuple[str, ...]) -> str:
    for pattern in patterns:
        matches = sorted((p for p in root.glob(pattern.lstrip("/")) if os.path.lexists(p)), key=_version_key,
                         reverse=True)
        if matches:
            return "/" + matches[0].relative_to(root).as_posix()
    return ""


def alternatives(root: Path) -> list[str]:
    """The alternatives links (``/usr/bin/cc -> /usr/bin/gcc``) whose target is installed; a path a
    package ships itself is left alone. Direct links (no /etc/alternatives step): nothing in the
    guest switches them."""
    made = []
    for link, patterns in ALTERNATIVES:
        path = root / link.lstrip("/")
        if os.path.lexists(path):
            continue
        target = _candidate(root, patterns)
        if not target:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
        made.append(f"{link.rsplit('/', 1)[-1]} -> {target}")
    return made


def php(root: Path) -> list[str]:
    """For each PHP version: php.ini for every SAPI present (from the production template, as the
    postinst does with ucf), each extension's ini copied to mods-available and enabled in every SAPI
    (``conf.d/<priority>-<name>.ini``), as phpenmod does for all installed modules."""
    etc = root / "etc/php"
    share = root / "usr/share"
    enabled: list[str] = []
    if not etc.is_dir():
        return enabled
    for version_dir in sorted(p for p in etc.iterdir() if p.is_dir()):
        version = version_dir.name
        sapis = sorted(p.name for p in version_dir.iterdir() if p.is_dir() and (p / "conf.d").is_dir())
        for sapi in sapis:
            ini = version_dir / sapi / "php.ini"
            template = root / f"usr/lib/php/{version}/php.ini-production{'.cli' if sapi == 'cli' else ''}"
            if not ini.exists() and template.is_file():
                ini.write_bytes(template.read_bytes())
                os.chmod(ini, 0o644)
        available = version_dir / "mods-available"
        for package_dir in sorted(share.glob(f"php{version}-*")) if share.is_dir() else ():
            if not _PHP_SHARE_RE.match(package_dir.name):
                continue
            for source in sorted(package_dir.glob("*/*.ini")):
                available.mkdir(parents=True, exist_ok=True)
                target = available / source.name
                if not target.exists():
                    target.write_bytes(source.read_bytes())
                    os.chmod(target, 0o644)
        if not available.is_dir():
            continue
        for module in sorted(available.glob("*.ini")):
            match = _PRIORITY_RE.search(module.read_text(errors="replace"))
            priority = match.group(1) if match else "20"
            for sapi in sapis:
                link = version_dir / sapi / "conf.d" / f"{priority}-{module.name}"
                if not os.path.lexists(link):
                    link.symlink_to(f"/etc/php/{version}/mods-available/{module.name}")
            enabled.append(module.stem)
    return enabled
