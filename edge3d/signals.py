"""SIGTERM ends a streaming loop the way Ctrl-C does.

``timeout``, ``docker stop`` and ``systemctl stop`` send SIGTERM, whose default action kills the
process at once: ``edge3d run`` then printed no summary and lost the predictions still buffered
for ``--output`` (about 90 lines), and the camera app printed no closing line. Inside
:func:`sigterm_as_interrupt`, SIGTERM raises :class:`Terminated`, a ``KeyboardInterrupt``, so the
code that already handles Ctrl-C closes files and reports; the caller tells the two apart to pick
the exit code (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a streaming loop ran."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Raise :class:`Terminated` on SIGTERM inside the block, and restore the old handler after.

    Only the main thread may set handlers; elsewhere (an app that streams from a worker thread)
    the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
