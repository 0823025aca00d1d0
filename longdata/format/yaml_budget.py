"""The size budget for YAML settings files (recipes and training configs).

YAML aliases let a few hundred bytes stand for billions of values (an alias bomb), so a file's
byte size says nothing about what ``yaml.safe_load`` hands back. Both the builder and the trainer
walk the loaded value with this budget before using it; it lives in the build contract because
the trainer may import nothing else from the builder.
"""

from __future__ import annotations

from typing import Any

MAX_YAML_NODES = 100_000  # scalars, lists and mappings after expanding YAML aliases


def exceeds_node_budget(data: Any) -> bool:
    """Whether ``data`` holds more than MAX_YAML_NODES values; stops counting at the budget, so
    refusing a bomb is fast."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            return True
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return False
