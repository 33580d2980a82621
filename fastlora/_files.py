"""Files that are never left half-written, and never read from the wrong kind of file.

* :func:`write_files_atomically` replaces a set of files in one folder so that,
  when it returns, all of them hold the new bytes and, when it raises, all of
  them hold exactly their previous bytes (or are absent if they were).
* :func:`read_regular_file` reads a file only if it is a regular file of at
  most ``max_bytes`` bytes, without ever blocking on a FIFO or reading a device.
* :func:`check_regular_file` makes the same checks for a file that a library
  opens itself (safetensors maps its file into memory).

All three take plain bytes: serializing (JSON, safetensors) is the caller's job.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import sys
import warnings
from collections.abc import Mapping

# NOTE: every system call here goes through ``os.<name>`` (never ``from os import
# ...``): the tests swap this module's ``os`` to make each call fail in turn.
_TEMP_SUFFIX = ".tmp"
_BACKUP_SUFFIX = ".bak"
_NAME_ATTEMPTS = 16  # fresh random names to try before giving up (a clash is ~2^-64 each)


class UnsafeFileError(ValueError):
    """A path that was refused: not a regular file (a FIFO, a device, a directory,
    a symbolic link to one of those), or a file larger than the caller allows."""


# --------------------------------------------------------------------------- writing


def write_files_atomically(folder: str | os.PathLike, files: Mapping[str, bytes]) -> None:
    """Write ``files`` (file name -> bytes) into ``folder``, all or nothing.

    Steps: create ``folder`` (and missing parents) if needed; write each file
    to a new temporary file in ``folder``, then flush and fsync it; keep a
    backup of each file being replaced (a hard link, or a copy where the file
    system has none); ``os.replace`` the targets in the order given; fsync the
    folder; only then drop the backups.

    Guarantees:

    * On return, every name in ``files`` holds its new bytes, durably (file
      and folder fsynced). A file replacing an existing regular file keeps that
      file's permission bits; a new file gets ``0o666`` minus the umask.
    * If any step raises (an OSError, a full disk, KeyboardInterrupt, a
      failing ``os.replace`` after other targets were already replaced), every
      target is restored to its previous bytes (byte-identical: the backup is
      the previous file itself) or removed if it did not exist, temporaries
      and backups are removed, folders this call created are removed again,
      and the exception is re-raised. If a restore itself fails, that file's
      backup is kept and its path is added to the exception's notes.
    * A target that is a symbolic link is replaced by a regular file (the link
      target is not written through); a target that is a directory is refused
      before anything is written.

    Not guaranteed: a crash of the process or machine in the middle of the
    replacements (nothing runs to roll back) can leave some files new and some
    old, plus hidden ``.<name>.<random>.tmp`` / ``.bak`` files. Replace the file
    that marks a set as complete (e.g. a config) last, by putting it last in
    ``files``. Concurrent writers to the same folder are not serialized.

    Args:
      folder: the folder to write into.
      files: file name (a plain name: no path separator, not ``.`` or ``..``)
        -> the complete new contents (bytes, bytearray or memoryview).
    Raises:
      TypeError / ValueError for a bad argument (nothing is written);
      IsADirectoryError if a target is a directory; whatever a step raised.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"write_files_atomically: folder must be a str or os.PathLike, got {type(folder).__name__}")
    folder = os.fspath(folder)
    if not isinstance(folder, str):
        raise TypeError(f"write_files_atomically: folder must be a text path, got {folder!r}")
    if not isinstance(files, Mapping):
        raise TypeError(
            f"write_files_atomically: files must be a mapping of file name -> bytes, got {type(files).__name__}"
        )
    items = [(_check_file_name(name), _check_contents(name, data)) for name, data in files.items()]
    created = _missing_folders(folder)
    temps: dict[str, str] = {}  # name -> temporary path, until it is renamed onto the target
    backups: dict[str, str | None] = {}  # name -> backup path; None: the target did not exist
    attempted: list[str] = []  # names whose os.replace was started (it may or may not have happened)
    try:
        os.makedirs(folder, exist_ok=True)  # NOTE: raises FileExistsError when folder is a file
        for parent in created:
            _fsync_folder(os.path.dirname(parent) or os.curdir)
        modes = {name: _existing_mode(os.path.join(folder, name)) for name, _ in items}
        for name, data in items:
            _write_temporary(folder, name, data, modes[name], temps)
        for name, _ in items:
            _make_backup(folder, name, backups)
        for name, _ in items:
            attempted.append(name)  # NOTE: before the call, so an interrupt right after it is rolled back too
            os.replace(temps[name], os.path.join(folder, name))
            del temps[name]
        _fsync_folder(folder)
    except BaseException as exc:
        for problem in _roll_back(folder, attempted, temps, backups, created):
            _add_note(exc, problem)
        raise
    leftovers = []
    for backup in backups.values():
        if backup is not None:
            try:
                os.unlink(backup)
            except OSError as exc:
                leftovers.append(f"{backup} ({exc})")
    if leftovers:
        warnings.warn(
            f"write_files_atomically: the new files in {folder} are complete, but old backups could not be "
            f"removed: {', '.join(leftovers)}",
            RuntimeWarning,
            stacklevel=2,
        )


