"""Which backend mounts the project (:func:`open_mount`): virtiofs on a VM booted for it, else sshfs.

* The VM's mount type (``vm.mount_type``, recorded at boot) says ``virtiofs``, and the mount needs
  no read-only paths: :class:`~.virtiofs.VirtiofsMount` (hot-plugged for this command). When the
  host has no virtiofsd or bubblewrap, or the guest image no virtiofs module, a one-line note says
  so and sshfs serves the command instead.
* ``read_only`` paths (``.git`` under ``inv claude --live``): sshfs, whose sandbox binds them
  read-only; virtiofs shares one tree with one set of rights.
* otherwise sshfs (:class:`~.mount.Mount`).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from .mount import GUEST_APP_DIR, Mount
from .virtiofs import VirtiofsMount, VirtiofsUnavailable


class ProjectMount:
    """A project mount of either type behind one interface (``start``, ``stop``, ``with``); after
    :meth:`start`, ``mount_type`` says which one serves it (``virtiofs`` or ``sshfs``)."""

    def __init__(self, conn, host_dir: os.PathLike | str, guest_dir: str = GUEST_APP_DIR,
                 mount_type: str = "sshfs", qmp=None, runtime_dir: Optional[os.PathLike | str] = None,
                 read_only: Sequence[str] = (), confine: Optional[str] = None, note=None):
        self.conn = conn
        self.host_dir = host_dir
        self.guest_dir = guest_dir
        self.wanted = mount_type
        self.qmp = qmp
        self.runtime_dir = runtime_dir
        self.read_only = tuple(read_only)
        self.confine = confine
        self.note = note or (lambda line: print(line, file=sys.stderr, flush=True))
        self.mount_type = ""
        self.inner = None

    def __enter__(self) -> "ProjectMount":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def reused(self) -> bool:
        return bool(self.inner is not None and self.inner.reused)

    def start(self) -> None:
        if self.wanted == "virtiofs" and not self.read_only and self.qmp is not None and self.runtime_dir:
            inner = VirtiofsMount(self.conn, self.host_dir, self.qmp, self.runtime_dir, self.guest_dir)
            try:
                inner.start()
            except VirtiofsUnavailable as exc:
                self.note(f"Note: mounting the project over sshfs, not virtiofs: {exc}")
            else:
                self.inner, self.mount_type = inner, "virtiofs"
                return
        inner = Mount(self.conn, self.host_dir, self.guest_dir, confine=self.confine, read_only=self.read_only)
        inner.start()
        self.inner, self.mount_type = inner, "sshfs"

    def stop(self) -> None:
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.stop()


def open_mount(conn, host_dir: os.PathLike | str, guest_dir: str = GUEST_APP_DIR, *, mount_type: str = "sshfs",
               qmp=None, runtime_dir: Optional[os.PathLike | str] = None,
               read_only: Sequence[str] = (), confine: Optional[str] = None, note=None) -> ProjectMount:
    """The project mount for a VM whose recorded mount type is ``mount_type`` (see the module);
    ``qmp(command, arguments, timeout)`` runs a QMP command on that VM (virtiofs hot-plugs with it)."""
    return ProjectMount(conn, host_dir, guest_dir, mount_type, qmp, runtime_dir, read_only, confine, note)
