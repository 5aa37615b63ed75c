"""
Files written so that a crash never leaves half of one, and an OSError as one line naming the file
and what to do. atomic_write (a temporary file, flushed, renamed over the target): checkpoints,
log.jsonl, config.json (lib/runs.py), pictures (lib/plotting.py). write_complete (a temporary file
or folder that a writer fills by path, renamed into place): exports (lib/export.py).
"""

import errno
import os
import shutil
import tempfile
from pathlib import Path

from lib.cli import ConfigError, die


def atomic_write(path, write):
    """Create path by calling write(binary file) so that path holds either the old or the new
    file, never half of one.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file is
    renamed over path (os.replace is atomic on POSIX and Windows); then the folder entry is
    flushed too, so the rename survives a power cut. Temporary files of a writer that was
    killed mid-write ('.NAME.*.tmp') are removed first (one run per folder: see RunLock).
    An OSError (disk full, read-only folder) becomes a one-line ConfigError naming path; the
    temporary file is removed and the old file is left as it was.
    """
    path = Path(path)
    try:
        _atomic_write(path, write)
    except OSError as e:  # disk full, read-only folder, no permission: one line, old file intact
        raise ConfigError(os_error_message(e, path)) from None


def _atomic_write(path, write):
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f'.{path.name}.*.tmp'):
        stale.unlink(missing_ok=True)
    tmp = temporary_beside(path)
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, 'O_DIRECTORY'):  # POSIX: make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def temporary_beside(path, folder=False):
    """A new empty temporary file (or folder) in path's folder, named '.NAME.*.tmp', with the
    permissions a new file (folder) gets there: mkstemp and mkdtemp make theirs private."""
    if folder:
        tmp = tempfile.mkdtemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
        os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, (0o777 if folder else 0o666) & ~umask)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if folder else Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def write_complete(path, write, kind):
    """Call write(temporary path) in path's folder, then rename the result to path, so that path
    never holds half an output (a rename within a folder is atomic). kind: 'file' or 'folder'.
    An existing path is replaced only after the new one is complete; OSError -> one line."""
    path = Path(path)
    tmp = None
    for folder in [path.parent, *path.parent.parents]:
        if folder.exists() and not folder.is_dir():
            die(f"cannot write {path}: {folder} is a file, not a folder; choose another --out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_beside(path, folder=kind == 'folder')
        write(tmp)
        if kind == 'folder' and path.exists():  # a rename cannot replace a folder that has files
            old = tempfile.mkdtemp(prefix=f'.{path.name}.', suffix='.old', dir=path.parent)
            os.replace(path, os.path.join(old, path.name))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise ConfigError(os_error_message(e, path)) from None
    finally:
        if tmp is not None:  # failed or interrupted: no trace of the unfinished output
            shutil.rmtree(tmp, ignore_errors=True) if kind == 'folder' else Path(tmp).unlink(missing_ok=True)


def os_error_message(error, path=None):
    """One line for an OSError: the path and the reason, e.g. 'cannot write out/ckpt.pt: No space left on device'."""
    path = path or error.filename
    reason = error.strerror or str(error)
    hint = {errno.ENOSPC: "; free some space or use another --out_dir",
            errno.EACCES: "; check the folder's permissions",
            errno.EROFS: "; the filesystem is read-only, choose a writable folder",
            errno.EDQUOT: "; free some space"}.get(error.errno, '')
    return f"cannot write {path}: {reason}{hint}"
