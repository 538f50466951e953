"""Loading a deployment: its config, feature definitions and triggers, all checked up front.

Anything that cannot work must be refused by ``nudgeflow validate`` (and by a
flow at start) with the file, the line and the field, never discovered at run
time as a trigger that silently never fires: CEL errors come with a caret,
unknown event types and unknown feature names are named.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from connectors.csvlog import CsvMapping
from nudgeflow.events import BUILTIN_TYPES, FEEDBACK_TYPES, IDLE
from nudgeflow.settings import (
    AbsenceTrigger, CrossingTrigger, EventsConfig, EventTrigger, FeatureDefs, ModelsFile, Settings, TriggersFile, load_settings,
)
from nudgeflow.yamlconf import ConfigError, line_of, load_yaml, validate
from operators.features import FeaturePlan, window_label
from operators.payload import PayloadTemplate
from operators.triggers import PLATFORM_FEATURE, compile_condition, feature_refs, score_refs

log = logging.getLogger(__name__)

#: the names a condition may read
CONDITION_VARIABLES = frozenset({"event", "features", "user", "score"})
#: the plain names a payload template may use (besides features.*, score.* and user.*)
TEMPLATE_NAMES = frozenset({"user_id", "trigger", "variant", "channel", "action_id", "event_ts", "decided_ms"})


@dataclass
class Deployment:
    """Everything a flow is built from, validated."""

    settings: Settings
    base: Path
    features: FeatureDefs
    triggers: TriggersFile
    models: ModelsFile
    #: the CSV replay's column mapping (``source.kind: csv``), loaded from its file or inline
    csv_mapping: CsvMapping | None = None

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the config file."""
        p = Path(path)
        return p if p.is_absolute() else self.base / p

    def check_triggers(self, path: str | Path) -> TriggersFile:
        """Load a trigger file, checked against this deployment's event types, features and models."""
        return load_triggers(
            path, self.settings.events, FeaturePlan(self.features).names, [m.name for m in self.models.models]
        )


def load_deployment(path: str | Path) -> Deployment:
    """Load a deployment config with its feature and trigger files; raises ConfigError."""
    return deployment(*load_settings(path))


def deployment(settings: Settings, base: Path) -> Deployment:
    """Complete loaded settings with the feature and trigger files they name (relative to ``base``)."""
    dep = Deployment(settings, base, FeatureDefs(), TriggersFile(), ModelsFile())
    dep.features = load_features(dep.resolve(settings.features.definitions), settings.events)
    if settings.models:
        dep.models = load_models(dep.resolve(settings.models), settings.events, FeaturePlan(dep.features).names)
    dep.triggers = dep.check_triggers(dep.resolve(settings.triggers))
    if settings.source.kind == "csv" and settings.source.csv is not None:
        dep.csv_mapping = load_csv_mapping(settings.source.csv.mapping, dep.resolve, settings.events)
    return dep


def load_csv_mapping(mapping: str | CsvMapping, resolve: Callable[[str], Path], events: EventsConfig) -> CsvMapping:
    """Load a CSV replay mapping (a file, or inline in the deployment) and check the types it maps to."""
    if isinstance(mapping, str):
        path: str | Path = resolve(mapping)
        data, lines = load_yaml(path)
        mapping = validate(CsvMapping, data, path, lines)
    else:  # inline: validated with the deployment config, whose lines are gone by now
        path, lines = "source.csv.mapping", {}
    known = BUILTIN_TYPES | set(events.custom_types)
    problems = [
        (line_of(lines, ("types", raw)), f"types.{raw}", f"unknown event type {etype!r}")
        for raw, etype in mapping.types.items() if etype not in known
    ]
    if problems:
        raise ConfigError(path, problems)
    return mapping


