"""The ``DevOps`` facade: the public API on top of the library.

It holds a :class:`~.lifecycle.VM` (``self.vm``) and an :class:`~.images.ImageManager`
(``self.images``) and hands the VM to the parts that work in it (``workspace`` for
shell/test/serve, ``claude_code`` for Claude); none of them calls back into the facade, so the
facade stays a readable table of contents. Heavy imports (Fabric, requests) happen on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from .config import Config, load_config
from .options import (
    BootOptions,
    ClaudeOptions,
    DevStatus,
    ServeOptions,
    ShellOptions,
    TestOptions,
)

Progress = Callable[[int, int], None]


class DevOps:
    """A dev environment: one named VM, its image and the projects run in it.

    ``echo`` receives the human-readable lines (the original CLI's text); pass ``lambda _: None``
    for a silent library.
    """

    def __init__(self, config: Optional[Config] = None, name: str = "", echo: Optional[Callable[[str], None]] = None):
        from .lifecycle import VM, print_line

        self.config = config if config is not None else load_config()
        self.echo = echo if echo is not None else print_line
        self.vm = VM(name or self.config.vm.name, self.config, self.echo)
        self._images = None

    @property
    def name(self) -> str:
        return self.vm.name

    # -- images -----------------------------------------------------------------------------
    @property
    def images(self):
        """The :class:`ImageManager` for this config (created on first use)."""
        if self._images is None:
            from .images import ImageManager

            self._images = ImageManager(self.config, echo=self.echo)
        return self._images

    def install(self, progress: Optional[Progress] = None, source: str = "") -> None:
        self.images.install(progress=progress, source=source)

    def check_update(self) -> tuple[str, str, bool]:
        return self.images.check_update()

    # -- the VM -----------------------------------------------------------------------------
    def default_boot_options(self) -> BootOptions:
        vm = self.config.vm
        return BootOptions(memory=vm.memory, cpus=vm.cpus, name=self.name)

    def boot(self, opts: Optional[BootOptions] = None) -> DevStatus:
        """Boot the VM; options naming another VM make this facade work on that one from now on."""
        opts = opts if opts is not None else self.default_boot_options()
        if opts.name and opts.name != self.vm.name:
            from .lifecycle import VM

            self.vm = VM(opts.name, self.config, self.echo)
        return self.vm.boot(opts)

    def stop(self) -> bool:
        """Stop the VM; False when it was not running."""
        return self.vm.stop()

    def is_running(self) -> bool:
        return self.vm.is_running()

    def status(self) -> DevStatus:
        return self.vm.status()

    def logs(self, follow: bool = False) -> None:
        """Print the VM's serial console log (``follow``: until Ctrl-C)."""
        self.vm.logs(follow=follow)

    def console(self) -> None:
        """Attach this terminal to the VM's serial console (detach with Ctrl-])."""
        self.vm.console()

    # -- VMs as things kept: list, delete, OpenSSH config, snapshots, disk size ---------------
    def list_vms(self) -> list:
        """Every VM under ``~/.core/vms`` (:class:`~.vms.VMSummary`), running or not."""
        from . import vms

        return vms.list_vms()

    def delete(self, force: bool = False) -> int:
        """Remove the VM (disk, snapshots, keys, logs); the bytes freed. ``force`` stops it first."""
        from . import vms

        return vms.delete(self.vm, force=force)

    def ssh_config(self):
        """The VM's OpenSSH config block (:class:`~.vms.SshConfig`), for ``ssh -F`` and ``Include``."""
        from . import vms

        return vms.ssh_config(self.vm)

    def snapshots(self) -> list:
        from . import vms

        return vms.snapshots(self.vm)

    def save_snapshot(self, tag: str):
        from . import vms

        return vms.save_snapshot(self.vm, tag)

    def restore_snapshot(self, tag: str) -> None:
        from . import vms

        vms.restore_snapshot(self.vm, tag)

    def delete_snapshot(self, tag: str) -> None:
        from . import vms

        vms.delete_snapshot(self.vm, tag)

    def resize_disk(self, size: str) -> tuple[int, int]:
        """Grow the stopped VM's disk (``20G``, ``+2G``); (old, new) bytes."""
        from . import vms

        return vms.resize_disk(self.vm, size)

    def copy(self, source: str, dest: str):
        """Copy between this machine and the VM, the VM's side written ``:PATH``."""
        from . import workspace

        return workspace.copy(self.vm, source, dest)

    # -- working in the VM ------------------------------------------------------------------
    def shell(self, opts: Optional[ShellOptions] = None) -> int:
        from . import workspace

        return workspace.shell(self.vm, opts or ShellOptions())

    def test(self, project_dir: Path | str, opts: Optional[TestOptions] = None) -> int:
        from . import workspace

        return workspace.test(self.vm, project_dir, opts or TestOptions())

    def serve(self, project_dir: Path | str, opts: Optional[ServeOptions] = None) -> int:
        from . import workspace

        return workspace.serve(self.vm, project_dir, opts or ServeOptions())

    def claude(self, project_dir: Path | str, opts: Optional[ClaudeOptions] = None) -> int:
        from . import claude_code

        return claude_code.claude(self.vm, project_dir, opts or ClaudeOptions())
