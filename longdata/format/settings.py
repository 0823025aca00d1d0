"""One grammar for settings: `longdata build --set` and `longdata train --set` parse, type and
report with it, and so do recipe files, training config files and the train options.

- An assignment is `key=value`. A key is a dotted path: `packing.max_seq_len`, list items as
  `sources[1].weight` or `sources.1.weight` (a training setting's key is one field name).
- A settings file (a recipe, a training config) is a YAML mapping read by `read_settings_file`
  within a byte and a node budget, with the same one-line errors for both.
- A value is read as YAML: `5` is an int, `0.5` a float, `true` a bool, `null` (or nothing) None,
  `[4096, 8192]` a list. Text that is not valid YAML (`@run`) stays the text it is, and a value
  that expands past the YAML node budget (aliases) is refused.
- `coerce` turns a value into a declared type (bool, int, float, str, a list of one of them,
  None where allowed) whether it came from `--set`, a YAML file or an option (a training
  setting's; a recipe's value is checked by its pydantic model).
- A key that names no setting is one line: `<key>: unknown key (<where>); did you mean
  <closest>? allowed keys: ...`.

It lives in the build contract because the trainer may import nothing else from the builder.
PyYAML (a dependency of both) is imported where a value or file is parsed, so importing the
contract stays light.
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longdata.format.yaml_budget import MAX_YAML_NODES, exceeds_node_budget

# A recipe or training config is a few hundred bytes; refuse anything huge before parsing it.
MAX_SETTINGS_BYTES = 1 << 20
# `sources[1].weight` and `sources.1.weight` both name item 1 of `sources`.
_PATH_PART = re.compile(r"\.|\[(\d+)\]")


class SettingError(ValueError):
    """A setting that cannot be used; the message is one line naming the key or the file."""


@dataclass(frozen=True)
class Assignment:
    key: str  # as the user wrote it, e.g. sources[1].weight
    path: tuple[str, ...]  # its parts, e.g. ("sources", "1", "weight")
    value: Any  # the value read as YAML


def parse_assignment(text: str) -> Assignment:
    """`key=value` with the value read as YAML (see the module docstring)."""
    import yaml

    key, equals, value_text = text.partition("=")
    key = key.strip()
    if not equals or not key:
        raise SettingError(f"--set {text!r}: expected key=value")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        value = value_text
    if exceeds_node_budget(value):
        raise SettingError(
            f"--set {key}: the value expands to more than {MAX_YAML_NODES:,} values (YAML aliases?)"
        )
    return Assignment(key, tuple(part for part in _PATH_PART.split(key) if part), value)


def assign(data: dict[str, Any], assignment: Assignment) -> None:
    """Set `assignment.path` in nested mappings and lists, in place; a missing mapping along
    the way is created, a list item must exist."""
    node: Any = data
    key, path = assignment.key, assignment.path
    for depth, part in enumerate(path):
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SettingError(
                    f"--set {key}: {where} is not an index of a {len(node)}-item list"
                )
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
        else:
            raise SettingError(f"--set {key}: {'.'.join(path[:depth])} is not a mapping or list")
        if depth == len(path) - 1:
            node[index] = assignment.value
        else:
            if isinstance(node, dict) and index not in node:
                node[index] = {}
            node = node[index]


def unknown_key(key: str, allowed: Iterable[str], where: str | None = None) -> str:
    """The one line for a key that names no setting: the closest keys, then every allowed one."""
    allowed = list(allowed)
    line = f"{key}: unknown key" + (f" ({where})" if where else "")
    # A dotted key is compared by its last part: `packing.max_len` is close to `max_seq_len`.
    # The guess comes before the list, which may be long enough to be cut short.
    close = difflib.get_close_matches(key.rpartition(".")[2], allowed, n=3)
    if close:
        line += f"; did you mean {' or '.join(close)}?"
    if allowed:
        line += (" " if close else "; ") + f"allowed keys: {', '.join(allowed)}"
    return line


def check_key(key: str, allowed: typing.Collection[str], where: str | None = None) -> None:
    if key not in allowed:
        raise SettingError(unknown_key(key, allowed, where))


def read_settings_file(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML (or JSON) mapping read safely (`yaml.safe_load`: no Python objects), within the
    byte and node budgets; an empty file is an empty mapping. `what` names the file in errors
    (`recipe`, `training config`); keys are the caller's to check."""
    import yaml

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SETTINGS_BYTES:
            raise SettingError(
                f"{path}: {size:,} bytes; a {what} is at most {MAX_SETTINGS_BYTES:,}"
            )
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingError(f"{path}: no such {what} file") from None
    except OSError as error:
        raise SettingError(f"{path}: cannot be read ({error.strerror or error})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or getattr(error, "reason", None)
        raise SettingError(
            f"{path}{line}: not valid YAML" + (f" ({problem})" if problem else "")
        ) from None
    except RecursionError:
        raise SettingError(f"{path}: nested too deeply to be a {what}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingError(
            f"{path}: a {what} is a mapping of settings, not a {type(data).__name__}"
        )
    if exceeds_node_budget(data):
        raise SettingError(
            f"{path}: expands to more than {MAX_YAML_NODES:,} values (YAML aliases?); "
            f"a {what} is a short list of settings"
        )
    return data


# ---------------------------------------------------------------------------------------------
# Values as declared types


def value_type(annotation: Any) -> tuple[Any, bool]:
    """(the type without `| None`, whether None is allowed)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return members[0], True
    return annotation, False


def coerce(name: str, annotation: Any, value: Any) -> Any:
    """`value` as setting `name`'s declared type, or `SettingError`.

    A list setting also takes a comma-separated string, so `--set lora_targets=q_proj,v_proj`
    and `--lora-targets q_proj,v_proj` mean the same.
    """
    kind, optional = value_type(annotation)
    if value is None:
        if optional:
            return None
        raise SettingError(f"{name} cannot be null")
    wrong = SettingError(f"{name} must be {_type_name(kind)}, not {_short(value)}")
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise wrong
        try:
            return [_scalar(item, part) for part in value]
        except ValueError:
            raise wrong from None
    try:
        return _scalar(kind, value)
    except ValueError:
        raise wrong from None


def _scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if kind is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value)
        raise ValueError
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        return number
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. `--set split=2` or a numeric run name
        raise ValueError
    raise TypeError(f"no coercion for {kind}")


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return f"a list of {_type_name(typing.get_args(kind)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 60
_SHORT_REPR.maxlevel = 3


def _short(value: Any) -> str:
    """A bounded repr: the value may be huge or deeply nested."""
    return _SHORT_REPR.repr(value)