def load_models(path: str | Path, events: EventsConfig, feature_names: list[str]) -> ModelsFile:
    """Load and check ``models.yaml``: features exist, pipelines build with their parameters."""
    from operators.models import check_model  # River is imported only where models are configured

    data, lines = load_yaml(path)
    mf = validate(ModelsFile, data, path, lines)
    known = BUILTIN_TYPES | set(events.custom_types)
    names = set(feature_names)
    problems: list[tuple[int | None, str, str]] = []
    for i, m in enumerate(mf.models):
        for j, f in enumerate(m.features):
            if f not in names:
                loc = ("models", i, "features", j)
                problems.append((line_of(lines, loc), ".".join(map(str, loc)), f"unknown feature {f!r} (see nudgeflow features)"))
        _types_known(m.label.events, known | {IDLE}, ("models", i, "label", "events"), lines, problems)
        if isinstance(m.label.events, list) and IDLE in m.label.events:
            loc = ("models", i, "label", "events", m.label.events.index(IDLE))
            problems.append((line_of(lines, loc), ".".join(map(str, loc)),
                             f"{IDLE!r} is a look at a quiet shopper, not an outcome: score_on may name it, a label not"))
        _types_known(m.score_on, known | {IDLE}, ("models", i, "score_on"), lines, problems)
        try:
            check_model(m)
        except ValueError as e:
            loc = ("models", i, "params")
            problems.append((line_of(lines, loc) or line_of(lines, ("models", i)), ".".join(map(str, loc)), str(e)))
    if problems:
        raise ConfigError(path, problems)
    return mf


def _types_known(types: object, known: set[str], loc: tuple[str | int, ...], lines: dict, problems: list) -> None:
    if isinstance(types, list):
        for j, et in enumerate(types):
            if et not in known:
                problems.append((line_of(lines, loc + (j,)), ".".join(map(str, loc + (j,))), f"unknown event type {et!r}"))


def load_features(path: str | Path, events: EventsConfig) -> FeatureDefs:
    """Load and check ``features.yaml``: schema, event types, unique feature names."""
    data, lines = load_yaml(path)
    defs = validate(FeatureDefs, data, path, lines)
    known = BUILTIN_TYPES | set(events.custom_types)
    problems: list[tuple[int | None, str, str]] = []
    checks = [((kind, i, "types"), d.types) for kind in ("counts", "sums", "distinct")
              for i, d in enumerate(getattr(defs, kind))] + [(("recency", name), t) for name, t in defs.recency.items()]
    for loc, types in checks:
        _types_known(types, known, loc, lines, problems)
        for j, et in enumerate(types if isinstance(types, list) else ()):
            if et in FEEDBACK_TYPES:
                problems.append((line_of(lines, loc + (j,)), ".".join(map(str, loc + (j,))),
                                 f"{et!r} is feedback on our messages, not shopping: features never count it "
                                 "(the feedback query does)"))
    if defs.idle:
        keep_s = FeaturePlan(defs).retention_ms / 1000
        for j, span in enumerate(defs.idle):
            if span >= keep_s:
                problems.append((line_of(lines, ("idle", j)), f"idle.{j}",
                                 f"a shopper quiet for {span:g}s is forgotten by then (state is kept {keep_s:g}s, "
                                 "the longest window or lifecycle.remember): look earlier"))
    seen: dict[str, tuple[str, int]] = {}
    for kind in ("counts", "sums", "distinct"):
        for i, d in enumerate(getattr(defs, kind)):
            for w in d.windows:
                name = f"{d.name}_{window_label(w)}"
                if name in seen:
                    problems.append((line_of(lines, (kind, i, "name")), f"{kind}.{i}.name", f"feature {name!r} is defined twice"))
                seen[name] = (kind, i)
    if problems:
        raise ConfigError(path, problems)
    return defs


