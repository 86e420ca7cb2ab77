"""The user's files: read without hanging, written without damaging what stands there.

Reading (inputs, labels, models, engine cache entries): a path must name a regular file.
It is opened with ``O_NONBLOCK`` (a FIFO would otherwise block the open forever) and
checked with ``fstat`` on the open descriptor, so a FIFO, a device such as ``/dev/zero``
(an endless read) or a folder is refused, as is a file larger than the caller's limit.

Every file hybrid_infer writes for the user (``-o``, ``--json``, ``--plot``, ``export``'s
folder) and every engine cache entry goes through here:

- Only regular files are written. A path naming a device, FIFO, socket or folder is
  refused before anything is written (replacing ``/dev/full`` with a regular file, or
  blocking forever on a FIFO, is never what the user meant).
- A symbolic link is written *through*: its final target is replaced and the link stays a
  link, as ``cp`` and shell redirection do. The same rules then apply to the target.
- Data goes to a temporary file in the destination folder, which is then renamed over the
  destination (``os.replace``), so readers see the old file or the whole new one. A
  replaced file keeps its permission bits, and its owner and group where the process may
  set them (as root, say); a new one gets ``0o666`` less the umask, like any file the
  user's shell would create (``mkstemp`` alone would make it ``0o600``). A replaced file
  with other hard links is a new file under this name afterwards (the other names keep
  the old contents, as after ``sed -i`` or an editor's save); a warning says so.
- A path the command also reads (the prototxt, the weights, an input) is refused
  (``check_not_read``): nothing is written over the command's own input.
- Folders are not created (a typo in a folder name is reported, not made real), except
  the one folder ``export`` is asked to fill.
- Any ``OSError`` (a read-only or missing folder, a file where a folder should be,
  ``/proc``, a full disk, a name too long) becomes an ``OptionError`` naming the option
  and the path; the temporary file is removed.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Mapping, Optional, Type, Union

from .errors import HybridInferError, OptionError

log = logging.getLogger("hybrid_infer")

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def kind_of(mode: int) -> str:
    """'a folder', 'a FIFO (named pipe)', ... for a non-regular ``st_mode``; 'a regular file' otherwise."""
    return next((name for test, name in _KINDS if test(mode)), "a regular file")


def open_regular_file(path: Path, what: str, error: Type[HybridInferError], *,
                      max_bytes: Optional[int] = None, follow_symlinks: bool = True) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file of at most ``max_bytes``.

    ``what`` names it in messages ("input file", "--labels"); failures raise ``error``.
    ``follow_symlinks=False`` refuses links too (the engine cache trusts nothing it finds).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise error(f"{what} '{path}' is a symbolic link, which is not followed here") from None
        try:  # a socket cannot even be opened (ENXIO): say what it is
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise error(f"{what} '{path}' is {kind_of(mode)}, not a regular file") from None
        raise error(f"{what} '{path}': cannot read it ({_reason(exc)})") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = f"is {kind_of(st.st_mode)}, not a regular file"
    elif max_bytes is not None and st.st_size > max_bytes:
        problem = f"is {st.st_size} bytes, more than the {max_bytes} this can be"
    if problem:
        os.close(fd)
        raise error(f"{what} '{path}' {problem}")
    return os.fdopen(fd, "rb")


def read_regular_file(path: Path, what: str, error: Type[HybridInferError], *,
                      max_bytes: Optional[int] = None, follow_symlinks: bool = True) -> bytes:
    """The bytes of ``path`` (see ``open_regular_file``)."""
    with open_regular_file(path, what, error, max_bytes=max_bytes, follow_symlinks=follow_symlinks) as f:
        try:
            return f.read()
        except OSError as exc:
            raise error(f"{what} '{path}': cannot read it ({_reason(exc)})") from None


def expand_folder(value: Union[str, "os.PathLike[str]"], name: str) -> Path:
    """``value`` with a leading ``~`` or ``~user`` expanded; ``OptionError`` naming ``name``
    (the option or variable it came from) when it cannot be (no such user, no home)."""
    text = os.fspath(value)
    try:
        return Path(text).expanduser()
    except RuntimeError:
        user = text[1:].split(os.sep, 1)[0]
        raise OptionError(f"{name + ' ' if name else ''}{text}: '~{user}' cannot be expanded (no such user, or no "
                          "home folder); give the folder's full path") from None


def output_target(path: Path, option: str) -> Path:
    """The file that writing to ``path`` replaces: ``path`` itself, or a symlink's final target.

    Raises ``OptionError`` (naming ``option``) when that is not a regular file or cannot be
    examined; a path that does not exist yet is fine.
    """
    try:
        target = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
        st = os.stat(target)
    except FileNotFoundError:
        return target
    except OSError as exc:
        raise OptionError(f"{option} {path}: cannot write there ({_reason(exc)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise OptionError(f"{option} {path}: is {kind_of(st.st_mode)}, not a regular file; "
                          "hybrid-infer writes only regular files: give a file path")
    return target


def check_output_folder(folder: Path, option: str, given: Path | None = None, *, may_create: bool = False) -> None:
    """Fail early unless ``folder`` is a writable folder (or, if ``may_create``, missing);
    messages name ``given`` (the path the user gave) when the folder is only its parent."""
    shown = given if given is not None else folder
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        if may_create:
            return
        raise OptionError(f"{option} {shown}: folder {folder} does not exist") from None
    except OSError as exc:
        raise OptionError(f"{option} {shown}: cannot write there ({_reason(exc)})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OptionError(f"{option} {shown}: {folder} is {kind_of(st.st_mode)}, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {shown}: cannot write in {folder} (permission denied)")


def check_output_path(path: Path, option: str) -> None:
    """Fail before any long work if ``path`` could not be written (see ``output_target``)."""
    target = output_target(path, option)
    check_output_folder(target.parent, option, path)
    if target.exists() and not os.access(target, os.W_OK):
        raise OptionError(f"{option} {path}: cannot write there (permission denied)")


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _keep_owner(fd: int, old: os.stat_result) -> None:
    """Give the staged file the owner and group of the file it replaces, where this process
    may (root may; others may keep the group if they belong to it). Otherwise it stays the
    writer's, as with any editor that saves by renaming."""
    for uid, gid in ((old.st_uid, old.st_gid), (-1, old.st_gid)):
        try:
            os.fchown(fd, uid, gid)
            return
        except OSError:
            continue


