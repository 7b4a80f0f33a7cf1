"""Which ``host:port`` a restricted VM may reach through the proxy, and the reason when not.

Entries: ``host`` (ports 443 and 80), ``host:port``, ``*.domain`` (subdomains only, never the domain
itself), an IP address (``127.0.0.1:8080``, ``[::1]:8080``). Names match case-insensitively, a
trailing dot ignored. The host's own addresses (loopback, ``0.0.0.0``, link-local, any address of
its interfaces) are reached only through an entry that names the address itself: a name that
resolves there is refused whatever the list says, so a listed name cannot be pointed at the host.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from ..errors import DevopsError

DEFAULT_PORTS = (443, 80)
FLAG = "--allow"
LIST_NAME = "claude.allow"

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME_RE = re.compile(rf"^(?:{_LABEL}\.)*{_LABEL}$")


class AllowlistError(DevopsError):
    """An allowlist entry (config ``claude.allow`` or ``--allow``) that is not ``host[:port]``."""


class BadTarget(ValueError):
    """A request names no valid host or port."""


def normalize_name(text: str) -> str | None:
    """A lower-case host name without its trailing dot, or None when ``text`` is not one.

    An all-digit last label is no name (``127.1`` and ``2130706433`` are IPv4 in disguise).
    """
    name = text.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253 or not name.isascii() or not _NAME_RE.match(name):
        return None
    if name.rsplit(".", 1)[-1].isdigit():
        return None
    return name


def parse_ip(text: str) -> str | None:
    """The canonical form of an IP address literal (``[...]`` around IPv6 allowed), else None."""
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def split_authority(text: str, default_port: int | None) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` → (host as written, port); :class:`BadTarget` otherwise."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadTarget(f"unclosed '[' in {text!r}")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise BadTarget(f"{text!r} is not host:port")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:  # a bare IPv6 address
        host, port_text = text, None
    else:
        host, port_text = text, None
    if port_text is None:
        if default_port is None:
            raise BadTarget(f"{text!r} names no port")
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise BadTarget(f"{port_text!r} in {text!r} is not a TCP port (1 to 65535)")
    return host, int(port_text)


def canonical_host(text: str) -> tuple[str, bool]:
    """(canonical host, is an IP address) of a request's host; :class:`BadTarget` when neither."""
    ip = parse_ip(text)
    if ip is not None:
        return ip, True
    name = normalize_name(text)
    if name is None:
        raise BadTarget(f"{text!r} is not a host name or IP address")
    return name, False


def authority(host: str, port: int) -> str:
    """``host:port`` as written on a command line (``[v6]:port``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def suggestion(host: str, port: int) -> str:
    """The ``--allow`` value that would allow ``host:port``: the bare name for 443 and 80."""
    if port in DEFAULT_PORTS and parse_ip(host) is None:
        return host
    return authority(host, port)


@dataclass(frozen=True)
class Entry:
    """One allowlist entry. ``host`` is canonical: a lower-case name (without ``*.``) or an IP."""

    text: str
    host: str
    port: int | None = None  # None: DEFAULT_PORTS
    wildcard: bool = False
    ip: bool = False

    def matches(self, host: str, port: int, is_ip: bool) -> bool:
        """``host`` canonical (see :func:`canonical_host`)."""
        if port not in ((self.port,) if self.port is not None else DEFAULT_PORTS):
            return False
        if self.ip or is_ip:
            return self.ip and is_ip and host == self.host
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


def parse_entry(text: str) -> Entry:
    """``host``, ``*.domain``, ``host:port``, an IP (``[v6]:port``); :class:`AllowlistError` otherwise."""
    raw = str(text).strip()
    problem = f"allowlist entry {text!r} is not host, *.domain or host:port"
    try:
        host, port = split_authority(raw, default_port=0)
    except BadTarget as exc:
        raise AllowlistError(f"{problem} ({exc})") from None
    port_value = port or None
    ip = parse_ip(host)
    if ip is not None:
        return Entry(authority(ip, port) if port else ip, ip, port_value, ip=True)
    wildcard = host.startswith("*.")
    name = normalize_name(host[2:] if wildcard else host)
    if name is None or (wildcard and "." not in name):  # "*.com" would open a whole top-level domain
        raise AllowlistError(problem)
    shown = ("*." if wildcard else "") + name
    return Entry(f"{shown}:{port}" if port else shown, name, port_value, wildcard=wildcard)


@dataclass(frozen=True)
class Decision:
    """``rule``: the entry that allowed the request, or why it was refused. ``hint``: the ``--allow``
    value that would allow it ("" when no entry can)."""

    allowed: bool
    rule: str
    hint: str = ""


IsLocal = Callable[[str], bool]


class Allowlist:
    def __init__(self, entries: Iterable[Entry]):
        self.entries: tuple[Entry, ...] = tuple(dict.fromkeys(entries))

    @classmethod
    def parse(cls, texts: Iterable[str]) -> "Allowlist":
        return cls(parse_entry(text) for text in texts)

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def texts(self) -> list[str]:
        return [entry.text for entry in self.entries]

    def match(self, host: str, port: int) -> tuple[Decision, Entry | None]:
        """Is ``host:port`` (as the client wrote it) on the list?"""
        try:
            canonical, is_ip = canonical_host(host)
        except BadTarget as exc:
            return Decision(False, f"bad host: {exc}"), None
        for entry in self.entries:
            if entry.matches(canonical, port, is_ip):
                return Decision(True, entry.text), entry
        return Decision(False, f"not on the allowlist ({LIST_NAME}, {FLAG})",
                        suggestion(canonical, port)), None

    @staticmethod
    def check_addresses(entry: Entry, host: str, port: int, addresses: Sequence[str],
                        is_local: IsLocal) -> Decision:
        """A name allowed by ``entry`` that resolves to one of the host's own addresses is refused:
        only an entry naming that address (``127.0.0.1:PORT``) opens it."""
        if entry.ip:
            return Decision(True, entry.text)
        for address in addresses:
            if is_local(address):
                return Decision(
                    False,
                    f"{host} resolves to {address}, an address of this host, which only an entry "
                    f"naming the address opens",
                    authority(str(ipaddress.ip_address(address)), port),
                )
        return Decision(True, entry.text)


def local_address(address: str) -> bool:
    """Loopback, unspecified (0.0.0.0 reaches loopback), link-local (cloud metadata), the IPv4 forms
    of those inside IPv6, or any address of this host's interfaces."""
    import socket

    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True  # not an address: never connect to it
    mapped = getattr(ip, "ipv4_mapped", None)
    for candidate in (ip, mapped):
        if candidate is not None and (candidate.is_loopback or candidate.is_unspecified or candidate.is_link_local):
            return True
    # The kernel picks an address of the host itself as the source for a packet to that very address
    # (a UDP connect sends nothing; a bind test would lie under ip_nonlocal_bind).
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((str(ip), 9))
            return ipaddress.ip_address(probe.getsockname()[0].split("%", 1)[0]) == ip
    except OSError:
        return False  # no route from here: not one of the host's addresses
