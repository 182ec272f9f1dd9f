"""SIGTERM and SIGINT ask the run to stop at the next step boundary, not to die mid-write.

Cluster schedulers send SIGTERM before killing a job; Ctrl-C sends SIGINT. The
handler only records the request; the loop checks it between steps (agreeing
across ranks), saves a checkpoint and exits non-zero. A second signal of the
same kind restores the default behaviour, so a stuck run can still be killed.
"""
import signal
from typing import Dict, Optional


class StopRequest:
    """Installed for the duration of a run (``with StopRequest() as stop:``)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: Dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> "StopRequest":
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
