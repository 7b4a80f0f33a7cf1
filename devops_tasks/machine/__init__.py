"""The ``machine`` part: QEMU's command line, its process, and the per-VM record.

It knows nothing about SSH; :mod:`devops_tasks.hostkeys` and :mod:`devops_tasks.lifecycle` build on it.
"""

from .qemu import MachineSpec, build_argv, detect_accel, qemu_binary
from .records import VMDir, VMRecord

__all__ = ["MachineSpec", "build_argv", "detect_accel", "qemu_binary", "VMDir", "VMRecord"]
