"""One gate for every control message (hello, goodbye, welcome) and for what a
receiver does with messages it refuses.

Why: ``json.loads`` alone accepts what crashes or fools the code after it: ``1e400`` (a float infinity, on
which ``int()`` raises OverflowError), 200,000 nested brackets (RecursionError inside the parser), ``true``
where an integer is due (``bool`` is an ``int`` in Python), ``5.7`` for a stream id. :func:`parse` caps the
size first, measures the nesting depth without recursing, refuses non-finite numbers, ``NaN`` and duplicate
keys, then holds the object against a :class:`Schema` of exact types and ranges. Every failure is a
:class:`ControlError` naming the message, the field, the value and the rule.

:class:`RefusalLog` counts refused messages by kind and logs them without letting a peer flood the log: the first
refusal of a kind from a peer at once, then at most one line per kind per peer per interval, with the count.
:func:`recv_parts` receives one ZeroMQ message keeping at most the parts the protocol has (a 125-part message is
read and dropped part by part, never held as a whole by the application).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import zmq

from transport.wire import WireError

U32_MAX = 2 ** 32 - 1
I64_MAX = 2 ** 63 - 1


class ControlError(WireError):
    """A control message that is not what the protocol allows (size, nesting, JSON, a field's type or range),
    or a ZeroMQ message that is not one of the protocol's kinds."""


# --------------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Field:
    """One field of a control message: ``kind`` is ``"int"`` (a JSON integer, never a boolean or a float, in
    ``lo..hi``), ``"str"`` (matching ``pattern`` in full) or ``"choice"`` (one of ``choices``)."""
    kind: str
    lo: int = 0
    hi: int = 0
    pattern: str = ""
    choices: tuple = ()
    required: bool = True

    def check(self, what: str, name: str, value: Any) -> Any:
        if self.kind == "int":
            if type(value) is not int:  # bool is a subclass of int: ``type`` keeps it out
                raise ControlError(f"{what}: {name} {_show(value)} is not an integer (a JSON integer in "
                                   f"{self.lo}..{self.hi} is due)")
            if not self.lo <= value <= self.hi:
                raise ControlError(f"{what}: {name} {_show(value)} is outside {self.lo}..{self.hi}")
            return value
        if self.kind == "str":
            if type(value) is not str or not re.fullmatch(self.pattern, value):
                raise ControlError(f"{what}: {name} {_show(value)} is not a string matching {self.pattern}")
            return value
        if value not in self.choices or type(value) is not type(self.choices[0]):
            raise ControlError(f"{what}: {name} {_show(value)} is not one of {list(self.choices)}")
        return value


def Int(lo: int, hi: int, required: bool = True) -> Field:  # noqa: N802 - reads like a type in a schema
    return Field("int", lo=lo, hi=hi, required=required)


def Str(pattern: str, required: bool = True) -> Field:  # noqa: N802
    return Field("str", pattern=pattern, required=required)


def Choice(*choices, required: bool = True) -> Field:  # noqa: N802
    return Field("choice", choices=tuple(choices), required=required)


@dataclass(frozen=True)
class Schema:
    """A control message: a JSON object with these ``fields`` (unknown keys are ignored, so a later version may
    add some; they still pass the size, depth and number checks), at most ``max_bytes`` long and ``max_depth``
    deep. ``free``: any JSON object (or ``null`` with ``nullable``) (a result record, say)."""
    name: str
    fields: dict[str, Field] = field(default_factory=dict)
    max_bytes: int = 4096
    max_depth: int = 4
    free: bool = False
    nullable: bool = False


U32 = Int(0, U32_MAX)
SESSION = r"[A-Za-z0-9_.:-]{1,64}"
SOURCE = r"[0-9a-f]{16,64}"  # a replay source's identity (stages.edge.source_identity): a hex digest
HELLO = Schema("hello", {"proto": Int(0, 255), "stream": U32, "session": Str(SESSION),
                         "mode": Choice("replay", "live"), "fingerprint": Str(r"[0-9a-fA-F]{2,128}"),
                         "source": Str(SOURCE, required=False)})
GOODBYE = Schema("goodbye", {"stream": U32})
WELCOME = Schema("welcome", {"instance": Str(r"[0-9a-f]{1,64}"), "stream": U32, "next": Int(0, I64_MAX),
                             "window": Int(1, 65535), "session": Str(SESSION, required=False)})


def _show(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 40 else s[:37] + "..."


# --------------------------------------------------------------------------------------------- parsing
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = np.full(256, -1, np.int8)  # +1 for an opening bracket, -1 for a closing one (nothing else is left)
_STEP[[ord("["), ord("{")]] = 1


def nesting_depth(data: bytes) -> int:
    """How deep a JSON text nests (``[[1]]`` -> 2), in linear time and without recursion: escaped backslashes
    and quotes, then strings are cut out (they may hold brackets), then the running count of ``[``/``{`` minus
    ``]``/``}`` peaks. Wherever the JSON parser gets (it stops at the first error), it is no deeper than that."""
    s = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    s = b"".join(s.split(b'"')[0::2]).translate(None, _NOT_BRACKET)  # odd pieces: inside strings
    if not s:
        return 0
    return int(np.cumsum(_STEP[np.frombuffer(s, np.uint8)], dtype=np.int32).max())


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ControlError(f"number {text[:40]} is not finite (beyond the range of a float)")
    return x


def _no_constant(name: str) -> Any:
    raise ControlError(f"{name} is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ControlError(f"key {dup!r} appears twice")
    return out


def parse(data: bytes | bytearray | memoryview, schema: Schema) -> dict | None:
    """Parse and check one control message against ``schema``; returns the object (``None``: a ``null`` where
    the schema allows it). Raises :class:`ControlError` naming what is wrong; never anything else."""
    what = schema.name
    data = bytes(data)
    if len(data) > schema.max_bytes:
        raise ControlError(f"{what} of {len(data)} bytes exceeds the limit of {schema.max_bytes} bytes")
    depth = nesting_depth(data)
    if depth > schema.max_depth:
        raise ControlError(f"{what} nests {depth} levels deep, more than the {schema.max_depth} allowed")
    try:
        text = data.decode("utf-8")
        obj = json.loads(text, parse_float=_finite, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except ControlError as exc:
        raise ControlError(f"{what}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digits limit
        raise ControlError(f"{what} is not valid JSON: {str(exc)[:120]}") from None
    if obj is None and schema.nullable:
        return None
    if not isinstance(obj, dict):
        raise ControlError(f"{what} is a JSON {type(obj).__name__}, not an object")
    if schema.free:
        return obj
    for name, f in schema.fields.items():
        if name not in obj:
            if f.required:
                raise ControlError(f"{what} lacks the field {name!r}")
            continue
        f.check(what, name, obj[name])
    return obj


# --------------------------------------------------------------------------------------------- receiving
def recv_parts(sock: zmq.Socket, max_parts: int) -> tuple[list[zmq.Frame], int, int]:
    """Receive one message (the first part with NOBLOCK: raises ``zmq.Again`` when none is waiting), keeping at
    most ``max_parts`` parts; any further part is read and released at once. Returns (kept parts, number of
    parts dropped, bytes dropped). ZeroMQ hands a message over only once all its parts arrived, so what its
    sender managed to queue is already in memory; this keeps the application from holding (and copying) it."""
    first = sock.recv(zmq.NOBLOCK, copy=False)
    kept, dropped, nbytes = [first], 0, 0
    more = first.more
    while more:
        part = sock.recv(copy=False)  # the rest of the message is already there
        more = part.more
        if len(kept) < max_parts:
            kept.append(part)
        else:
            dropped += 1
            nbytes += len(part)
            del part
    return kept, dropped, nbytes


_LIBC: Any = None
_last_trim = -math.inf
_trim_pending = False


def release_memory(nbytes: int, threshold: int = 16 * 1024 * 1024, min_interval_s: float = 1.0) -> None:
    """After dropping ``nbytes`` of refused message parts: give freed heap memory back to the system (glibc
    ``malloc_trim``; its allocator keeps large freed blocks otherwise, so one big refused message would leave the
    process's RSS high for good). At most once per ``min_interval_s``: a trim due meanwhile waits for
    :func:`trim_pending` (called by the receive loops' housekeeping). A no-op without glibc."""
    global _trim_pending
    if nbytes >= threshold:
        _trim_pending = True
    trim_pending(min_interval_s)


def trim_pending(min_interval_s: float = 1.0) -> None:
    """Run a trim that :func:`release_memory` held back, once ``min_interval_s`` passed since the last one."""
    global _LIBC, _last_trim, _trim_pending
    now = time.monotonic()
    if not _trim_pending or now - _last_trim < min_interval_s:
        return
    _last_trim, _trim_pending = now, False
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


# --------------------------------------------------------------------------------------------- refusals
class RefusalLog:
    """Counts refused messages per kind (:attr:`counts`, what the summaries show) and logs them without letting
    anyone flood the log: the first refusal of a kind from a peer at once, later ones at most one line per
    kind per peer per ``interval_s`` (with how many there were), at most ``max_lines`` lines per interval in all
    (what is held back is logged later, counted). ``max_peers`` bounds the memory kept per peer."""

    def __init__(self, log: Callable[[str], None], name: str, interval_s: float = 30.0, max_lines: int = 32,
                 max_peers: int = 1024):
        self.log, self.name = log, name
        self.interval_s, self.max_lines, self.max_peers = float(interval_s), int(max_lines), int(max_peers)
        self.counts: dict[str, int] = {}
        self.first_sender: dict[str, str] = {}
        self._peers: OrderedDict[tuple[str, str], list] = OrderedDict()  # -> [last logged, held back, first]
        self._window_start = -math.inf
        self._lines = 0

    def refuse(self, exc: BaseException, sender: str, peer: str | None = None, n: int = 1) -> None:
        """Count ``n`` refusals of ``exc``'s kind from ``sender`` (``peer``: its identity for the rate limit) and
        log them if the limits allow."""
        kind = type(exc).__name__
        self.counts[kind] = self.counts.get(kind, 0) + n
        self.first_sender.setdefault(kind, sender)
        now = time.monotonic()
        if now - self._window_start >= self.interval_s:
            self._window_start, self._lines = now, 0
        key = (kind, peer if peer is not None else sender)
        entry = self._peers.get(key)
        if entry is None:
            if len(self._peers) >= self.max_peers:
                self._peers.popitem(last=False)
            entry = self._peers[key] = [-math.inf, 0, True]
        else:
            self._peers.move_to_end(key)
        entry[1] += n
        if now - entry[0] < self.interval_s or self._lines >= self.max_lines:
            return
        self._lines += 1
        every = f"{self.interval_s:.0f} s"
        if entry[2]:
            self.log(f"[{self.name}] refused a message ({kind}) from {sender}: {exc} (further {kind} from this "
                     f"peer are counted and logged once per {every})")
        else:
            ago = now - entry[0]
            self.log(f"[{self.name}] refused {entry[1]} more message(s) ({kind}) from {sender} in the last "
                     f"{ago:.0f} s; latest: {exc}")
        entry[0], entry[1], entry[2] = now, 0, False


# --------------------------------------------------------------------------------------------- per-peer budgets
class Buckets:
    """Token buckets, one per key (a peer), with bounded memory: ``burst`` tokens at most, ``rate`` tokens back
    per second. Why: what one peer may cost the server (new sessions, hellos, refused messages) must not grow
    with how fast it sends. ``max_keys`` buckets are kept (least recently used forgotten: a forgotten peer
    starts again with a full bucket, so the bound never locks anyone out)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 4096):
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1 (got rate {rate}, burst {burst})")
        self.rate, self.burst, self.max_keys = float(rate), float(burst), int(max_keys)
        self._b: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, last refill time]

    def _bucket(self, key: str, now: float) -> list[float]:
        b = self._b.get(key)
        if b is None:
            if len(self._b) >= self.max_keys:
                self._b.popitem(last=False)
            b = self._b[key] = [self.burst, now]
        else:
            self._b.move_to_end(key)
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        return b

    def level(self, key: str, now: float | None = None) -> float:
        """Tokens ``key`` has now (refilled)."""
        return self._bucket(key, time.monotonic() if now is None else now)[0]

    def take(self, key: str, n: float = 1.0, now: float | None = None) -> bool:
        """Spend ``n`` tokens of ``key`` if it has them; False (nothing spent) otherwise."""
        b = self._bucket(key, time.monotonic() if now is None else now)
        if b[0] < n:
            return False
        b[0] -= n
        return True

    def charge(self, key: str, n: float = 1.0, now: float | None = None) -> None:
        """Spend ``n`` tokens whatever the level (down to ``-burst``): for costs known only afterwards."""
        b = self._bucket(key, time.monotonic() if now is None else now)
        b[0] = max(-self.burst, b[0] - n)
