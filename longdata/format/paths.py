"""Names that become path parts, paths read from a build, and "did longdata write this?".

Three rules keep longdata from touching what it does not own:

- a name that becomes one path part (recipe, stage, source, bucket) is a *slug*: letters,
  digits, ``_ . -``, not ``.`` or ``..``, no leading dot, at most 100 characters (``check_slug``);
- a relative path read from a manifest or an index is joined to its base only through
  ``inside``, which resolves symlinks and refuses anything that lands outside the base;
- a directory is replaced or removed only when it carries longdata's marker file
  (``mark_ours`` / ``is_ours``). Nothing else counts: a copied ``manifest.json`` or a lone
  ``README.md`` is what a user's own directory may hold too.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path, PurePosixPath

MARKER_FILE = ".longdata"
SLUG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
# What a marker says the directory is; `is_ours(path, kind)` checks it.
KINDS = ("build", "partial", "card", "export", "run", "eval")


class UnsafePathError(ValueError):
    """A name or a path that would reach outside the directory it belongs to."""


def check_slug(name: str, what: str = "name") -> str:
    """``name`` unchanged if it is safe as one path part, else ValueError with one line."""
    if not isinstance(name, str) or not SLUG.match(name) or name in (".", ".."):
        raise UnsafePathError(
            f"{what} {name!r} is not a safe name: use letters, digits, '_', '.', '-' (at most 100, "
            "not starting with '.' or '-')"
        )
    return name


def inside(base: str | Path, relative: str) -> Path:
    """``base / relative``, refusing a relative part that is absolute, climbs with ``..``, or
    resolves (through symlinks) outside ``base``."""
    parts = PurePosixPath(relative).parts if isinstance(relative, str) else ()
    if (
        not relative
        or not isinstance(relative, str)
        or relative.startswith(("/", "\\"))
        or ".." in parts
        or "\\" in relative
        or re.match(r"^[A-Za-z]:", relative)
    ):
        raise UnsafePathError(
            f"path {relative!r} leads outside {base}: it must be relative, without '..'"
        )
    root = Path(base).resolve()
    joined = root.joinpath(*parts)
    resolved = joined.resolve()
    if resolved != root and root not in resolved.parents:
        raise UnsafePathError(f"path {relative!r} resolves to {resolved}, outside {root}")
    return joined


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` as ``path`` through a temporary file beside it and ``os.replace``: a symlink
    planted at ``path`` is replaced, never written through, and a reader never sees half a file."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def mark_ours(directory: Path, kind: str) -> None:
    """Record that longdata made ``directory`` (a build, a build being assembled, a card, an
    export, a training run or an eval's results)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    (directory / MARKER_FILE).write_text(
        json.dumps({"written_by": "longdata", "kind": kind}) + "\n"
    )


def marker_kind(directory: Path) -> str | None:
    """The kind recorded by ``mark_ours`` in ``directory``, or None when there is no marker."""
    marker = Path(directory) / MARKER_FILE
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "longdata":
        return None
    return data.get("kind") if data.get("kind") in KINDS else None


def is_ours(path: str | Path, *kinds: str) -> bool:
    """True when ``path`` is a real directory (not a symlink) holding longdata's marker (of one
    of ``kinds``, when given).

    Only the marker counts: a build or card written before markers existed has none, so it is
    treated as the user's, and replacing it needs ``--overwrite`` once (the build's refusal says
    so when the directory holds a manifest)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    kind = marker_kind(path)
    return kind is not None and (not kinds or kind in kinds)


class NotOursError(ValueError):
    """A directory longdata would replace or remove, but did not write."""

    exit_code = 2


def check_directory(path: str | Path, kind: str, option: str = "--out") -> Path:
    """``path`` if longdata may write a ``kind`` (a run, an eval's results) into it: it is missing
    or empty, or carries a marker of that kind; refused (NotOursError, one line) otherwise: a
    user's directory, a build or a directory inside one, a link, a file. Nothing is created."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise NotOursError(f"{option} {path} exists and is not a directory; choose another")
    for parent in path.resolve().parents:
        if marker_kind(parent) in ("build", "partial"):
            raise NotOursError(
                f"{option} {path} is inside the longdata build {parent}, which a rebuild "
                f"replaces whole; choose a {option} outside it"
            )
    if path.is_dir() and any(path.iterdir()):
        found = marker_kind(path)
        if found == kind:
            return path
        what = f"a longdata {found} directory" if found else "not written by longdata"
        raise NotOursError(
            f"{option} {path} is {what}, not a {kind} directory; refusing to write into it "
            f"(choose a new {option})"
        )
    return path


def claim_directory(path: str | Path, kind: str, option: str = "--out") -> Path:
    """``check_directory``, then ``path`` created and marked as a ``kind`` directory."""
    path = check_directory(path, kind, option)
    path.mkdir(parents=True, exist_ok=True)
    if marker_kind(path) != kind:
        mark_ours(path, kind)
    return path
