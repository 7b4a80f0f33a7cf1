"""The ``DevOps`` facade: the reference's public API, composing the parts below it.

Each method is a thin call into the module that owns the concern (``lifecycle`` for the VM,
``images`` for install/update, ``workspace`` for shell/test/serve, ``sandbox`` for Claude), so the
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

Echo = Callable[[str], None]
Progress = Callable[[int, int], None]


def _print(line: str) -> None:
    print(line, flush=True)


class DevOps:
    """A dev environment: one named VM, its image and the projects run in it.

    ``echo`` receives the human-readable lines (the original CLI's text); pass ``lambda _: None``
    for a silent library.
    """

    def __init__(self, config: Optional[Config] = None, name: str = "", echo: Echo = _print):
        self.config = config if config is not None else load_config()
        self.name = name or self.config.vm.name
        self.echo = echo
        self._images = None

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
        from . import lifecycle

        return lifecycle.boot(self, opts if opts is not None else self.default_boot_options())

    def stop(self) -> bool:
        """Stop the VM; False when it was not running."""
        from . import lifecycle

        return lifecycle.stop(self)

    def is_running(self) -> bool:
        from . import lifecycle

        return lifecycle.is_running(self)

    def status(self) -> DevStatus:
        from . import lifecycle

        return lifecycle.status(self)

    def logs(self, follow: bool = False) -> None:
        """Print the VM's serial console log (``follow``: until Ctrl-C)."""
        from . import lifecycle

        lifecycle.logs(self, follow=follow)

    def console(self) -> None:
        """Attach this terminal to the VM's serial console (detach with Ctrl-])."""
        from . import lifecycle

        lifecycle.console(self)

    # -- working in the VM ------------------------------------------------------------------
    def shell(self, opts: Optional[ShellOptions] = None) -> int:
        from . import workspace

        return workspace.shell(self, opts or ShellOptions())

    def test(self, project_dir: Path | str, opts: Optional[TestOptions] = None) -> int:
        from . import workspace

        return workspace.test(self, Path(project_dir), opts or TestOptions())

    def serve(self, project_dir: Path | str, opts: Optional[ServeOptions] = None) -> int:
        from . import workspace

        return workspace.serve(self, Path(project_dir), opts or ServeOptions())

    def claude(self, project_dir: Path | str, opts: Optional[ClaudeOptions] = None) -> int:
        from . import sandbox

        return sandbox.claude(self, Path(project_dir), opts or ClaudeOptions())

