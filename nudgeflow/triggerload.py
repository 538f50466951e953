"""Loading the marketers' trigger file: schema, CEL compilation and names, all checked up front.

A trigger that cannot work must be refused by ``nudgeflow validate`` (and by a
flow at start), with the file, the line and a caret under the CEL error, never
discovered at run time as a trigger that silently never fires.
"""

from __future__ import annotations

from pathlib import Path

from nudgeflow.events import BUILTIN_TYPES
from nudgeflow.settings import EventsConfig, EventTrigger, TriggersFile
from nudgeflow.yamlconf import ConfigError, line_of, load_yaml, validate
from operators.triggers import compile_condition

#: the names a condition may read
CONDITION_VARIABLES = frozenset({"event", "features", "user", "score"})


def load_triggers(path: str | Path, events: EventsConfig) -> TriggersFile:
    """Load and fully check a trigger file; raises :class:`ConfigError` listing every problem."""
    data, lines = load_yaml(path)
    tf = validate(TriggersFile, data, path, lines)
    known = BUILTIN_TYPES | set(events.custom_types)
    problems: list[tuple[int | None, str, str]] = []
    for i, t in enumerate(tf.triggers):
        for fld in ("on", "after", "unless"):
            for j, et in enumerate(getattr(t, fld, ()) or ()):
                if et not in known:
                    loc = ("triggers", i, fld, j)
                    problems.append((line_of(lines, loc), ".".join(map(str, loc)), f"unknown event type {et!r}"))
        if isinstance(t, EventTrigger):
            loc = ("triggers", i, "condition")
            try:
                prog = compile_condition(t.condition)
            except ValueError as e:
                problems.append((line_of(lines, loc), ".".join(map(str, loc)), _cel_message(str(e))))
                continue
            unknown = set(prog.variables()) - CONDITION_VARIABLES
            if unknown:
                problems.append(
                    (line_of(lines, loc), ".".join(map(str, loc)),
                     f"unknown name(s) {sorted(unknown)}; a condition reads {sorted(CONDITION_VARIABLES)}")
                )
    if problems:
        raise ConfigError(path, problems)
    return tf


def _cel_message(msg: str) -> str:
    """CEL's own message keeps its source line and caret; indent them under ours."""
    head, _, rest = msg.partition("ERROR: <input>:")
    return ("CEL: " + rest).replace("\n", "\n    ") if rest else f"CEL: {head}"
