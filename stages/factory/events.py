"""Events (`events.items`): item lifecycle and line events from tracks and counts, with rules from the graph YAML.

Event types (``type``):

* ``item.new`` (an item confirmed: seen on ``min_hits`` frames), ``item.update`` (``reason``: ``counted`` when it
  crossed the station line, ``class`` when its voted class changed, ``periodic`` every ``update_every`` frames),
  ``item.end`` (``reason`` ``exit`` or ``lost``). The ``item`` field holds id, class, name, mean score, class
  share, first and last frame, hits and, once counted, ``crossing_frame`` / ``crossing_t``.
* ``line.idle`` (no confirmed item on the belt for ``after_s`` seconds) and ``line.running`` (items again).
* ``item.low_confidence`` (an item counted at the station with a mean score or class share below the rule's
  limits: worth a look by the operator) and ``item.alert`` (an item of a listed class counted).

Every event has ``id`` (``LINE:RUN:STREAM:SEQ``, unique: RUN is random per start), ``type``, ``line``,
``stream``, ``frame`` and ``t`` (seconds, the tracker's clock), so consumers can de-duplicate (MQTT QoS 1
delivers at least once). Rules, in the stage's ``params``::

    rules:
      - {when: item, emit: [new, update, end], min_hits: 3, update_every: 0}
      - {when: idle, after_s: 30}
      - {when: low_confidence, min_score: 0.4, min_class_share: 0.6}
      - {when: class, classes: [bag]}

Without ``rules`` the first three above apply. Per frame the stage adds ``results["events"]`` (a list, often
empty), written by ``sink.jsonl`` as is and published by ``sink.mqtt``.
"""
from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Any

from core.errors import UsageError
from pipeline.stage import FrameResult, Stage, register_stage

ITEM_EMITS = ("new", "update", "end")
RULE_KEYS: dict[str, dict[str, str]] = {  # kind -> key -> what it takes
    "item": {"emit": f"a list out of {list(ITEM_EMITS)}", "min_hits": "a whole number >= 1",
             "update_every": "a whole number of frames >= 0 (0: no periodic updates)"},
    "idle": {"after_s": "a number of seconds > 0"},
    "low_confidence": {"min_score": "a number in [0, 1]", "min_class_share": "a number in [0, 1]"},
    "class": {"classes": "a non-empty list of class names or ids"},
}
DEFAULT_RULES = [{"when": "item"}, {"when": "idle", "after_s": 30.0},
                 {"when": "low_confidence", "min_score": 0.4, "min_class_share": 0.6}]


@dataclass
class Rules:
    """Validated rules (see the module doc)."""

    emit: tuple[str, ...] = ()
    min_hits: int = 3
    update_every: int = 0
    idle_after_s: float | None = None
    min_score: float | None = None
    min_class_share: float | None = None
    alert_classes: set[str] = field(default_factory=set)


