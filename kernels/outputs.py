"""Writing outputs safely: checked before any work, complete or absent, never through a planted link.

    with output_file("model.gguf", "--gguf") as tmp:    # checks the path, creates a private temp dir
        write_everything_to(tmp)                          # tmp: a path inside that directory
    # here model.gguf is complete (renamed into place); on any error or signal nothing is left

Every output is first written inside a fresh directory `.moeplan-<pid>-<random>.partial` created
next to the destination with mkdtemp (mode 0700, a new name that cannot already exist, so no
symlink planted there is followed), then renamed onto the destination, which replaces a file or a
symlink of that name without following it. The temp directory is removed on every exit Python sees
(exceptions, Ctrl-C, and SIGTERM / SIGHUP once `exit_on_signals()` is installed, as the CLI does).
A run that was killed outright (SIGKILL, power loss) leaves its directory behind: the next output
into the same directory removes those whose process is gone and says so.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

_PREFIX = ".moeplan-"
_SUFFIX = ".partial"


class OutputError(ValueError):
    """An output path that cannot be written (the message names it and says what to do)."""


def exit_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit, so that cleanup code (finally blocks, context
    managers) runs as it does for Ctrl-C."""
    def _exit(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, _exit)


def check_output(path: str | os.PathLike, flag: str, *, directory: bool = False, make_parents: bool = True) -> Path:
    """Refuse an output path that cannot work, before any work is done: a name too long for its
    file system, a parent that is not a writable directory, a directory where a file goes (and,
    for a directory output, an existing non-empty directory or a file)."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise OutputError(f"{flag} {path}: give a file name, not a directory")
    parent = path.parent
    if make_parents:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise OutputError(f"{flag} {path}: {parent} exists and is not a directory") from None
        except OSError as exc:
            raise OutputError(f"{flag} {path}: cannot create {parent} ({exc.strerror})") from None
    if not parent.is_dir():
        raise OutputError(f"{flag} {path}: the directory {parent} does not exist")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(path.name)) > name_max:
        raise OutputError(f"{flag} {path}: the name is {len(os.fsencode(path.name))} bytes, longer than the "
                          f"{name_max} its file system allows; choose a shorter name")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: the directory {parent} is not writable; choose another place")
    if directory:
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise OutputError(f"{flag} {path} exists and is not a directory; choose a new directory")
        if path.is_dir() and any(path.iterdir()):
            raise OutputError(f"{flag} {path} exists and is not empty; choose a new directory or remove it")
    elif path.is_dir() and not path.is_symlink():
        raise OutputError(f"{flag} {path} is a directory; give a file name")
    elif path.exists() and not path.is_symlink() and not path.is_file():
        raise OutputError(f"{flag} {path} exists and is not a regular file (a device, FIFO or socket); "
                          "choose another name")
    return path


def remove_stale(parent: Path) -> list[Path]:
    """Remove the temp directories of moeplan runs in `parent` whose process no longer exists."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for e in entries:
        if not (e.name.startswith(_PREFIX) and e.name.endswith(_SUFFIX)):
            continue
        try:
            pid = int(e.name[len(_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if _alive(pid):
            continue
        p = Path(e.path)
        if e.is_symlink() or not e.is_dir(follow_symlinks=False):
            p.unlink(missing_ok=True)  # the link itself, never its target
        else:
            shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _private_dir(path: Path, flag: str) -> Iterator[Path]:
    for p in remove_stale(path.parent):
        print(f"moeplan: removed {p}, left by an interrupted run", file=sys.stderr)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", suffix=_SUFFIX, dir=path.parent))
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot write in {path.parent} ({exc.strerror})") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def output_file(path: str | os.PathLike, flag: str = "output") -> Iterator[Path]:
    """Check `path`, yield a temp path to write the whole file to, then rename it into place."""
    path = check_output(path, flag)
    with _private_dir(path, flag) as tmp:
        out = tmp / path.name
        yield out
        if not out.is_file() or out.is_symlink():
            raise AssertionError(f"{out} was not written")
        os.replace(out, path)


def fsync(path: str | os.PathLike) -> None:
    """Flush a closed file's bytes to the disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, flag: str = "output") -> Iterator[Path]:
    """Check `path` (a new or empty directory), yield a temp directory to fill, then rename it into place."""
    path = check_output(path, flag, directory=True)
    with _private_dir(path, flag) as tmp:
        out = tmp / path.name
        out.mkdir()
        yield out
        check_output(path, flag, directory=True)  # nobody made it meanwhile
        if path.is_dir():
            path.rmdir()
        os.replace(out, path)


def write_text(path: str | os.PathLike, text: str, flag: str = "output") -> Path:
    with output_file(path, flag) as tmp:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
    return Path(path)


def json_text(obj: Any, **kwargs) -> str:
    """Strict JSON (NaN and infinities are refused, not written as the invalid `NaN`)."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        bad = _first_nonfinite(obj)
        raise ValueError(f"refusing to write a non-finite number{f' at {bad}' if bad else ''} as JSON") from None


def _first_nonfinite(obj, where: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "(top level)"
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        r = _first_nonfinite(v, f"{where}.{k}" if where else str(k))
        if r:
            return r
    return None
