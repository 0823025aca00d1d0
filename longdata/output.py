"""Where a build writes, and what it may replace there.

A build writes only into its output directory ``OUT`` and two hidden siblings: ``.OUT.partial``
(the build being assembled, swapped into place when complete) and ``.OUT.lock`` (held while the
build runs, removed at the end). It replaces an existing ``OUT`` only when longdata wrote it
(its ``.longdata`` marker, ``longdata.format.is_ours``), or when it is empty; anything else, a
build from before markers included, is refused unless the user passes ``--overwrite``, and even
then never when ``OUT`` is the filesystem root, the home directory, the working directory or one
of its parents, or holds the recipe, the cache or the card directory.
A stale ``.OUT.partial`` / ``.OUT.previous`` is removed only when it carries longdata's marker.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from longdata.format import is_ours, mark_ours
from longdata.format.paths import NotOursError

# What a lock file holds: nothing yet (just created), or the holder's pid; read only this far.
LOCK_TEXT = re.compile(r"(pid \d+\n)?")
LOCK_TEXT_LIMIT = 64


class OutputBusyError(RuntimeError):
    """Another build holds the output directory's lock."""

    exit_code = 1


def partial_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def previous_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.previous"


def lock_file(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


def claim_output(out_dir: Path, *, overwrite: bool, keep: Iterable[str | Path] = ()) -> None:
    """Refuse to build into ``out_dir`` when that would replace something longdata did not write.

    ``keep`` are paths the build needs (recipe, cache, card directory): ``out_dir`` may never be
    one of them or hold one, even with ``overwrite``.
    """
    if out_dir.name in ("", ".", ".."):
        raise NotOursError(f"--out {out_dir} must name a directory of its own, not . or ..")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise NotOursError(f"--out {out_dir} exists and is not a directory; refusing to replace it")
    if not out_dir.exists() or is_ours(out_dir, "build") or not any(out_dir.iterdir()):
        return
    if not overwrite:
        unmarked = (
            " (it holds a manifest.json but no .longdata marker: a copy, or a build from before "
            "markers)"
            if (out_dir / "manifest.json").exists()
            else ""
        )
        raise NotOursError(
            f"--out {out_dir} exists and is not a longdata build{unmarked}; refusing to replace "
            "it (choose another --out, or pass --overwrite to replace it)"
        )
    target = out_dir.resolve()
    home = Path.home().resolve()
    cwd = Path.cwd().resolve()
    if target == Path(target.anchor) or target == home or target == cwd or target in cwd.parents:
        raise NotOursError(f"--out {out_dir} is {target}: not replaced even with --overwrite")
    for needed in keep:
        needed = Path(needed).resolve()
        if needed == target or target in needed.parents:
            raise NotOursError(
                f"--out {out_dir} holds {needed}, which the build needs; not replaced "
                "even with --overwrite"
            )


def start_partial(out_dir: Path) -> Path:
    """A fresh, marked ``.OUT.partial``; a stale one is removed only if longdata made it."""
    partial = partial_dir(out_dir)
    remove_ours(partial, "partial")
    partial.mkdir(parents=True)
    mark_ours(partial, "partial")
    return partial


def remove_ours(path: Path, *kinds: str) -> None:
    """Remove ``path`` if it exists and longdata wrote it; refuse (NotOursError) otherwise."""
    if not path.exists() and not path.is_symlink():
        return
    if not is_ours(path, *kinds):
        raise NotOursError(
            f"{path} exists and was not written by longdata; remove it yourself or "
            "choose another --out"
        )
    shutil.rmtree(path)


def discard_partial(out_dir: Path) -> None:
    """Remove what a failed build assembled (only if it is longdata's partial build)."""
    partial = partial_dir(out_dir)
    if is_ours(partial, "partial"):
        shutil.rmtree(partial)


def publish(partial: Path, out_dir: Path) -> None:
    """Swap the finished build into place; the old one is removed only after the swap.
    ``claim_output`` has already decided that an existing ``out_dir`` may be replaced."""
    previous = previous_dir(out_dir)
    remove_ours(previous)
    mark_ours(partial, "build")
    if out_dir.exists():
        out_dir.rename(previous)
    partial.rename(out_dir)
    if previous.exists():
        shutil.rmtree(previous)


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``.OUT.lock`` for the duration: a second build into the same output fails at once.

    The lock is an ``flock`` on the file, so a killed build leaves no stale lock behind; the file
    is removed on the way out (and a build that locked a file another one just removed retries).
    The file is never opened through a symbolic link, and one that is not a regular file, or holds
    anything but a lock's ``pid N``, is refused: it is not longdata's to overwrite or remove.
    """
    path = lock_file(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = _open_lock(path)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read(LOCK_TEXT_LIMIT).strip() or "another process"
            handle.close()
            raise OutputBusyError(
                f"another build is writing {out_dir} (lock {path} held by "
                f"{holder}); wait for it or choose another --out"
            ) from None
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # the file was removed by the build that held it: lock the new one
    if not LOCK_TEXT.fullmatch(handle.read(LOCK_TEXT_LIMIT)):
        handle.close()
        raise NotOursError(
            f"{path} exists and is not a longdata lock file; remove it yourself or choose "
            "another --out"
        )
    try:
        handle.seek(0)
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


def _open_lock(path: Path) -> TextIO:
    """``path`` opened for reading and writing, created if missing, never through a link."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags, 0o644)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise NotOursError(
            f"lock {path} is a symbolic link; refusing to write through it (remove it yourself)"
        ) from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise NotOursError(f"lock {path} is not a regular file; refusing to use it (remove it)")
    return os.fdopen(descriptor, "r+")
