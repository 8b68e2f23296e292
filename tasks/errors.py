"""One exception type for bad input, the wrapper that turns it (or an environment error: a full disk, a read-only
directory) into one clear line for the CLIs, and their exit."""
import contextlib
import errno
import functools
import os
import re
import shutil
import signal
import sys
import threading


class SapoError(Exception):
    """Bad input the user can fix: a missing file, malformed JSON, an unknown name. Printed as one line, exit 2."""


# OS errors that say something about the machine, not about the code: printed as one line naming the path.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                      errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ENOTEMPTY, errno.EIO}

_at_exit = []  # resources main() holds until it returns (the run directory's lock), released in this order reversed
_output_places = []  # where main() writes (the run directory): named when a write fails without a file name


def writing_under(place):
    """Register the directory main() writes its results under: a failed write() that names no file (a full disk
    inside a plain file write) is reported as under this directory."""
    _output_places.append(str(place))


def release_at_main_exit(release):
    """Call `release()` when the cli_main-wrapped main() returns or fails (also when a test calls main() again in
    the same process, where a dead process's resources would otherwise stay held)."""
    _at_exit.append(release)


def release_main_resources():
    while _at_exit:
        _at_exit.pop()()
    _output_places.clear()


def describe_os_error(e: OSError) -> str:
    """'<path>: <what the OS said>', the way a shell names a failed file operation."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    return f"{paths}: {e.strerror or e}" if paths else str(e.strerror or e)


def free_bytes(path) -> int | None:
    """Free space on the device that holds `path` (or its nearest existing parent)."""
    try:
        existing = os.path.abspath(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        return shutil.disk_usage(existing).free
    except OSError:
        return None


# How torch's zip writer (torch.save, accelerate's save_state) reports a failed write: no errno, no file name.
TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")


@contextlib.contextmanager
def writing(path):
    """Name `path` in a failed write. A plain write() on a full disk raises an OSError without a file name, torch's
    zip writer an opaque RuntimeError ("unexpected pos 576 vs 534"), safetensors a SafetensorError ("I/O error: No
    space left on device (os error 28)"): each becomes an OSError naming the path, which cli_main prints as one line."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    except Exception as e:
        text = str(e)
        code = re.search(r"\(os error (\d+)\)", text)
        if code:
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e
        if not any(failure in text for failure in TORCH_WRITE_FAILURES):
            raise
        free = free_bytes(path)
        full = free is not None and free < 1 << 20
        detail = "write failed" + (f": {os.strerror(errno.ENOSPC)}" if full else "") + \
            (f" ({free} bytes free on its device)" if free is not None else "")
        raise OSError(errno.ENOSPC if full else errno.EIO, detail, str(path)) from e


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and `kill` send; torchrun passes it on to every process it launched), raised in the
    main thread where SIGINT raises KeyboardInterrupt: the same unwinding, so the same state is kept."""


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the shutdown itself
    raise Terminated()


def cli_main(fn):
    """Decorate a script's main(): a SapoError, or an environment OSError (full disk, read-only or unwritable path,
    a file where a directory should be), becomes one line on stderr and exit code 2. SIGINT and SIGTERM both end
    it with one line saying how to resume (exit 130 and 143, as a shell reports them)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return fn(*args, **kwargs)
        except SapoError as e:
            print(f"error: {e}", file=sys.stderr)
            end_process(2)
        except OSError as e:
            if e.errno not in ENVIRONMENT_ERRNOS:
                raise
            where = "" if e.filename is not None or not _output_places else f"{_output_places[-1]}: "
            print(f"error: {where}{describe_os_error(e)}", file=sys.stderr)
            end_process(2)
        except KeyboardInterrupt as e:
            print("interrupted: rerun the same command to resume", file=sys.stderr)
            end_process(143 if isinstance(e, Terminated) else 130)
        finally:
            release_main_resources()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def end_process(code: int):
    """sys.exit(code); launched on several processes, without the interpreter's finalization (see exit_after_main:
    an error exit there ended in SIGABRT instead of its code, seen on a refused 2-process CPU launch)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        release_main_resources()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def exit_after_main():
    """End a script's process after main() returned. Launched on several processes, skip the interpreter's
    finalization: torch.distributed's gloo threads can abort it there (SIGABRT, "terminate called without an active
    exception"; seen in about 1 of 15 two-process CPU runs under load) after every result is written. Output is
    flushed first; main() has already synchronized the processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
