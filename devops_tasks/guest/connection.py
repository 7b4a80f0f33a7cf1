"""The strict Fabric connection factory: the one way this tool opens a Paramiko session to a VM.

:func:`connect` gives the VM's recorded port on 127.0.0.1, strict host-key checking against
``~/.core/known_hosts`` only (never auto-add), the tool's own login key only (no agent keys, no
``~/.ssh`` keys), no ``~/.ssh/config`` or Fabric config files, timeouts, and agent forwarding only
when asked for *and* a local agent exists. :class:`Target` says where a VM's SSH server is.

Fabric and Paramiko are imported inside functions so ``import devops_tasks`` stays fast.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Optional

from ..errors import GuestError

if TYPE_CHECKING:  # pragma: no cover
    from fabric import Connection

LOOPBACK = "127.0.0.1"
GUEST_USER = "root"
CONNECT_TIMEOUT = 15.0


@dataclass(frozen=True)
class Target:
    """Where and how to reach one VM's SSH server."""

    port: int
    identity: Path  # the tool's private login key
    known_hosts: Path  # the only file guest host keys are trusted from
    host: str = LOOPBACK
    user: str = GUEST_USER
    vm_dir: Optional[Path] = None  # names the OpenSSH control socket (one master per VM)

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


# --------------------------------------------------------------------------- local checks


def agent_socket(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``$SSH_AUTH_SOCK`` when it names an existing socket, else None.

    Forwarding an agent that does not exist makes Paramiko's forwarding thread die and the command
    hang, so "forward the agent" always means "forward it if there is one".
    """
    environ = os.environ if environ is None else environ
    path = environ.get("SSH_AUTH_SOCK", "")
    if not path:
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return path if stat.S_ISSOCK(mode) else None


def check_target(target: Target) -> None:
    """The login key and known_hosts must exist: a clear error beats an SSH auth failure."""
    if not os.path.isfile(target.identity):
        raise GuestError(
            f"login key {target.identity} is missing (boot the VM again: 'inv vm.boot --fresh')"
        )
    if not os.path.isfile(target.known_hosts):
        raise GuestError(
            f"{target.known_hosts} is missing, so the VM's host key cannot be checked "
            "(boot the VM again: 'inv vm.boot --fresh')"
        )


# --------------------------------------------------------------------------- Fabric


def connect(
    target: Target,
    forward_agent: bool = False,
    connect_timeout: float = CONNECT_TIMEOUT,
    open: bool = True,
) -> "Connection":
    """The one factory for Fabric connections to a VM (opened unless ``open=False``).

    Strict: the host key must be in ``target.known_hosts`` (a wrong key raises, a missing entry
    raises, nothing is ever added); only ``target.identity`` is offered; no SSH or Fabric config
    file is read.
    """
    import logging

    import paramiko
    from fabric import Config, Connection

    # Paramiko logs refused forward channels and similar at ERROR; Python's last-resort handler
    # would print them on stderr. Errors that matter are raised and reported by this module.
    logging.getLogger("paramiko").addHandler(logging.NullHandler())
    check_target(target)
    config = Config(
        lazy=True,  # no /etc/fabric.yaml, ~/.fabric.yaml
        ssh_config=paramiko.SSHConfig(),  # an explicit empty config: no ~/.ssh/config, no /etc/ssh
        overrides={"load_ssh_configs": False, "run": {"echo": False}},
    )
    conn = Connection(
        target.host,
        user=target.user,
        port=target.port,
        config=config,
        connect_timeout=int(max(1, connect_timeout)),
        forward_agent=bool(forward_agent and agent_socket() is not None),
        inline_ssh_env=True,
        connect_kwargs={
            "key_filename": [str(target.identity)],
            "look_for_keys": False,
            "allow_agent": False,
            "banner_timeout": connect_timeout,
            "auth_timeout": connect_timeout,
        },
    )
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        conn.client.load_host_keys(str(target.known_hosts))
    except OSError as exc:
        raise GuestError(f"cannot read {target.known_hosts}: {exc.strerror or exc}") from None
    if open:
        _open(conn, target)
    return conn


def _open(conn: "Connection", target: Target) -> None:
    import paramiko

    try:
        conn.open()
    except paramiko.BadHostKeyException:
        raise GuestError(
            f"the VM at {target.host}:{target.port} presented a host key that does not match "
            f"{target.known_hosts}; refusing to connect (if the VM was replaced, boot it again: "
            "'inv vm.boot --fresh')"
        ) from None
    except paramiko.AuthenticationException as exc:
        raise GuestError(
            f"the VM at {target.host}:{target.port} rejected the login key {target.identity} ({exc})"
        ) from None
    except paramiko.SSHException as exc:
        if "known_hosts" in str(exc):
            raise GuestError(
                f"no host key for [{target.host}]:{target.port} in {target.known_hosts}; refusing "
                "to connect to an unknown host (boot the VM with 'inv vm.boot')"
            ) from None
        raise GuestError(f"SSH to the VM at {target.host}:{target.port} failed: {exc}") from None
    except (OSError, EOFError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise GuestError(
            f"cannot reach the VM's SSH server at {target.host}:{target.port}: {reason} "
            "(is it running? 'inv vm.status')"
        ) from None


@contextlib.contextmanager
def session(target: Target, forward_agent: bool = False) -> Iterator["Connection"]:
    """An open connection for the ``with`` block, closed after it."""
    conn = connect(target, forward_agent=forward_agent)
    try:
        yield conn
    finally:
        conn.close()
