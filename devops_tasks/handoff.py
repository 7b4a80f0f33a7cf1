"""What the host hands the guest at each boot besides its keys: the CA certificates the host trusts
beyond the public ones (a TLS-intercepting gateway's, a company's own) and its proxy settings.

Both go in the way the keys do: files in the VM's folder (0600) passed with ``-fw_cfg``, which the
guest's ssh service reads into tmpfs at boot; nothing reaches the image or the VM's disk, and a
boot without them (``vm.trust_host_ca: false``, the proxy variables unset) leaves no trace of an
earlier one. Only the certificates the guest lacks are sent: the guest reads a firmware file in
page-sized steps that each start again from its beginning, so the whole bundle (~220 kB) would cost
about a second under TCG and many under KVM; the few extra ones cost nothing. The guest adds them
to its own bundle (Debian's, in the ``dev`` image).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import shlex
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError
from .fsutil import atomic_write_bytes

CA_FILE = "ca-certificates.crt"  # fw_cfg names, under opt/devops-tasks/
ENV_FILE = "env"
# The host's loopback as the guest sees it (QEMU user networking)
GUEST_HOST_ADDRESS = "10.0.2.2"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
GUEST_NO_PROXY = ("localhost", "127.0.0.1", "::1")
# Where hosts keep their system bundle (Debian/Ubuntu/Alpine, Fedora/RHEL, macOS/BSD)
SYSTEM_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")
# Debian's copy of Mozilla's list, on Debian and Ubuntu hosts (what the guest's own bundle holds)
DEBIAN_MOZILLA_CERTS = "/usr/share/ca-certificates/mozilla"
MAX_BUNDLE = 16 << 20

_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.DOTALL)
_LOOPBACK_HOSTS = {"localhost", "::1", "ip6-localhost"}


# -- CA certificates -----------------------------------------------------------------------------

def certificates(data: bytes) -> list[bytes]:
    """The DER bytes of every PEM ``CERTIFICATE`` block in ``data``; anything else (a private key,
    text, a broken block) is left out, so only certificates ever leave the host."""
    found = []
    for match in _PEM_RE.finditer(data):
        try:
            der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except (binascii.Error, ValueError):
            continue
        if der and der not in found:
            found.append(der)
    return found


def to_pem(ders: Iterable[bytes]) -> bytes:
    out = []
    for der in ders:
        body = base64.b64encode(der)
        lines = b"\n".join(body[i:i + 64] for i in range(0, len(body), 64))
        out.append(b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n")
    return b"".join(out)


def _read_bundle(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BUNDLE + 1)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_BUNDLE:
        raise ConfigError(f"{what}: {path} is larger than {MAX_BUNDLE >> 20} MiB; is it a CA bundle?")
    return data


def host_bundle(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The bundle this host's tools trust: the one SSL_CERT_FILE / REQUESTS_CA_BUNDLE /
    CURL_CA_BUNDLE names, else the system's; None when there is none."""
    for variable in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        value = environ.get(variable, "")
        if value and os.path.isfile(value):
            return Path(value)
    return next((Path(p) for p in SYSTEM_CA_BUNDLES if os.path.isfile(p)), None)


def public_certificates(debian_dir: str = DEBIAN_MOZILLA_CERTS) -> set[bytes]:
    """Mozilla's list, which the guest's own bundle already holds: certifi's copy (requests brings
    it) and, on a Debian or Ubuntu host, Debian's."""
    known: set[bytes] = set()
    with contextlib.suppress(ImportError, OSError):
        import certifi

        known.update(certificates(Path(certifi.where()).read_bytes()))
    with contextlib.suppress(OSError):
        for path in Path(debian_dir).glob("*.crt"):
            known.update(certificates(path.read_bytes()))
    return known


