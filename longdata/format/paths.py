"""Safe path parts: names from a recipe that become directory or file names."""

from __future__ import annotations

import re

SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_slug(name: str, what: str = "name") -> str:
    """``name`` unchanged if it is safe as one path part, else ValueError with one line."""
    if not isinstance(name, str) or not SLUG.match(name):
        raise ValueError(f"{what} {str(name)[:120]!r} is not a safe name: use letters, digits, '_', '.', "
                         "'-' (at most 100, starting with a letter or digit)")
    return name
