"""YAML config loading that keeps line numbers, so errors name file, line and field.

Marketers and ops edit YAML by hand; a message like ``triggers.yaml:14:
triggers.2.within: expected a duration like 30m`` is the difference between a
fix and a support ticket. PyYAML's composer already tracks node marks: we keep
them in a side table keyed by the field path while building plain data.

``${VAR}`` and ``${VAR:-default}`` in scalar strings are replaced from the
environment, ``${file:/run/secrets/name}`` by a file an orchestrator mounts, so
URLs and secrets never need to be committed, and a secret written in a file is
refused: a value under a secret-like key (password, secret, token, api_key …)
must be such a reference, and so must the password of a URL, defaults included.

>>> _plaintext_secret(("redis", "url"), "redis://:hunter2@cache:6379/0")
'a password in a URL must come from the environment: write it as ${VAR} or ${file:/path}'
>>> _plaintext_secret(("kafka", "add_config", "sasl.password"), "${KAFKA_PASSWORD}") is None
True
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)

_ENV = re.compile(r"\$\{(?:file:(?P<file>[^}]+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?)\}")
_REF = re.compile(r"^\$\{(?:file:[^}]+|[A-Za-z_][A-Za-z0-9_]*(?::-)?)\}$")
_SECRET_KEY = re.compile(r"(?i)(?:^|[._-])(?:password|passwd|secret|token|api[_-]?key|private[_-]?key|credentials?)$")
_URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@:\s]*:([^@/\s]+)@", re.I)


def _secret_key(loc: Loc) -> bool:
    return bool(loc) and bool(_SECRET_KEY.search(str(loc[-1])))


def _plaintext_secret(loc: Loc, raw: str) -> str | None:
    """Why ``raw``, the value written at ``loc``, holds a secret in clear text; None when it does not."""
    if _secret_key(loc) and raw.strip() and not _REF.match(raw.strip()):
        return "a secret must not be written in a config file: write ${VAR} (environment) or ${file:/path} (mounted)"
    texts = [raw, *(m.group("default") for m in _ENV.finditer(raw) if m.group("default"))]
    for text in texts:
        for m in _URL_PASSWORD.finditer(text):
            if not _REF.match(m.group(1)):
                return "a password in a URL must come from the environment: write it as ${VAR} or ${file:/path}"
    return None


class ConfigError(ValueError):
    """A config file is wrong; the message lists every problem as file:line: field: what."""

    def __init__(self, path: str | Path, problems: list[tuple[int | None, str, str]]):
        self.path = str(path)
        self.problems = problems
        lines = [
            f"{self.path}:{line if line is not None else '?'}: {field or '<root>'}: {msg}"
            for line, field, msg in problems
        ]
        super().__init__("\n".join(lines))


def _expand_env(value: str, path: str | Path, line: int) -> str:
    def repl(m: re.Match[str]) -> str:
        if m.group("file"):
            try:
                return Path(m.group("file")).read_text(encoding="utf-8").strip()
            except OSError as e:
                raise ConfigError(path, [(line, "", f"secret file {m.group('file')} cannot be read: {e.strerror}")]) from None
        name, default = m.group("name"), m.group("default")
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(path, [(line, "", f"environment variable {name} is not set")])

    return _ENV.sub(repl, value)


def _build(node: yaml.Node, loc: Loc, lines: dict[Loc, int], path: str | Path) -> Any:
    line = node.start_mark.line + 1
    lines[loc] = line
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            # keys are names, never YAML 1.1 booleans: `on:` must stay "on"
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else _scalar(key_node)
            if key in out:
                raise ConfigError(path, [(key_node.start_mark.line + 1, ".".join(map(str, loc + (key,))), "duplicate key")])
            lines[loc + (key,)] = key_node.start_mark.line + 1
            out[key] = _build(value_node, loc + (key,), lines, path)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, loc + (i,), lines, path) for i, item in enumerate(node.value)]
    value = _scalar(node)
    if isinstance(value, str):
        why = _plaintext_secret(loc, value)
        if why is not None:
            raise ConfigError(path, [(line, ".".join(map(str, loc)), why)])
    if isinstance(value, str) and "${" in value:
        value = _expand_env(value, path, line)
        # a substituted value is typed like YAML would type it (numbers, booleans); a secret stays as it is
        if value and not value.startswith(("{", "[")) and not _secret_key(loc):
            value = yaml.safe_load(value)
    return value


def _scalar(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> tuple[Any, dict[Loc, int]]:
    """Read a YAML file into plain data plus a map from field path to line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(path, [(None, "", f"cannot read file: {e.strerror}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise ConfigError(path, [(line, "", f"invalid YAML: {e.problem}")]) from None
    lines: dict[Loc, int] = {}
    if node is None:
        return {}, lines
    return _build(node, (), lines, path), lines


def line_of(lines: dict[Loc, int], loc: Loc) -> int | None:
    """The line of the deepest known prefix of ``loc`` (pydantic adds union/tag parts)."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _data_path(loc: Loc, lines: dict[Loc, int]) -> Loc:
    """Drop the parts pydantic adds that are not in the file (a union's tag, like ``absence``).

    >>> _data_path(("triggers", 0, "absence", "within"), {("triggers",): 1, ("triggers", 0): 2, ("triggers", 0, "within"): 6})
    ('triggers', 0, 'within')
    """
    out: Loc = ()
    for i, part in enumerate(loc):
        tag = out + (part,) not in lines and i + 1 < len(loc) and out + (loc[i + 1],) in lines
        if not tag:
            out += (part,)
    return out


def validate(model: type[M], data: Any, path: str | Path, lines: dict[Loc, int], base: Loc = ()) -> M:
    """Validate ``data`` as ``model``, turning pydantic errors into a ConfigError with lines."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = _data_path(base + tuple(p for p in err["loc"] if isinstance(p, (str, int))), lines)
            field = ".".join(str(p) for p in loc)
            problems.append((line_of(lines, loc), field, _message(err)))
        raise ConfigError(path, problems) from None


def _message(err: dict[str, Any]) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return "unknown field (check the spelling)"
    # a whole section is never echoed: it is noise, and may hold a secret
    if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
        got = repr(err["input"])
        return f"{msg} (got {got[:60]})"
    return msg


def load_model(model: type[M], path: str | Path) -> M:
    """Load and validate one YAML file as ``model``."""
    data, lines = load_yaml(path)
    return validate(model, data, path, lines)
