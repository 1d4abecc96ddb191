r"""The ``pyro-mixflow`` command line (also ``python -m pyro_mixflow``).

:func:`main` runs it: :mod:`~pyro_mixflow.cli.parsing` holds the parser,
:mod:`~pyro_mixflow.cli.commands` the ``fit``, ``score`` and ``sample`` commands,
:mod:`~pyro_mixflow.cli.demo` the ``demo`` and :mod:`~pyro_mixflow.cli.files` the data files.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from pyro_mixflow.cli.commands import CommandFailed
from pyro_mixflow.cli.parsing import build_parser
from pyro_mixflow.fitting import cpu_training

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    Args:
        argv: Arguments without the program name (``sys.argv[1:]`` when ``None``).

    Returns:
        0 on success; 2 on a usage or input error, 1 if training diverged, 130 on Ctrl-C
        (each reported on one line of stderr, no traceback).

    Example:
        >>> main(["--version"])  # doctest: +ELLIPSIS
        pyro-mixflow ...
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error already reported on one line
        return stop.code if isinstance(stop.code, int) else 2
    if args.version:
        from pyro_mixflow import __version__

        print(f"pyro-mixflow {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with cpu_training(getattr(args, "threads", None)):  # and flush subnormal floats
            return args.run(args)
    except CommandFailed as error:
        return _report(error, 1)
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, like Unix tools
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as error:
        return _report(error, 2)
    except KeyboardInterrupt:
        print("pyro-mixflow: interrupted; output files are left as they were", file=sys.stderr)
        return 130


def _report(error: BaseException, status: int) -> int:
    message = " ".join(str(error).split())  # one line, whatever the exception held
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f"{error.filename}: {error.strerror}"
    print(f"pyro-mixflow: error: {message}", file=sys.stderr)
    return status