def _stage(target: Path, data: bytes, fsync: bool) -> Path:
    """Write ``data`` to a new temporary file next to ``target``, with the permission bits,
    owner and group of the file it will replace; return its path. The name carries this
    process's id, so that ``sweep_stale_temporaries`` can tell a live writer's from junk."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp")
    try:
        try:
            st: Optional[os.stat_result] = os.lstat(target)
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode):
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            _keep_owner(fd, st)
            if st.st_nlink > 1:
                log.warning("%s has %d hard links; it is replaced by a new file, and its other names keep "
                            "the old contents", target, st.st_nlink)
        else:
            os.fchmod(fd, _new_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


#: A temporary file of ``_stage``: ``.NAME.PID.XXXXXXXX.tmp``.
_STAGED = re.compile(r"^\..+\.(\d+)\.[^.]{8}\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def sweep_stale_temporaries(folder: Path, max_age_s: float) -> None:
    """Remove what writers killed mid-write (SIGKILL, a power cut) left in ``folder``, a
    folder hybrid_infer owns (the engine cache): staged files whose process is gone, or
    older than ``max_age_s`` seconds (a process id may be reused, or belong to another
    machine sharing the folder). Failures are ignored: this is tidying, not a promise."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    now = time.time()
    for name in names:
        found = _STAGED.match(name)
        if not found:
            continue
        path = folder / name
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and (not _alive(int(found.group(1))) or now - st.st_mtime > max_age_s):
                path.unlink()
        except OSError:
            continue


def check_not_read(path: Path, option: str, read: Mapping[Path, str]) -> None:
    """Refuse to write ``path`` (given as ``option``) over a file the command reads
    (``read``: path -> what it is, e.g. "the prototxt"): the command would destroy its own
    input, and only after reading it. Links to the same file count as the same file."""
    target = output_target(path, option)
    for source, what in read.items():
        try:
            same = os.path.samefile(target, source)
        except (OSError, ValueError):  # one of them does not exist (yet), or a NUL in a name
            same = False
        if same:
            raise OptionError(f"{option} {path}: is {what} this command reads ({source}); writing there would "
                              "destroy it: give another path")


def write_atomically(path: Path, data: bytes, *, option: str = "output") -> None:
    """Replace the regular file at ``path`` (or a symlink's target) with ``data``, atomically.

    ``option`` names where the path came from (``-o``, ``--json``) in error messages.
    Raises ``OptionError`` for special files and for any ``OSError`` while writing.
    """
    write_files_atomically({Path(path): data}, option=option)


def write_files_atomically(files: Mapping[Path, bytes], *, option: str = "output",
                           error: Type[HybridInferError] = OptionError, owned_folder: bool = False) -> None:
    """Write several files as one step, in the order given: every file is staged first,
    and only when all are staged are they renamed into place. A failure leaves none of
    the new files behind (``export`` never leaves ONNX files without their manifest).

    ``owned_folder``: the paths lie in a folder hybrid_infer owns (the engine cache), where
    whatever stands at an entry's name, a link or a FIFO included, is junk to be replaced
    (the rename replaces the directory entry, never writes through it), and the data is
    made durable (``fsync``) before the rename, since other processes read the entries.
    Failures raise ``error``.
    """
    targets = {path: Path(path) if owned_folder else output_target(Path(path), option) for path in files}
    staged: dict[Path, Path] = {}
    placed: list[Path] = []
    current = next(iter(files), Path("."))
    try:
        for path, data in files.items():
            current = path
            staged[targets[path]] = _stage(targets[path], data, fsync=owned_folder)
        for target, tmp in staged.items():
            current = target
            os.replace(tmp, target)
            placed.append(target)
    except OSError as exc:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        for target in placed:  # its old content is gone already; half a set is worse than none
            target.unlink(missing_ok=True)
        raise error(f"{option} {current}: cannot write there ({_reason(exc)})") from None
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
