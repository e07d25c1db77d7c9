"""Filesystem facts rayq's writers share: the umask, fsync of a directory, and one-line
messages for the OSErrors a user can fix (a full disk, a read-only filesystem, a file in the way).

Files and directories rayq creates get the permissions the user's umask gives, like any other
tool's: `tempfile.mkstemp`/`mkdtemp` (used for atomic writes) create them private (0600/0700),
so writers chmod them to `0o666 & ~umask` / `0o777 & ~umask` before publishing them.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

__all__ = ["current_umask", "file_mode", "dir_mode", "fsync_dir", "mount_point", "os_error_message"]

_UMASK_LINE = re.compile(r"^Umask:\s*([0-7]+)$", re.MULTILINE)


def current_umask() -> int:
    """The process umask (kernels/files.py reads it the same way: importing rayq.kernels would
    import torch, which `rayq --help` and `rayq validate` must not). Read from /proc where it exists: setting it to read it back (the only
    portable way) would briefly change it for every other thread of the process."""
    try:
        found = _UMASK_LINE.search(Path("/proc/self/status").read_text())
    except OSError:
        found = None
    if found:
        return int(found.group(1), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode a plain `os.mkdir` would give a new directory."""
    return 0o777 & ~current_umask()


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory's entries (new files, a rename) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mount_point(path: str | os.PathLike) -> str:
    """The mount point holding `path` (what `df` names), for a "no space left" message."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


def os_error_message(exc: OSError, path: str | os.PathLike, what: str) -> str:
    """One line for an OSError while writing `what` at `path`, naming the cause a user can fix."""
    p = Path(path)
    if exc.errno == errno.ENOSPC:
        return f"no space left on device {mount_point(p)} while writing {what} ({p})"
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded on {mount_point(p)} while writing {what} ({p})"
    if exc.errno == errno.EROFS:
        return f"{p}: read-only filesystem; cannot write {what}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{p}: permission denied; cannot write {what}"
    if exc.errno == errno.ENOTDIR:
        return f"{p}: a parent of this path is a file, not a directory; cannot write {what}"
    if exc.errno == errno.EEXIST:
        return f"{p}: is a file, not a directory; cannot write {what}"
    return f"{p}: cannot write {what} ({exc.strerror or type(exc).__name__})"
