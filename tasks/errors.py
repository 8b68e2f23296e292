"""One exception type for bad input, and the wrapper that turns it into one clear line for the CLIs."""
import functools
import sys


class SapoError(Exception):
    """Bad input the user can fix: a missing file, malformed JSON, an unknown name. Printed as one line, exit 2."""


def cli_main(fn):
    """Decorate a script's main(): a SapoError (or a missing file) becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SapoError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: rerun the same command to resume", file=sys.stderr)
            sys.exit(130)

    return wrapper