def extra_certificates(trust_host_ca: bool = True, ca_bundle: str = "",
                       environ: Mapping[str, str] = os.environ,
                       public: set[bytes] | None = None) -> tuple[list[bytes], Path | None]:
    """The certificates to hand the guest and the file they came from: those of ``ca_bundle``
    (``vm.ca_bundle``) or of the host's bundle that are not public. ``([], None)`` when turned off
    or when the host has no bundle; a configured bundle that is missing or holds no certificate is
    an error naming ``vm.ca_bundle``."""
    if not trust_host_ca:
        return [], None
    if ca_bundle:
        path = Path(ca_bundle).expanduser()
        found = certificates(_read_bundle(path, "vm.ca_bundle"))
        if not found:
            raise ConfigError(f"vm.ca_bundle: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    else:
        path = host_bundle(environ)
        if path is None:
            return [], None
        try:
            found = certificates(_read_bundle(path, "the host's CA bundle"))
        except ConfigError:
            return [], None  # an unreadable system bundle: the guest keeps its own
    known = public_certificates() if public is None else public
    return [der for der in found if der not in known], path


# -- proxy settings ------------------------------------------------------------------------------

def _reachable_from_guest(url: str) -> str:
    """A proxy URL as the guest must write it: one on the host's loopback is the host's address
    on the guest's network instead (userinfo and port kept)."""
    text = url if "://" in url else f"http://{url}"
    try:
        parts = urlsplit(text)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return url
    if host not in _LOOPBACK_HOSTS and not host.startswith("127."):
        return url
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + GUEST_HOST_ADDRESS + (f":{port}" if port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def guest_proxy_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The proxy variables the guest gets: the host's ``http_proxy``, ``https_proxy``,
    ``all_proxy`` and ``no_proxy`` (lower case first, as curl and Python read them), each in both
    spellings (curl reads only the lower-case ``http_proxy``), a proxy on the host's loopback
    rewritten to the address the guest reaches the host at, and ``no_proxy`` always covering the
    guest's own loopback. The one place that decides them."""
    env: dict[str, str] = {}
    for name in PROXY_VARIABLES:
        value = (environ.get(name) or environ.get(name.upper()) or "").strip()
        if not value or "\n" in value or "\0" in value:
            continue
        env[name] = value if name == "no_proxy" else _reachable_from_guest(value)
    if any(name in env for name in PROXY_VARIABLES[:3]):
        listed = [item.strip() for item in env.get("no_proxy", "").split(",") if item.strip()]
        env["no_proxy"] = ",".join(listed + [host for host in GUEST_NO_PROXY if host not in listed])
    for name in list(env):
        env[name.upper()] = env[name]
    return env


def env_file(env: Mapping[str, str]) -> bytes:
    """``export NAME='value'`` lines the guest's shell sources."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items()).encode()


# -- the files -----------------------------------------------------------------------------------

def boot_data(trust_host_ca: bool = True, ca_bundle: str = "",
              environ: Mapping[str, str] = os.environ) -> dict[str, bytes]:
    """This boot's hand-off, by fw_cfg name (only what there is). A broken ``vm.ca_bundle`` fails
    here, before anything is started or written."""
    wanted: dict[str, bytes] = {}
    extra, _source = extra_certificates(trust_host_ca, ca_bundle, environ)
    if extra:
        wanted[CA_FILE] = to_pem(extra)
    env = guest_proxy_env(environ)
    if env:
        wanted[ENV_FILE] = env_file(env)
    return wanted


def write_boot_files(folder: Path, wanted: Mapping[str, bytes]) -> tuple[tuple[str, Path], ...]:
    """Write the hand-off into the VM's ``folder`` (0600) and remove what this boot does not hand
    over; -> (fw_cfg name, file) pairs for QEMU."""
    files = []
    for name in (CA_FILE, ENV_FILE):
        path = Path(folder) / f"guest-{name}"
        if name in wanted:
            atomic_write_bytes(path, wanted[name], 0o600)
            files.append((name, path))
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return tuple(files)


def boot_files(folder: Path, trust_host_ca: bool = True, ca_bundle: str = "",
               environ: Mapping[str, str] = os.environ) -> tuple[tuple[str, Path], ...]:
    """:func:`boot_data` written by :func:`write_boot_files`."""
    return write_boot_files(folder, boot_data(trust_host_ca, ca_bundle, environ))
