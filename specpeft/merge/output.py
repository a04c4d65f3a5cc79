"""Output that is never half written: a staged directory or file, renamed into place on success and removed on
failure (an exception, Ctrl-C, or SIGTERM from `kill` or a scheduler's time limit), never inside an input."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from typing import Iterator, Optional, Sequence

__all__ = ["check_file_output", "check_output", "staged_file", "staged_output"]


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) while output is staged, so the cleanup runs as for Ctrl-C (its default action
    ends the process on the spot). A handler the program installed itself is left alone, and only the main thread
    can install one."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def unwind(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _outside_inputs(out: str, inputs: Sequence[Optional[str]], what: str) -> None:
    """Refuse an output that is, holds or sits inside an input."""
    target = os.path.realpath(out)
    for given in inputs:
        if given is None:
            continue
        source = os.path.realpath(given)
        if target == source or target.startswith(source + os.sep):
            raise ValueError(f"{what} '{out}' is inside the input '{given}'; specpeft never writes into its inputs. "
                             "Choose another path.")
        if source.startswith(target + os.sep):
            raise ValueError(f"{what} '{out}' contains the input '{given}'; replacing it would delete that input. "
                             "Choose another path.")


def check_output(out: str, overwrite: bool, inputs: Sequence[Optional[str]]) -> None:
    """Refuse an output directory that is, holds or sits inside an input, or a non-empty one without `overwrite`."""
    _outside_inputs(out, inputs, "--out")
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise FileExistsError(f"--out '{out}' exists and is not a directory; remove it or choose another path.")
        if os.listdir(out) and not overwrite:
            raise FileExistsError(f"--out '{out}' is not empty; pass --overwrite to replace it.")


def check_file_output(path: str, overwrite: bool, inputs: Sequence[Optional[str]], what: str) -> None:
    """Refuse an output file inside an input, a directory, or an existing file without `overwrite`."""
    _outside_inputs(path, inputs, what)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} '{path}' is a directory; give a file name.")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{what} '{path}' exists; pass --overwrite to replace it.")


@contextlib.contextmanager
def _new_parents(parent: str) -> Iterator[None]:
    """Create `parent` and its missing ancestors; remove those again if the block fails, so a failure leaves no
    trace."""
    created = []
    probe = parent
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(parent, exist_ok=True)
    try:
        yield
    except BaseException:
        for directory in created:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise


@contextlib.contextmanager
def staged_file(path: str, overwrite: bool, inputs: Sequence[Optional[str]], what: str) -> Iterator[str]:
    """Yield a temporary file name next to `path` (same suffix, for writers that read the format from it); on success
    it replaces `path` by rename, on failure it is removed (`check_file_output` first)."""
    path = os.path.abspath(path)
    check_file_output(path, overwrite, inputs, what)
    parent = os.path.dirname(path)
    with _sigterm_unwinds(), _new_parents(parent):
        handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-",
                                           suffix=os.path.splitext(path)[1], dir=parent)
        os.close(handle)
        try:
            yield staging
            os.replace(staging, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(staging)
            raise


@contextlib.contextmanager
def staged_output(out: str, overwrite: bool, inputs: Sequence[Optional[str]]) -> Iterator[str]:
    """Yield a temporary directory next to `out`; on success it replaces `out` by rename, on error it is removed
    (with the parent directories created for it)."""
    out = os.path.abspath(out)
    check_output(out, overwrite, inputs)
    parent = os.path.dirname(out)
    with _sigterm_unwinds(), _new_parents(parent):
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the output's permissions
        try:
            yield staging
            _commit(staging, out, parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _commit(staging: str, out: str, parent: str) -> None:
    if not os.path.lexists(out):
        os.replace(staging, out)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
    os.rmdir(old)  # a free name on the same filesystem
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old, out)  # put the previous output back
        raise
    if os.path.islink(old):  # `out` was a link: the link is replaced, the directory it named is left alone
        os.unlink(old)
    else:
        shutil.rmtree(old, ignore_errors=True)
