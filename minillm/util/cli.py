"""What every command-line job shares (train.py, generate.py, export.py and the `python -m` jobs of
run.py's verb table): an argument parser that reads negative numbers as values, and one line on
stderr for a user's error instead of a traceback.

    if __name__ == "__main__":
        sys.exit(run_cli(main))          # main(argv) raises; run_cli turns a user error into
                                         #   error: <message>        (stderr, exit status 1)

The rule goes by exception type. minillm reports a bad input (a missing or malformed file, a
config value out of range, a full disk, no GPU) as an OSError, ValueError, TypeError, KeyError,
RuntimeError or FloatingPointError (or a subclass: UnicodeDecodeError, DiskFullError, ...), and
those print one line. So does a bug that happens to raise one of these types; anything else (an
AttributeError, an IndexError, ...) keeps its traceback. `--debug` on the command line, or
MINILLM_DEBUG=1 in the environment, shows the full traceback for every error.

Negative numbers: argparse takes `--schedule.max_lr -1e-3` for two flags ("expected one argument"),
because it only recognises -1 and -0.001 as numbers, not -1e-3, -inf or -nan. The parser below
rewrites a flag that takes a value followed by such a number into `--flag=-1e-3`, which argparse
reads as one argument; the value then reaches the config checks, which say what is wrong with it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

USER_ERRORS = (OSError, ValueError, TypeError, KeyError, RuntimeError, FloatingPointError)
DEBUG_ENV = "MINILLM_DEBUG"


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with a --debug flag, that reads `--flag -1e-3` as --flag=-1e-3."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"on an error, show the full traceback (also: {DEBUG_ENV}=1)")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._join_negative_values(args), namespace)

    def _join_negative_values(self, args: list[str]) -> list[str]:
        out, i = [], 0
        while i < len(args):
            action = self._option_string_actions.get(args[i])
            takes_one = action is not None and action.nargs is None and action.option_strings
            if (takes_one and i + 1 < len(args) and args[i + 1].startswith("-")
                    and _is_number(args[i + 1])):
                out.append(f"{args[i]}={args[i + 1]}")
                i += 2
            else:
                out.append(args[i])
                i += 1
        return out


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse `type=` for an integer flag that must be >= low (a batch size of -1 or a limit of
    0 is refused with argparse's one-line usage error, not computed with)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, "
                                             f"found {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, found {value}")
        return value

    return parse


def finite_float(text: str) -> float:
    """An argparse `type=` for a float flag that must be a finite number (no nan, no inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, found {text!r}")
    return value


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_message(exc: BaseException) -> str:
    """The exception's own text (KeyError's str() would add quotes), or its type when it has
    none."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return str(text) or type(exc).__name__


def run_cli(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run main(argv); return the exit status: main's own when it returns an int (the GGUF doctor's
    1 for a faulty file), else 0; 1 after printing `error: <message>` to stderr for a user error,
    130 after Ctrl-C. With --debug or MINILLM_DEBUG=1 the exception propagates instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        status = main(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
