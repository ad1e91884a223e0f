"""One error type for problems with the user's input, and the wrapper every script runs under.

A `CoTexNetError` is something the user can fix (a missing file, a config typo): the script
prints its message on one line and exits with status 2. Anything else is a bug and keeps its
traceback. `--debug` on any script shows the traceback of a `CoTexNetError` too. What the
user should know but need not fix is one `warning: <file>: <what>` line (`warn_once`).
SIGTERM (`kill`, a job scheduler) does what Ctrl-C does, so that a stopped command cleans up
the same way: temporaries removed, "interrupted", exit status 130.
"""

from __future__ import annotations

import hashlib
import mmap
import signal
import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
SHOW = 5  # names a message lists as examples
# The warnings said, as bits of a hash: anonymous shared memory, so that the processes a command
# forks (DataLoader workers, a new set each epoch; process pools) say each warning once between
# them. 32 Mbit: after 10,000 different warnings, a new one is lost to a collision once in ~3,000.
_SAID = mmap.mmap(-1, 1 << 22)


class CoTexNetError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def not_utf8(path, err: UnicodeDecodeError, fix: str = "save it as UTF-8") -> CoTexNetError:
    """The one message for a text file that is not UTF-8, with the first bad byte."""
    return CoTexNetError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#x} at {err.start}); {fix}")


def warn_once(path, what: str) -> None:
    """One warning line naming the file, once per file and message in a command (a Dataset reads
    every file each epoch, in new worker processes each time)."""
    key = int.from_bytes(hashlib.blake2b(f"{path}\0{what}".encode(), digest_size=8).digest(), "little")
    byte, bit = divmod(key % (len(_SAID) * 8), 8)
    if not _SAID[byte] >> bit & 1:
        _SAID[byte] |= 1 << bit
        print(f"warning: {path}: {what}", file=sys.stderr)


def user_message(err: CoTexNetError) -> str:
    """The error's one line. A DataLoader worker re-raises the error with its whole traceback
    as the message; the user's line is the original message at its end."""
    text = str(err)
    original = f"{CoTexNetError.__module__}.{CoTexNetError.__qualname__}: "
    if "Original Traceback" in text and original in text:
        text = text.rsplit(original, 1)[1]
    return " ".join(text.split())


def _terminate_as_interrupt(signum, frame) -> None:
    """SIGTERM runs whatever Ctrl-C runs now (train.py's finish-the-epoch handler, or Python's
    KeyboardInterrupt); where SIGINT is ignored (a background job), it still stops the command."""
    on_interrupt = signal.getsignal(signal.SIGINT)
    if callable(on_interrupt):
        on_interrupt(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a script's `main(argv)`, turning a `CoTexNetError` into one line on stderr and exit 2,
    and Ctrl-C or SIGTERM into "interrupted" and exit 130."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        main([a for a in args if a != "--debug"])
    except CoTexNetError as err:
        if debug:
            raise
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        signal.signal(signal.SIGTERM, previous)
