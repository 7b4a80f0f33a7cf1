"""Option and status types of the public API (``DevOps``'s arguments and results)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from .config import DEFAULTS

DEFAULT_NAME: str = DEFAULTS["vm"]["name"]
DEFAULT_MEMORY: int = DEFAULTS["vm"]["memory"]
DEFAULT_CPUS: int = DEFAULTS["vm"]["cpus"]
DEFAULT_SSH_PORT: int = DEFAULTS["vm"]["ssh_port"]


@dataclass
class BootOptions:
    """``memory`` in MB. ``ssh_port`` None means the configured port (2222), or the next free
    port when that is taken; a number means exactly that port (1 to 65535). ``network`` "" means the
    configured mode (``vm.network``, ``open``); ``restricted`` lets the guest out only through the
    host proxy of ``inv claude``."""

    memory: int = DEFAULT_MEMORY
    cpus: int = DEFAULT_CPUS
    name: str = DEFAULT_NAME
    fresh: bool = False
    ssh_port: int | None = None
    network: str = ""
    mount_type: str = ""  # virtiofs | sshfs; "" = the configured one (vm.mount_type, virtiofs)


def default_boot_options() -> BootOptions:
    return BootOptions()


@dataclass
class DevStatus:
    installed: bool = False
    running: bool = False
    image_version: str = ""
    container_id: str = ""
    memory: int = 0
    cpus: int = 0
    ssh_port: int = DEFAULT_SSH_PORT
    uptime: timedelta = timedelta(0)
    name: str = DEFAULT_NAME
    network: str = ""  # open | restricted while it runs, "" when stopped
    mount_type: str = ""  # virtiofs | sshfs while it runs, "" when stopped
    # live /app mounts (commands' own and kept ones): project, pid, kept, leases, idle, ends_in
    mounts: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["uptime"] = int(self.uptime.total_seconds())
        return data


@dataclass
class ShellOptions:
    """``command`` is a list of words passed to the guest intact; empty means an interactive shell.

    ``mount``: when the current folder is a project (or ``project`` names one), it is mounted at
    ``/app`` and the shell or command starts there.
    """

    console: bool = False
    command: list[str] = field(default_factory=list)
    forward_agent: bool = True
    mount: bool = True
    project: str = ""


@dataclass
class TestOptions:
    """``command`` (words) beats ``name`` (from ``.core/test.yaml``) beats detection."""

    __test__ = False  # not a pytest test class

    name: str = ""
    command: list[str] = field(default_factory=list)
    setup: bool = False  # run the dependency setup even when nothing it depends on changed


@dataclass
class ServeOptions:
    port: int = 8000
    path: str = ""


@dataclass
class ClaudeOptions:
    """``auth`` empty means all kinds; ``no_auth`` forwards nothing, the SSH agent included.
    ``args`` are claude's own words (``-p "..."``), passed intact; ``timeout`` (seconds) ends the
    run from the host; ``notify`` is a host command run when it ends (``$CLAUDE_EXIT_STATUS``).
    ``network`` "" (or ``restricted``) runs claude only on a restricted VM, booting it so when it is
    not running; ``open`` also accepts a VM with open networking. ``allow``: ``host[:port]`` entries
    added to config ``claude.allow`` for this run.
    The agent works on a copy whose changes become a review (``include_ignored``: the copy holds
    git-ignored files too); ``live`` mounts the project instead (``.git`` read-only)."""

    no_auth: bool = False
    auth: list[str] = field(default_factory=list)
    model: str = ""
    args: list[str] = field(default_factory=list)
    timeout: float | None = None
    notify: str = ""
    network: str = ""
    allow: list[str] = field(default_factory=list)
    live: bool = False
    include_ignored: bool = False
