"""File helpers shared by every writer and verifier: checked, atomic, signal-safe writes and SHA-256.

Every file robust-surgery writes goes through :func:`atomic_path`: the data goes to a temporary
file beside the target and is renamed onto it only when complete, so readers never see a
half-written file, an existing file is never clobbered by a failed write, a target that is not
a regular file (a folder, a device such as ``/dev/full``, a socket) is never replaced, and a
SIGTERM/SIGHUP during the write removes the temporary file before the process ends.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import socket
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from robust_surgery.errors import OutputFolderMissingError, OutputPathError

__all__ = ["atomic_path", "check_distinct_paths", "check_output_path", "file_sha256", "remove_stale_temporaries"]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_output_path(path: str | os.PathLike, *, suffix: str | None = None, make_parents: bool = False,
                      what: str = "output") -> Path:
    """Check, before any work starts, that ``path`` can be written; return it as a Path.

    Refuses (:class:`OutputPathError`, message names the fix): a ``suffix`` other than the one
    required, an existing target that is not a regular file (folder, device, socket, FIFO), a
    missing parent folder (unless ``make_parents``), a parent that is not a writable folder.
    """
    path = Path(path)
    if len(path.name.encode()) > 255 or len(os.fsencode(path)) > 4000:
        raise OutputPathError(f"the {what} name is too long for the file system ({len(path.name.encode())} bytes; "
                              "at most 255 per name): give a shorter name")
    if suffix is not None and path.suffix != suffix:
        raise OutputPathError(f"the {what} {path} must be a file ending in {suffix} (e.g. {path.stem or 'model'}{suffix})")
    if path.is_symlink() and not path.exists():
        raise OutputPathError(f"the {what} {path} is a dangling link (it points to {os.readlink(path)}, which does not "
                              "exist); it is never followed: give a plain file name")
    if path.is_symlink() or path.exists():
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = 0
        if stat.S_ISDIR(mode):
            raise OutputPathError(f"the {what} {path} is a folder; give a file name inside it (e.g. {path / ('out' + (suffix or ''))})")
        if not stat.S_ISREG(mode):
            raise OutputPathError(f"the {what} {path} exists and is not a regular file (a device, socket or pipe); "
                                  "it is never replaced: give another file name")
    parent = path.parent
    if not parent.exists():
        if make_parents:
            ancestor = next((p for p in parent.parents if p.exists()), None)
            if ancestor is not None and not ancestor.is_dir():
                raise OutputPathError(f"cannot write the {what} {path}: {ancestor} is a file, not a folder")
            return path
        raise OutputFolderMissingError(f"cannot write the {what} {path}: the folder {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise OutputPathError(f"cannot write the {what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write the {what} {path}: no permission to write in {parent}")
    return path


def _same_file_keys(path: Path) -> set:
    """Keys under which two spellings of one file compare equal: its resolved path, and its device
    and inode when it exists (so hard links, symlinks and ``./`` spellings all match)."""
    keys = {("path", os.path.realpath(path))}
    try:
        st = os.stat(path)
        keys.add(("inode", st.st_dev, st.st_ino))
    except OSError:
        pass
    return keys


def check_distinct_paths(inputs: list[tuple[str, str | os.PathLike]], outputs: list[tuple[str, str | os.PathLike]]) -> None:
    """Refuse (:class:`OutputPathError`) an output that is the same file as an input or as another output.

    ``inputs``/``outputs``: (what, path) pairs, ``what`` naming the option (``"the model (MODEL)"``,
    ``"the report (--json)"``). Inputs that are not existing files (zoo names, data set names) are
    ignored. Run before any work starts, so nothing is read half and nothing is overwritten."""
    seen: list[tuple[str, set]] = [(what, _same_file_keys(Path(p))) for what, p in inputs if Path(p).is_file()]
    for what, p in outputs:
        keys = _same_file_keys(Path(p))
        for other, other_keys in seen:
            if keys & other_keys:
                raise OutputPathError(f"{what} {p} is the same file as {other}: it would be overwritten; "
                                      "give another path")
        seen.append((what, keys))


class _Terminated(BaseException):
    """Raised inside a write when SIGTERM/SIGHUP arrives, so the temporary file is removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While the block runs (main thread only), SIGTERM and SIGHUP raise instead of killing at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        raise _Terminated(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not settable here
            pass
    # a file-size limit (ulimit -f) kills with SIGXFSZ by default; ignored, the write fails with EFBIG
    if hasattr(signal, "SIGXFSZ"):
        try:
            previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EFBIG: "the file is larger than this process may write (file size limit, ulimit -f)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, make_parents: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Readers never see a half-written file; on any failure (an exception, a full disk, a file-size
    limit, SIGTERM/SIGHUP) the temporary file is removed and ``path`` keeps what it had. Raises
    :class:`OutputPathError` for a target that is not a regular file, a missing folder (without
    ``make_parents``) and for write failures (disk full, size limit), naming the cause.
    """
    path = check_output_path(path, make_parents=make_parents)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp: Path | None = None
    try:
        with _signals_raise():
            try:
                fd, name = tempfile.mkstemp(prefix=f".{path.name}{_tmp_marker(os.getpid())}", suffix=".tmp",
                                            dir=path.parent)
                os.close(fd)
                tmp = Path(name)
                yield tmp
                # mkstemp creates the file 0600; give the result the mode a plain open() would (0666 & ~umask)
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
                check_output_path(path)  # nothing unusual appeared there meanwhile
                os.replace(tmp, path)
            finally:
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
    except _Terminated as t:
        raise SystemExit(128 + t.signum) from None
    except OutputPathError:
        raise
    except Exception as e:  # OSError from Python, RuntimeError from torch.save, SafetensorError from Rust
        cause = _write_failure(e)
        if cause is None:
            raise
        raise OutputPathError(f"could not write {path}: {cause}; nothing was written there (free space or choose "
                              "another place)") from None


def _tmp_marker(pid: int) -> str:
    """What our temporary files carry in their name: this machine and the writing process."""
    host = "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"
    return f".rs-{host}-{pid}-"


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of our writes in ``folder`` whose writing process is gone (killed
    with SIGKILL, or the machine lost power, mid-write); return them. Only files named by
    :func:`atomic_path` on this machine (``.NAME.rs-HOST-PID-XXXX.tmp``) whose PID no longer runs are
    touched: another program's files, and those of a live writer, are left alone."""
    removed = []
    mark = _tmp_marker(0)[: -len("0-")]  # ".rs-HOST-"
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(".") and name.endswith(".tmp") and mark in name):
            continue
        pid_text = name.split(mark, 1)[1].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(Path(folder) / name)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _write_failure(e: BaseException) -> str | None:
    """What made a write fail, in words, when it is the file system's doing (else None)."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRORS:
        return _WRITE_ERRORS[e.errno]
    text = str(e)
    for needle, code in (("No space left", errno.ENOSPC), ("File too large", errno.EFBIG),
                         ("Disk quota", errno.EDQUOT), ("Read-only file system", errno.EROFS)):
        if needle in text:
            return _WRITE_ERRORS[code]
    if "file write failed" in text or "failed writing file" in text or "unexpected pos" in text:
        return "the write failed (disk full or a file size limit?)"
    return None
