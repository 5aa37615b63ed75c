"""
Files written so that a crash never leaves half of one: atomic_write (a temporary file, flushed,
renamed over the target), and an OSError as one line naming the file and what to do. Checkpoints,
log.jsonl, config.json (lib/runs.py), pictures (lib/plotting.py) and exports use it.
"""

import errno
import os
import tempfile
from pathlib import Path

from lib.cli import ConfigError


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
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it normal permissions
        with os.fdopen(fd, 'wb') as f:
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


def os_error_message(error, path=None):
    """One line for an OSError: the path and the reason, e.g. 'cannot write out/ckpt.pt: No space left on device'."""
    path = path or error.filename
    reason = error.strerror or str(error)
    hint = {errno.ENOSPC: "; free some space or use another --out_dir",
            errno.EACCES: "; check the folder's permissions",
            errno.EROFS: "; the filesystem is read-only, choose a writable folder",
            errno.EDQUOT: "; free some space"}.get(error.errno, '')
    return f"cannot write {path}: {reason}{hint}"