def _check_file_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"write_files_atomically: file names must be str, got {name!r}")
    separators = {os.sep, os.altsep or os.sep, "\0"}
    if not name or name in (".", "..") or any(s in name for s in separators):
        raise ValueError(
            f"write_files_atomically: file name {name!r} is not a plain file name (expected a non-empty name "
            "without path separators or NUL, not '.' or '..')"
        )
    return name


def _check_contents(name: str, data: object) -> memoryview:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"write_files_atomically: files[{name!r}] must be bytes (serialized by the caller), "
            f"got {type(data).__name__}"
        )
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError(f"write_files_atomically: files[{name!r}] is a non-contiguous memoryview")
    return view.cast("B")


def _missing_folders(folder: str) -> list[str]:
    """``folder`` and its parents that do not exist yet, outermost first."""
    missing = []
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return list(reversed(missing))


def _existing_mode(target: str) -> int | None:
    """The permission bits to give the new file: the replaced regular file's, else None."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(
            errno.EISDIR, f"write_files_atomically: {target} is a directory; expected a file or nothing", target
        )
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None


def _fresh_path(folder: str, name: str, suffix: str) -> str:
    return os.path.join(folder, f".{name}.{secrets.token_hex(8)}{suffix}")


def _write_temporary(folder: str, name: str, data: memoryview, mode: int | None, temps: dict[str, str]) -> None:
    """Write ``data`` to a new temporary file next to the target, fsynced; record it in ``temps``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(_NAME_ATTEMPTS):
        path = _fresh_path(folder, name, _TEMP_SUFFIX)
        temps[name] = path  # NOTE: recorded before it exists, so an interrupted open is cleaned up too
        try:
            fd = os.open(path, flags, 0o666)
        except FileExistsError:
            del temps[name]
            continue
        break
    else:
        raise FileExistsError(errno.EEXIST, f"write_files_atomically: no free temporary name for {name!r}", folder)
    try:
        if mode is not None:
            _set_mode(fd, path, mode)
        view = data
        while view.nbytes:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(errno.EIO, f"write_files_atomically: os.write wrote nothing to {path}")
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_mode(fd: int, path: str, mode: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:  # pragma: no cover - Windows
        os.chmod(path, mode)


def _make_backup(folder: str, name: str, backups: dict[str, str | None]) -> None:
    """Keep the current ``name`` (if any) under a hidden backup name: a hard link
    (the very same bytes), else a copy; record it in ``backups``."""
    target = os.path.join(folder, name)
    if not os.path.lexists(target):
        backups[name] = None
        return
    for _ in range(_NAME_ATTEMPTS):
        backup = _fresh_path(folder, name, _BACKUP_SUFFIX)
        backups[name] = backup
        try:
            os.link(target, backup, follow_symlinks=False)
            return
        except FileExistsError:
            continue
        except (OSError, NotImplementedError):  # no hard links here (some network / FAT file systems): copy
            if os.path.lexists(backup):  # not ours: never delete it in a roll-back
                del backups[name]
                raise
            _copy_for_backup(target, backup)
            return
    raise FileExistsError(errno.EEXIST, f"write_files_atomically: no free backup name for {name!r}", folder)


def _copy_for_backup(target: str, backup: str) -> None:
    st = os.lstat(target)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(target), backup)
        return
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    src = os.open(target, flags)
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):
            raise OSError(errno.EINVAL, f"write_files_atomically: cannot back up {target}: not a regular file")
        out_flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        dst = os.open(backup, out_flags, 0o600)
        try:
            while chunk := os.read(src, 1 << 20):
                view = memoryview(chunk)
                while view.nbytes:
                    view = view[os.write(dst, view):]
            _set_mode(dst, backup, stat.S_IMODE(st.st_mode))
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _fsync_folder(folder: str) -> None:
    """fsync a folder so the renames in it are durable (a no-op on Windows and on
    file systems that do not support fsync on folders)."""
    if os.name == "nt":  # pragma: no cover - folders cannot be opened there
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _roll_back(
    folder: str, attempted: list[str], temps: dict[str, str], backups: dict[str, str | None], created: list[str]
) -> list[str]:
    """Undo a failed write; returns what could not be undone (as notes for the exception)."""
    problems = []
    keep: set[str] = set()  # backups still needed because their restore failed
    for name in reversed(attempted):
        temp = temps.get(name)
        if temp is not None and os.path.lexists(temp):
            continue  # the replace did not happen: the target is untouched
        target, backup = os.path.join(folder, name), backups.get(name)
        try:
            if backup is None:
                os.unlink(target)  # it did not exist before
            else:
                os.replace(backup, target)
                backups[name] = None
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(
                f"write_files_atomically: could not restore {target} ({exc}); its previous contents are in {backup}"
                if backup is not None
                else f"write_files_atomically: could not remove the new {target} ({exc}); it did not exist before"
            )
            if backup is not None:
                keep.add(backup)
    leftovers = [p for p in temps.values()] + [b for b in backups.values() if b is not None and b not in keep]
    for path in leftovers:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"write_files_atomically: could not remove {path} ({exc})")
    try:
        if os.path.isdir(folder):
            _fsync_folder(folder)
    except OSError as exc:
        problems.append(f"write_files_atomically: could not fsync {folder} after rolling back ({exc})")
    for path in reversed(created):
        try:
            os.rmdir(path)
        except FileNotFoundError:
            continue  # never made: os.makedirs failed below it
        except OSError:
            break  # not empty (a kept backup, someone else's file): keep it and its parents
    return problems