def _num(where: str, key: str, v: Any, lo: float, hi: float | None, integer: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
    if integer:
        ok = ok and float(v).is_integer()
    if not ok:
        raise UsageError(f"events.items: {where}.{key} {v!r} is not {RULE_KEYS_FLAT[key]}; "
                         f"fix the rule in the graph YAML")
    return int(v) if integer else float(v)


RULE_KEYS_FLAT = {k: v for kind in RULE_KEYS.values() for k, v in kind.items()}


def parse_rules(rules: Any) -> Rules:
    """Validate ``rules`` (a list of mappings with ``when``); errors name the rule, the key and what is allowed."""
    if rules is None:
        rules = DEFAULT_RULES
    if not isinstance(rules, list):
        raise UsageError(f"events.items: rules must be a list of mappings such as {{when: idle, after_s: 30}}, "
                         f"got {type(rules).__name__} {rules!r}")
    out = Rules()
    seen: set[str] = set()
    for i, r in enumerate(rules):
        where = f"rules[{i}]"
        if not isinstance(r, dict):
            raise UsageError(f"events.items: {where} must be a mapping such as {{when: idle, after_s: 30}}, got {r!r}")
        kind = r.get("when")
        if kind not in RULE_KEYS:
            raise UsageError(f"events.items: {where}.when {kind!r} is not a rule kind; use one of "
                             f"{', '.join(RULE_KEYS)}")
        if kind in seen:
            raise UsageError(f"events.items: {where}: a second `{kind}` rule; give each kind once")
        seen.add(kind)
        unknown = sorted(set(r) - {"when"} - set(RULE_KEYS[kind]))
        if unknown:
            allowed = ", ".join(f"{k} ({v})" for k, v in RULE_KEYS[kind].items())
            raise UsageError(f"events.items: {where}: unknown key(s) {unknown} for `when: {kind}`; allowed: {allowed}")
        if kind == "item":
            emit = r.get("emit", list(ITEM_EMITS))
            if not isinstance(emit, list) or not emit or any(e not in ITEM_EMITS for e in emit):
                raise UsageError(f"events.items: {where}.emit {emit!r} is not {RULE_KEYS['item']['emit']}")
            out.emit = tuple(emit)
            out.min_hits = _num(where, "min_hits", r.get("min_hits", 3), 1, None, integer=True)
            out.update_every = _num(where, "update_every", r.get("update_every", 0), 0, None, integer=True)
        elif kind == "idle":
            if "after_s" not in r:
                raise UsageError(f"events.items: {where}: `when: idle` needs after_s (seconds without items), "
                                 f"e.g. {{when: idle, after_s: 30}}")
            v = r["after_s"]
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
                raise UsageError(f"events.items: {where}.after_s {v!r} is not {RULE_KEYS['idle']['after_s']}")
            out.idle_after_s = float(v)
        elif kind == "low_confidence":
            if "min_score" not in r and "min_class_share" not in r:
                raise UsageError(f"events.items: {where}: `when: low_confidence` needs min_score and/or "
                                 f"min_class_share, e.g. {{when: low_confidence, min_score: 0.4}}")
            if "min_score" in r:
                out.min_score = _num(where, "min_score", r["min_score"], 0, 1)
            if "min_class_share" in r:
                out.min_class_share = _num(where, "min_class_share", r["min_class_share"], 0, 1)
        else:
            cl = r.get("classes")
            if not isinstance(cl, list) or not cl or not all(isinstance(c, (str, int)) and not isinstance(c, bool)
                                                             for c in cl):
                raise UsageError(f"events.items: {where}.classes {cl!r} is not {RULE_KEYS['class']['classes']}")
            out.alert_classes = {str(c) for c in cl}
    return out


@dataclass
class _ItemRec:
    announced: bool = False
    cls: int = -1
    last_update: int = 0
    crossing: dict[str, Any] | None = None


class LineEvents:
    """Event logic for one stream: feed it each frame's ``tracks`` and ``counts``; returns that frame's events."""

    def __init__(self, rules: Rules, line: str, stream: int, run: str):
        self.rules, self.line, self.stream, self.run = rules, line, stream, run
        self.seq = 0
        self.items: dict[int, _ItemRec] = {}
        self.last_busy_t: float | None = None  # last time a confirmed item was on the belt
        self.t0: float | None = None
        self.idle = False

    def _event(self, etype: str, frame: int, t: float, **payload) -> dict[str, Any]:
        self.seq += 1
        return {"id": f"{self.line}:{self.run}:{self.stream}:{self.seq}", "type": etype, "line": self.line,
                "stream": self.stream, "frame": frame, "t": round(t, 6), **payload}

    def _item(self, d: dict, rec: _ItemRec) -> dict[str, Any]:
        out = {k: d[k] for k in ("id", "class", "name", "score", "class_share", "first_frame", "last_frame", "hits")}
        out["counted"] = rec.crossing is not None
        if rec.crossing is not None:
            out.update(rec.crossing)
        return out

    def update(self, frame: int, t: float, tracks: dict, counts: dict | None) -> list[dict[str, Any]]:
        r, ev = self.rules, []
        if self.t0 is None:
            self.t0 = t
        counted = {c["id"]: c for c in (counts or {}).get("counted", [])}
        busy = False
        for d in tracks["active"]:
            rec = self.items.setdefault(d["id"], _ItemRec())
            if d["hits"] < r.min_hits and d["id"] not in counted:
                continue
            busy = True
            if not rec.announced:
                rec.announced, rec.cls, rec.last_update = True, d["class"], frame
                if "new" in r.emit:
                    ev.append(self._event("item.new", frame, t, item=self._item(d, rec)))
            reason = None
            if d["id"] in counted:
                c = counted[d["id"]]
                rec.crossing = {"crossing_frame": c["crossing_frame"], "crossing_t": c["crossing_t"]}
                reason = "counted"
            elif d["class"] != rec.cls:
                reason = "class"
            elif r.update_every and frame - rec.last_update >= r.update_every:
                reason = "periodic"
            rec.cls = d["class"]
            if reason is not None:
                rec.last_update = frame
                if "update" in r.emit:
                    ev.append(self._event("item.update", frame, t, reason=reason, item=self._item(d, rec)))
            if reason == "counted":
                low = []
                if r.min_score is not None and d["score"] < r.min_score:
                    low.append(f"score {d['score']:.2f} < {r.min_score}")
                if r.min_class_share is not None and d["class_share"] < r.min_class_share:
                    low.append(f"class share {d['class_share']:.2f} < {r.min_class_share}")
                if low:
                    ev.append(self._event("item.low_confidence", frame, t, why="; ".join(low),
                                          item=self._item(d, rec)))
                if r.alert_classes & {d["name"], str(d["class"])}:
                    ev.append(self._event("item.alert", frame, t, why=f"class {d['name']} is on the alert list",
                                          item=self._item(d, rec)))
        for d in tracks["ended"]:
            rec = self.items.pop(d["id"], None)
            if rec is not None and rec.announced and "end" in r.emit:
                ev.append(self._event("item.end", frame, t, reason=d.get("reason", "lost"), item=self._item(d, rec)))
        if busy:
            self.last_busy_t = t
            if self.idle:
                self.idle = False
                ev.append(self._event("line.running", frame, t))
        elif r.idle_after_s is not None and not self.idle:
            since = self.last_busy_t if self.last_busy_t is not None else self.t0
            if t - since >= r.idle_after_s:
                self.idle = True
                ev.append(self._event("line.idle", frame, t, idle_s=round(t - since, 3)))
        return ev


@register_stage
class ItemEvents(Stage):
    """Item lifecycle and line events (idle/running, low confidence, class alerts) from tracks and counts."""
    key = "events.items"
    accepts = (FrameResult,)
    emits = (FrameResult,)

    def __init__(self, line: str = "line1", rules: Any = None):
        if not isinstance(line, str) or not line or any(ch in line for ch in "/+#:"):
            raise UsageError(f"events.items: line {line!r} must be a non-empty name without / + # or : "
                             f"(it is part of event ids and MQTT topics), e.g. line: line1")
        self.line = line
        self.rules = parse_rules(rules)
        self.streams: dict[int, LineEvents] = {}

    def open(self, ctx) -> None:
        super().open(ctx)
        self.run = uuid.uuid4().hex[:8]

    def process(self, fr: FrameResult) -> FrameResult:
        tracks = fr.results.get("tracks")
        if tracks is None:
            raise UsageError(f"events.items {self.ctx.name!r}: frame {fr.index} of stream {fr.stream} has no "
                             f"`tracks`; put track.items (and count.items) before it")
        le = self.streams.get(fr.stream)
        if le is None:
            le = self.streams[fr.stream] = LineEvents(self.rules, self.line, fr.stream, self.run)
        ev = le.update(fr.index, tracks["t"], tracks, fr.results.get("counts"))
        results = dict(fr.results)
        results["events"] = ev
        self.ctx.stats.extra["events"] = self.ctx.stats.extra.get("events", 0) + len(ev)
        return dataclasses.replace(fr, results=results)
