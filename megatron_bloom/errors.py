"""How a run reports a problem it cannot get past: one ``error:`` line on stderr, exit code 2.

This module imports nothing from the package, so any module may raise these errors and any entry
point (``launch/``, ``data_tools/``, ``benchmarks/``) may report them with ``run_main``.

* ``UserError``: the input is wrong (a flag, a YAML key, a path, a corrupt file, a checkpoint that
  does not match). The message names the problem and the fix.
* ``RunStopped``: the run stopped itself on purpose (``--nan-policy stop``); not the user's input,
  reported the same way so that a job script sees exit code 2 and one line.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Optional

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(ValueError):
    """Bad input (configuration, data, paths, checkpoints): reported in one line, exit code 2."""


class RunStopped(RuntimeError):
    """The run stopped itself by policy; reported in one line, exit code 2."""


def fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with ``code``.

    One write of the whole line: the ranks of a job share one stderr pipe, and a line written in
    two pieces (text, then newline) can have another rank's line land between them."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def run_main(main: Callable[..., Optional[int]], *args, cleanup: Optional[Callable[[], None]] = None, **kwargs) -> NoReturn:
    """Run an entry point's ``main`` and exit with its code; problems end as one ``error:`` line.

    ``UserError``/``RunStopped`` exit 2 with their message; an ``OSError`` (a missing or unreadable
    file) exits 2 naming the file; Ctrl-C exits 130. ``cleanup`` runs on every path before the exit.
    """
    code = 0
    message: Optional[str] = None
    try:
        code = main(*args, **kwargs) or 0
    except (UserError, RunStopped) as exc:
        message, code = str(exc), EXIT_USER_ERROR
    except OSError as exc:
        name = f"{exc.filename}: " if exc.filename else ""
        message, code = f"{name}{exc.strerror or exc}", EXIT_USER_ERROR
    except KeyboardInterrupt:
        message, code = "interrupted", EXIT_INTERRUPTED
    finally:
        if cleanup is not None:
            cleanup()
    if message is not None:
        fail(message, code)
    raise SystemExit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are ``UserError``s: one ``error:`` line, exit code 2, no usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}")