def _add_note(exc: BaseException, note: str) -> None:
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    else:  # pragma: no cover - Python 3.10
        warnings.warn(note, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- reading


def read_regular_file(
    path: str | os.PathLike, *, max_bytes: int, what: str, error: type[Exception] = UnsafeFileError
) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes`` bytes.

    Never blocks and never reads a special file: ``path`` is stat'ed first
    (following symbolic links) and refused unless it is a regular file; it is
    then opened with ``O_NONBLOCK`` (so a FIFO swapped in meanwhile cannot block
    the open) and fstat'ed again, which closes the race between the two; at
    most ``max_bytes + 1`` bytes are read, so a file that grows meanwhile is
    refused too.

    Args:
      path: the file to read.
      max_bytes: the largest size accepted, in bytes (an int >= 0).
      what: what the file is, for messages (``"adapter config"``).
      error: the exception type raised for a refused path, called with one
        message; :class:`UnsafeFileError` (a ValueError) by default.
    Raises:
      ``error`` naming ``what``, the path and what was found there (a FIFO, a
      character device, a directory, a symbolic link to one, or the size);
      OSError as ``os.stat`` / ``os.open`` raise it (FileNotFoundError for a
      missing file or a dangling link, PermissionError, ...).
    """
    path, max_bytes = _check_read_args(path, max_bytes, "read_regular_file")
    _require_regular(path, os.stat(path), max_bytes, what, error)
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
        | getattr(os, "O_BINARY", 0)
    )  # fmt: skip
    fd = os.open(path, flags)
    try:
        _require_regular(path, os.fstat(fd), max_bytes, what, error)
        chunks, remaining = [], max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise error(
            f"{what} {path!r} grew past {max_bytes} bytes while being read; expected at most max_bytes={max_bytes}"
        )
    return data


def check_regular_file(
    path: str | os.PathLike, *, max_bytes: int, what: str, error: type[Exception] = UnsafeFileError
) -> os.stat_result:
    """Check, without opening it, that ``path`` is a regular file of at most
    ``max_bytes`` bytes; returns its ``os.stat`` result.

    For files that a library opens itself (safetensors maps its file into
    memory): a FIFO, a device or a directory is refused before the library can
    block on it or read it. Unlike :func:`read_regular_file` this cannot close
    the race with a file swapped in between the check and the library's open;
    where the file is small enough to hold in memory, reading it with
    :func:`read_regular_file` and parsing the bytes is the race-free choice.

    Arguments, errors: as :func:`read_regular_file`.
    """
    path, max_bytes = _check_read_args(path, max_bytes, "check_regular_file")
    st = os.stat(path)
    _require_regular(path, st, max_bytes, what, error)
    return st


def _check_read_args(path: object, max_bytes: object, caller: str) -> tuple[str, int]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{caller}: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"{caller}: path must be a text path, got {path!r}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"{caller}: max_bytes must be an int >= 0, got {max_bytes!r}")
    return path, max_bytes


def _require_regular(path: str, st: os.stat_result, max_bytes: int, what: str, error: type[Exception]) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path!r} is {_describe(path, st)}; expected a regular file")
    if st.st_size > max_bytes:
        raise error(f"{what} {path!r} is {st.st_size} bytes; expected at most max_bytes={max_bytes}")


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a regular file"),
    )
    return next((name for test, name in kinds if test(mode)), f"a special file (mode {oct(mode)})")


def _describe(path: str, st: os.stat_result) -> str:
    """What ``path`` is, as found by ``st`` (its stat, links followed), saying so when it is a link."""
    kind = _kind(st.st_mode)
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return f"a symbolic link to {os.path.realpath(path)!r}, {kind}"
    except OSError:
        pass
    return kind