def load_triggers(
    path: str | Path, events: EventsConfig, feature_names: list[str] | None = None, model_names: list[str] | None = None
) -> TriggersFile:
    """Load and fully check a trigger file; raises :class:`ConfigError` listing every problem."""
    data, lines = load_yaml(path)
    tf = validate(TriggersFile, data, path, lines)
    known = BUILTIN_TYPES | set(events.custom_types) | {IDLE}
    features = set(feature_names) if feature_names is not None else None
    problems: list[tuple[int | None, str, str]] = []
    models = set(model_names or ())

    def problem(loc: tuple[str | int, ...], message: str) -> None:
        problems.append((line_of(lines, loc), ".".join(map(str, loc)), message))

    def check_ref(loc: tuple[str | int, ...], kind: str, name: str) -> None:
        """``features.<name>`` or ``score.<model>`` must exist."""
        if kind == "features" and features is not None and name not in features:
            problem(loc, f"unknown feature {name!r}; see the feature definitions (nudgeflow features)")
        elif kind == "score" and name not in models:
            problem(loc, f"unknown score {name!r}; scores come from the models in models.yaml")

    for i, t in enumerate(tf.triggers):
        for fld in ("on", "after", "unless", "first", "then"):
            types = getattr(t, fld, ())
            for j, et in enumerate(types if isinstance(types, list) else ()):
                if et not in known:
                    problem(("triggers", i, fld, j), f"unknown event type {et!r}")
        if isinstance(t, CrossingTrigger):
            check_ref(("triggers", i, "value"), *t.source)
        for where, payload in [(("triggers", i, "payload"), t.payload)] + [
            (("triggers", i, "variants", j, "payload"), v.payload) for j, v in enumerate(t.variants)
        ]:
            for ref in sorted(PayloadTemplate(payload).refs):
                kind, _, name = ref.partition(".")
                if kind in ("features", "score") and name:
                    check_ref(where, kind, name)
                elif ref not in TEMPLATE_NAMES and kind != "user":
                    problem(where, f"unknown placeholder ${{{ref}}}; a payload may use {sorted(TEMPLATE_NAMES)}, "
                                   "features.<name>, score.<model> and user.<attribute>")
        if isinstance(t, (EventTrigger, AbsenceTrigger)):
            loc = ("triggers", i, "condition")
            try:
                prog = compile_condition(t.condition)
            except ValueError as e:
                problem(loc, _cel_message(str(e)))
                continue
            unknown = set(prog.variables()) - CONDITION_VARIABLES
            if unknown:
                problem(loc, f"unknown name(s) {sorted(unknown)}; a condition reads {sorted(CONDITION_VARIABLES)}")
            unknown_scores = score_refs(t.condition) - models
            if unknown_scores:
                problem(loc, f"unknown score(s) {sorted(unknown_scores)}; scores come from the models in models.yaml")
            missing = feature_refs(t.condition) - features if features is not None else set()
            if missing:
                problem(loc, f"unknown feature(s) {sorted(missing)}; see the feature definitions (nudgeflow features)")
    if problems:
        raise ConfigError(path, problems)
    return tf


def trigger_features(tf: TriggersFile) -> set[str]:
    """The features a trigger file reads: conditions, crossing values, payload templates, and ``last_platform``
    for triggers choosing their channel by platform."""
    out: set[str] = set()
    for t in tf.triggers:
        if t.channel_by_platform:
            out.add(PLATFORM_FEATURE)
        if isinstance(t, (EventTrigger, AbsenceTrigger)):
            out |= feature_refs(t.condition)
        if isinstance(t, CrossingTrigger) and t.source[0] == "features":
            out.add(t.source[1])
        for payload in [t.payload, *(v.payload for v in t.variants)]:
            out |= {r.partition(".")[2] for r in PayloadTemplate(payload).refs if r.startswith("features.")}
    return out


class TriggerSource:
    """A running flow's trigger file, read again when it changes (hot reload).

    :meth:`poll` looks at the file at most every ``every`` seconds (it is cheap to call per batch).
    A changed file is checked exactly as at start; a valid one becomes :attr:`current` under a new
    :attr:`version`, which the trigger engine and the guards pick up. An invalid one is logged with
    its errors (file, line, field) and the triggers that were running keep running. The feature step
    follows the same source, so a new trigger may read features no trigger read before.
    """

    def __init__(self, path: str | Path, current: TriggersFile, check: Callable[[Path], TriggersFile], every: float = 2.0):
        self.path = Path(path)
        self.current = current
        self.version = 1
        self.check = check
        self.every = every
        self._stamp = self._stat()
        self._next = time.monotonic() + every

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def poll(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            tf = self.check(self.path)
        except ConfigError as e:
            log.error("trigger file rejected, the previous triggers keep running: %s", e)
            return
        self.current, self.version = tf, self.version + 1
        log.info("trigger file %s reloaded: version %d, %d triggers", self.path, self.version, len(tf.triggers))


def _cel_message(msg: str) -> str:
    """CEL's own message keeps its source line and caret; indent them under ours."""
    head, _, rest = msg.partition("ERROR: <input>:")
    return ("CEL: " + rest).replace("\n", "\n    ") if rest else f"CEL: {head}"
