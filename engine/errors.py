"""Bad input ends in one clear line and a non-zero exit, never a traceback.

Code that finds a problem with what the user gave (a path, a flag, a file)
raises :class:`UsageError` with a message that names the problem and the fix.
Entry points run under :func:`run_cli`, which prints that message and exits
with status 2. A job that cannot go on because another process died or hung
raises :class:`JobFailed` (one line, status 1). Anything else is a bug and
keeps its traceback.
"""
import os
import signal
import sys
from typing import Callable, NoReturn, Optional, Sequence

EXIT_USAGE = 2
EXIT_JOB_FAILED = 1
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Something the user supplied is wrong; the message says what and how to fix it."""


class Interrupted(Exception):
    """The run was stopped by a signal after saving what it had; the message says how to resume."""

    def __init__(self, message: str, signal_name: Optional[str] = None):
        super().__init__(message)
        self.exit_code = 128 + int(getattr(signal, signal_name)) if signal_name else EXIT_INTERRUPTED


class JobFailed(Exception):
    """The job cannot go on for a reason outside this process (another rank died or hung); the message says so."""


def report_and_exit(action: Callable[[], object]) -> NoReturn:
    """Run ``action()`` and turn expected failures into one line on stderr and an exit status.

    Set ``ECA_DEBUG=1`` to see the traceback behind a usage error as well.
    """
    prog = os.path.basename(sys.argv[0]) or "eca"
    try:
        action()
    except (UsageError, JobFailed) as error:
        if os.environ.get("ECA_DEBUG"):
            raise
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE if isinstance(error, UsageError) else EXIT_JOB_FAILED)
    except Interrupted as stop:
        print(f"{prog}: {stop}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except BrokenPipeError:
        # The reader went away (``| head``): not an error of ours. Point stdout at devnull so the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    sys.exit(0)


def run_cli(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Run an entry point's ``main(argv)`` under :func:`report_and_exit`."""
    report_and_exit(lambda: main(argv))
