"""Files on disk: atomic writes, JSON results, digests, and the run folder with its lock.

Every file ssl-blood writes goes through `atomic_write`: a uniquely named temporary file in the
target's folder, flushed and fsynced, renamed over the target with `os.replace`, then the folder
fsynced, so a reader sees the old file or the new one, never half of one, and a crash or a full
disk leaves no temporary file behind. `RunDir` knows every file name of a run folder and holds
the folder's lock while a command writes into it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from ssl_blood.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK

# ----------------------------------------------------------------------------- atomic writes


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(path: Path, exc: OSError) -> UserError:
    reason = exc.strerror or type(exc).__name__
    fix = {errno.ENOSPC: "free disk space", errno.EROFS: "choose a writable folder",
           errno.EACCES: "choose a folder you may write to",
           errno.EDQUOT: "free disk space",
           errno.EFBIG: "raise the file-size limit (ulimit -f) or write to another disk",
           }.get(exc.errno, "choose another folder")
    return UserError(f"cannot write {path} ({reason}); {fix} and run the command again "
                     f"(existing files were left as they were)")


def ensure_folder(folder: str | Path) -> Path:
    """Create `folder` (and parents); a file in the way or a read-only place is a UserError."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder; give a folder path", param="out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(folder, exc) from None
    return folder


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on success it is fsynced and renamed over
    `path` (then the folder is fsynced), on failure removed. For writers that want a file name
    (faiss, numpy memmaps); `atomic_write` is the same for writers that take a file object."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file path", param="out")
    folder = ensure_folder(path.parent)
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from None
    tmp = Path(name)
    try:
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; results are ordinary files
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_folder(folder)
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through `write(binary_file)`, atomically (see the module docstring)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(value: Any, path: str | Path) -> Path:
    """`value` as indented JSON with a final newline (every ssl-blood results file), atomically."""
    return write_text(path, json.dumps(value, indent=2) + "\n")


def torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    # Serialised in memory first: torch.save's zip writer turns a failed write (disk full,
    # file-size limit) into a RuntimeError; a plain write raises the OSError we can explain.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getbuffer())


def save_figure(fig, path: str | Path, **kwargs: Any) -> Path:
    """A matplotlib figure, atomically, in the format the file name says."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", **kwargs)
    return write_bytes(path, buffer.getvalue())


def check_writable(path: str | Path, folder: bool, param: str = "out") -> Path:
    """Refuse, before any work, an output path that cannot be written: a file where a folder is
    wanted (or the reverse), or a location whose nearest existing folder is not writable.
    Nothing is created."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        wanted = "a folder" if folder else "a file name"
        raise UserError(f"`{param}` {path} is {'a folder' if path.is_dir() else 'a file'}; give "
                        f"{wanted}", param=param)
    existing = path if path.exists() else next(p for p in path.parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"`{param}` {path}: {existing} is a file, not a folder; choose another "
                        f"path", param=param)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"`{param}` {path}: {existing} is not writable; choose a folder you may "
                        f"write to", param=param)
    return path


def refuse_existing(path: str | Path, overwrite: bool, param: str = "out") -> Path:
    """Refuse to replace an existing file unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"`{param}` {path} exists; set `overwrite` to replace it, or choose "
                        f"another path", param=(param, "overwrite"))
    return path


# ----------------------------------------------------------------------------- digests


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file (cached by path, size and modification time)."""
    stat = Path(path).stat()
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, algorithm)


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


@lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int, algorithm: str) -> str:  # size/mtime key the cache
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- lock


class FolderLock:
    """An advisory lock on a folder: `flock` on FOLDER/.lock, which holds the owner's pid.

    The kernel drops a `flock` when its process dies, so the lock of a killed run is taken over
    by the next command without anyone deleting anything. A second writer is refused with the
    holder's pid.
    """

    NAME = ".lock"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self._fd: int | None = None
        self._created_folder = False

    def holder(self) -> str | None:
        """The pid holding the lock now, or None (a quick check before long preparations)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)

    def refuse_if_held(self) -> None:
        holder = self.holder()
        if holder is not None:
            raise UserError(f"{self.folder} is in use by another ssl-blood process (pid {holder}); "
                            f"wait for it to finish or choose another folder", param="out")

    def acquire(self) -> "FolderLock":
        self._created_folder = not self.folder.exists()
        ensure_folder(self.folder)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise _write_error(self.path, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"{self.folder} is in use by another ssl-blood process (pid "
                                f"{holder}); wait for it to finish or choose another folder",
                                param="out") from None
            # The previous holder may have removed the file between our open and our flock:
            # then we hold a lock on a deleted file. Start again on the current one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # still under the lock: nobody else can hold this file
        os.close(self._fd)
        self._fd = None
        if self._created_folder:  # a command that failed before writing leaves no empty folder
            with contextlib.suppress(OSError):
                self.folder.rmdir()

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
