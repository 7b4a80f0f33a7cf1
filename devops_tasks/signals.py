"""Signal handling shared by every part that runs something on the user's behalf.

One save/restore helper, so a handler installed for a ``with`` block is always put back, and one
rule for "the user asked us to stop": SIGTERM and SIGHUP unwind like Ctrl-C (KeyboardInterrupt),
so whatever the block started (a half-booted VM, a guest command, a mount) is cleaned up.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator, Sequence, Union

Handler = Union[Callable, int]

INTERRUPTED = 130  # 128 + SIGINT: the status a shell reports for a command ended by Ctrl-C


@contextlib.contextmanager
def signal_handlers(names: Sequence[str], handler: Handler) -> Iterator[None]:
    """Install ``handler`` for these signals during the block, then restore the previous ones.

    Main thread only (elsewhere Python cannot install handlers: the block runs unchanged). A signal
    the process ignores stays ignored (``nohup`` keeps working).
    """
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for name in names:
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                saved[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def stop_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt during the block, as Ctrl-C does."""
    return signal_handlers(("SIGTERM", "SIGHUP"), _interrupt)
