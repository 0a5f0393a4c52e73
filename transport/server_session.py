"""The server's end of the link (:mod:`transport.protocol`): a ROUTER with peers and streams, checks, ownership,
dedup, credits, fair queuing across peers, acknowledgements from a :class:`transport.runs.RunLedger`."""
from __future__ import annotations

import json
import os
import time
import traceback
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from transport import control, wire
from transport.control import ControlError
from transport.runs import RunLedger

from transport.protocol import (PROTO, K_HELLO, K_DATA, K_WELCOME, K_ACK, K_NACK, K_ERROR, K_BYE, BUSY, ACK_FORMAT, NACK_FORMAT, tune)


@dataclass
class StreamState:
    stream: int
    mode: str
    session: str  # the run: the edge session that opened it (a restarted edge on the same source continues it)
    peer: bytes
    sender: str
    owner: str = ""  # "key <CURVE public key>" or, without keys, "session <id>"
    next: int = 0  # replay: the only index accepted next
    last: int = -1  # live: last accepted index
    pending: set = field(default_factory=set)
    finished_next: int = 0  # replay: contiguous finished + 1
    finished_above: set = field(default_factory=set)
    eos: int | None = None
    eos_acked: bool = False
    bye: bool = False
    last_seen: float = 0.0
    last_nack: float = 0.0
    received: int = 0
    connected: bool = True
    source: str | None = None  # replay: the identity of the edge's source (hello ``source``)
    peer_id: str = ""  # who holds this slot, for the per-peer caps: "key <K>" or "address <A>"


class RefuseError(wire.WireError):
    """Base of the session-level refusals (below)."""


class ReplayedError(RefuseError):
    """A frame index seen before (duplicate, or older than what the server already finished)."""


class OutOfOrderError(RefuseError):
    """A replay frame beyond the next expected index (an earlier one was lost on the way)."""


class UnknownPeerError(RefuseError):
    """Data from a peer that never said hello, or for a stream it does not own."""


class CreditError(RefuseError):
    """More frames in flight than the granted window."""


class EndedError(RefuseError):
    """A frame after the stream's end-of-stream message (a new edge session starts a new run instead)."""


class ModeError(RefuseError):
    """A frame whose live/replay flag disagrees with the mode its stream was opened with (or a hello that
    changes the mode of a running session)."""


class StreamOwnerError(RefuseError):
    """A hello for a stream that another key (without keys: another edge session) owns and is still using."""


class StreamLimitError(RefuseError):
    """A hello that would open a stream beyond the server's limits: all its stream slots held by live streams,
    the peer's own ``max_streams_per_peer``, or the peer opening sessions faster than ``session_rate``."""


class FloodError(RefuseError):
    """A message dropped unread because its peer is over its budget of costly messages (hellos, goodbyes,
    refused or repeated frames: ``peer_rate`` per second after a burst of twice that)."""


class PartsError(ControlError):
    """A ZeroMQ message with more parts than any message of the protocol (dropped part by part)."""


class InternalError(RefuseError):
    """Handling one message raised an unexpected exception (a bug): that message is dropped, the server goes on."""


def _owner_label(owner: str) -> str:
    kind, _, ident = owner.partition(" ")
    return f"{kind} {ident[:12]}..." if kind == "key" and len(ident) > 12 else owner


def _may_continue(open_run: bool, run_owner: str | None, run_source: str | None, owner: str, mode: str,
                  source: str | None) -> bool:
    """Whether a new edge session continues an earlier run of its stream (instead of starting a new one): the
    run is a replay that has not ended, the new session replays the same source (same identity), and it has
    the run's owner: the same CURVE key (without keys there is no identity to compare: the source decides)."""
    if not open_run or mode != "replay" or source is None or source != run_source or not run_owner:
        return False
    return run_owner == owner or (run_owner.startswith("session ") and owner.startswith("session "))


class ServerSession:
    """The server's end: ROUTER socket, peers and streams, checks, dedup, credits, acks. Single-threaded: the
    receive stage calls :meth:`poll` and :meth:`flush_acks` from its own thread.

    Limits checked before anything is allocated for a message: ``max_payload`` per part (ZeroMQ), 2 parts per
    message (more are dropped one by one), control messages by :mod:`transport.control`, the declared original
    frame size (``max_frame_side``, pixels per side), ``window`` frames in flight and ``max_streams`` streams.
    ``owner_timeout_s``: a stream's owner silent for longer may lose it to another key. ``log_interval_s``:
    refusals are logged at most once per kind per peer per interval (all are counted).

    Per peer (its CURVE key, without keys its address): at most ``max_streams_per_peer`` streams, new sessions
    at ``session_rate`` per second after a burst of ``max_streams_per_peer``; a stream silent for ``reclaim_s``
    (default ``owner_timeout_s``) gives its slot up to a new stream that needs it. **Fair queuing**: each round
    reads what is waiting into one queue per peer and serves the queues in turn, one message each, so a flood
    delays another peer's frame by one message per flooding peer, not by the flood; a peer whose costly messages
    (hellos, goodbyes, refused or repeated frames) exceed ``peer_rate`` per second (after a burst of twice that)
    has its messages dropped unread (about 2 us each) until it slows down. A round that dropped such messages
    or found more waiting than it took is followed by a pause of ``yield_s`` (the receive thread would otherwise
    hold the GIL through a flood, and every other stage of the process would wait for it). A round also ends
    once it has dropped ``max_drops`` such messages: ZeroMQ's ROUTER reads its connections in turn, so another
    peer's frame is among the first reads of a round and is served after ``max_drops`` drops, not after a whole
    round of them (under a flood of 100k messages/s a round took 0.55 ms median with 256, 0.42 ms with 32; the
    rest is the ``yield_s`` pause)."""

    def __init__(self, endpoint: str, fingerprint: bytes, latent_shape: tuple[int, int, int] | None,
                 commit: RunLedger, security=None, window: int = 8, max_payload: int = 4 * 1024 * 1024,
                 live_window: int = 2,
                 max_streams: int = 256, log: Callable[[str], None] = print, bind: bool = True,
                 context: zmq.Context | None = None, name: str = "server", max_frame_side: int = 4096,
                 owner_timeout_s: float = 3.0, log_interval_s: float = 30.0, max_streams_per_peer: int = 32,
                 session_rate: float = 2.0, reclaim_s: float | None = None, peer_rate: float = 1000.0,
                 yield_s: float = 0.0002, max_drops: int = 32):
        self.fingerprint, self.latent_shape = fingerprint, tuple(latent_shape) if latent_shape else None
        self.commit, self.window, self.max_payload = commit, int(window), int(max_payload)
        # live streams get a shallow window: frames in flight are frames of latency (8 in flight at 6.6 fps
        # measured 1.2 s median; 2 keeps the newest frames moving), replays keep the deeper one for throughput
        self.live_window = min(self.window, int(live_window))
        self.max_streams, self.log, self.name = int(max_streams), log, name
        self.max_frame_side, self.owner_timeout_s = int(max_frame_side), float(owner_timeout_s)
        self.max_streams_per_peer = int(max_streams_per_peer)
        self.session_rate = float(session_rate)
        self.reclaim_s = float(reclaim_s) if reclaim_s is not None else self.owner_timeout_s
        self.peer_rate, self.yield_s = float(peer_rate), float(yield_s)
        self.max_drops = int(max_drops)
        self._curve = bool(security is not None and getattr(security, "on", False))
        if self.max_streams < 1 or self.max_streams_per_peer < 1 or self.max_drops < 1:
            raise ValueError("max_streams, max_streams_per_peer and max_drops must be >= 1")
        if self.session_rate <= 0 or self.peer_rate <= 0 or self.reclaim_s <= 0 or self.yield_s < 0:
            raise ValueError("session_rate, peer_rate and reclaim_s must be > 0, yield_s >= 0")
        self.instance = os.urandom(6).hex()
        self.started = time.monotonic()
        self._ctx = context or zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.setsockopt(zmq.RCVHWM, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, wire.HEADER_SIZE + self.max_payload + 64)
        tune(self.sock, heartbeat=False)  # see _tune: a server-side heartbeat timer can abort the process
        if security is not None:
            security.apply(self.sock)
        from transport.link import attach
        self.endpoint = attach(self.sock, endpoint, bind)
        self.streams: dict[int, StreamState] = {}
        self.refusals = control.RefusalLog(log, name, interval_s=log_interval_s)
        self.refused: dict[str, int] = self.refusals.counts
        self.refused_senders: dict[str, str] = self.refusals.first_sender
        self.sessions_budget = control.Buckets(self.session_rate, self.max_streams_per_peer)
        self.budget = control.Buckets(self.peer_rate, 2 * self.peer_rate)
        self.notes = control.Buckets(0.2, 20)  # stream lifecycle log lines per peer (opened, silent, ...)
        self._notes_held: dict[str, int] = {}
        self._inbox: OrderedDict[str, deque] = OrderedDict()  # peer -> messages read, not yet handled
        self._ended: OrderedDict[tuple[int, str], None] = OrderedDict()  # (stream, run) of runs that ended
        self._hot = False  # the last round left messages waiting or dropped a flood: pause before the next
        self.reclaimed = 0
        self.accepted = 0
        self.bytes = 0
        self.last_status = 0.0

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _meta(frames) -> tuple[bytes, str | None, str | None]:
        """(routing id, peer address, CURVE public key or None) of a received message."""
        rid = frames[0].bytes if hasattr(frames[0], "bytes") else frames[0]
        addr = user = None
        try:
            addr = frames[-1].get("Peer-Address")
        except (zmq.ZMQError, AttributeError, TypeError):
            pass
        try:
            user = frames[-1].get("User-Id")
        except (zmq.ZMQError, AttributeError, TypeError):
            pass
        return rid, addr, (user if user and user != "anonymous" else None)

    @staticmethod
    def _sender(frames) -> str:
        rid, addr, user = ServerSession._meta(frames)
        s = f"peer {addr or 'local'} id {rid.hex()}"
        if user:
            s += f" key {user[:12]}..."
        return s

    @staticmethod
    def _peer(frames) -> str:
        """Who sent it, for log rate limits and the per-peer caps: the CURVE key when there is one, else the
        address (without either, e.g. ipc://, the connection)."""
        rid, addr, user = ServerSession._meta(frames)
        return f"key {user}" if user else f"address {addr or rid.hex()}"

    def refuse(self, exc: Exception, sender: str, peer: str | None = None, n: int = 1) -> None:
        """Count ``n`` refused messages by kind; log them (rate-limited per kind and peer); charge the peer's
        budget (a refusal is a costly message)."""
        self.refusals.refuse(exc, sender, peer, n)
        if peer is not None and not isinstance(exc, FloodError):
            self.budget.charge(peer, n)

    def _send(self, rid: bytes, *parts: bytes) -> None:
        try:
            self.sock.send_multipart([rid, *parts], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # that peer is gone or its queue is full: it asks again with its next hello

    def _note(self, peer: str, text: str) -> None:
        """Log one stream lifecycle line (opened, silent, reclaimed) within the peer's log budget: a peer that
        churns streams cannot flood the log (what is held back is counted in its next line)."""
        if not self.notes.take(peer):
            self._notes_held[peer] = self._notes_held.get(peer, 0) + 1
            return
        held = self._notes_held.pop(peer, 0)
        self.log(text + (f" ({held} earlier stream event(s) of this peer not logged)" if held else ""))

    # ------------------------------------------------------------------ receive
    def poll(self, timeout_ms: int = 10, max_messages: int = 256) -> list[tuple[wire.WireHeader, Any, bytes, int]]:
        """Handle what arrived; return accepted frames as (header, payload view, message, received_ns).

        One round: read up to ``max_messages`` waiting messages into per-peer queues, then serve the queues in
        turn (one message per peer per turn), so that one peer's flood delays another's frame by a turn, not by
        the flood. A peer that runs out of budget while its queue is served has the rest dropped unread (its
        costly messages would otherwise all be handled before this round's frames are returned). A message whose
        handling raises (a bug) is refused as InternalError: one message never stops the server."""
        out: list = []
        if self._hot:  # the last round left messages waiting: let the stages downstream have the GIL first
            self._hot = False
            if self.yield_s:
                time.sleep(self.yield_s)
        if not self._inbox and not self.sock.poll(timeout_ms, zmq.POLLIN):
            return out
        self._read(max_messages)
        level, now = self.budget.level, time.monotonic()
        while self._inbox:
            for peer in list(self._inbox):
                q = self._inbox[peer]
                if level(peer, now) < 1:
                    del self._inbox[peer]
                    self._drop(peer, q)
                    continue
                frames, extra, extra_bytes = q.popleft()
                if not q:
                    del self._inbox[peer]
                got = self._handle_safe(frames, extra, extra_bytes, peer)
                if got is not None:
                    out.append(got)
        return out

    def _drop(self, peer: str, q: deque) -> None:
        """Drop the messages queued for ``peer`` unread: it went over its budget after they were read."""
        released = sum(extra_bytes for _, _, extra_bytes in q)
        if released:
            control.release_memory(released)
        self.refuse(FloodError(f"{len(q)} message(s) dropped unread: this peer sends more than {self.peer_rate:g} "
                               f"hellos, goodbyes, refused or repeated frames per second"), self._sender(q[0][0]),
                    peer, len(q))

    def _peer_of(self, rid: bytes, frame: zmq.Frame) -> str:
        """:meth:`_peer` for the read loop, from one part's metadata: the CURVE key (asked for only when CURVE is
        on: without it the lookup raises, which costs more than the rest of the loop) or the address."""
        if self._curve:
            try:
                user = frame.get("User-Id")
            except zmq.ZMQError:
                user = None
            if user and user != "anonymous":
                return f"key {user}"
        try:
            addr = frame.get("Peer-Address")
        except zmq.ZMQError:
            addr = None
        return f"address {addr or rid.hex()}"

    def _read(self, max_messages: int, max_bytes: int = 64 * 1024 * 1024) -> None:
        """Read up to ``max_messages`` (and about ``max_bytes``) waiting messages into the per-peer queues: each
        as [routing id, kind, body] (parts beyond are released unread, counted). A message of a peer over its
        budget (checked once per peer per round) is dropped unread, at the cost of receiving it: about 2 us
        (counted as FloodError, one refusal call per peer per round)."""
        sock, level, now = self.sock, self.budget.level, time.monotonic()
        blocked: dict[str, bool] = {}
        dropped: dict[str, list] = {}
        nbytes = drops = 0
        try:
            for _ in range(max_messages):
                try:
                    rid = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return
                first = sock.recv(copy=False)  # a message's parts are all there once its first one is
                frames: list = [rid, first]
                extra = extra_bytes = 0
                more = first.more
                while more:
                    part = sock.recv(copy=False)
                    more = part.more
                    if len(frames) < 3:
                        frames.append(part)
                    else:
                        extra += 1
                        extra_bytes += len(part)
                peer = self._peer_of(rid, first)
                over = blocked.get(peer)
                if over is None:
                    over = blocked[peer] = level(peer, now) < 1
                if over:
                    d = dropped.get(peer)
                    if d is None:
                        dropped[peer] = [1, frames]
                    else:
                        d[0] += 1
                    if extra_bytes:
                        control.release_memory(extra_bytes)
                    drops += 1
                    if drops >= self.max_drops:
                        break  # serve what was read (another peer's frame among it) before reading on
                    continue
                q = self._inbox.get(peer)
                if q is None:
                    q = self._inbox[peer] = deque()
                q.append((frames, extra, extra_bytes))
                nbytes += len(frames[-1])
                if nbytes > max_bytes:
                    break
            self._hot = True  # the round ended before the socket did: more may be waiting
        finally:
            if dropped:
                self._hot = True  # a flood is on: pause before the next round
            for peer, (count, frames) in dropped.items():
                self.refuse(FloodError(f"{count} message(s) dropped unread: this peer sends more than "
                                       f"{self.peer_rate:g} hellos, goodbyes, refused or repeated frames per "
                                       f"second"), self._sender(frames), peer, count)

    def _handle_safe(self, frames, extra: int, extra_bytes: int, peer: str):
        try:
            return self._handle(frames, extra, extra_bytes, peer)
        except Exception as exc:  # noqa: BLE001 - one message must never stop the server
            first = "InternalError" not in self.refused
            self.refuse(InternalError(f"{type(exc).__name__}: {exc} while handling a message; dropped it "
                                      f"(a bug: please report this line)"), self._sender(frames), peer)
            if first:
                self.log(traceback.format_exc())
            return None

    def _handle(self, frames, extra: int = 0, extra_bytes: int = 0, peer: str | None = None):
        """One message: ``frames`` = [routing id (bytes or a Frame), kind, body]."""
        rid = frames[0] if isinstance(frames[0], bytes) else frames[0].bytes
        peer = peer if peer is not None else self._peer(frames)
        if extra:
            total = sum(len(f) for f in frames) + extra_bytes
            self.refuse(PartsError(f"a message of {len(frames) - 1 + extra} parts ({total / 2 ** 20:.1f} MiB); the "
                                   f"protocol's messages have 2: dropped part by part"), self._sender(frames), peer)
            del frames
            control.release_memory(extra_bytes)
            return None
        if len(frames) != 3 or frames[1].bytes not in (K_HELLO, K_DATA, K_BYE):
            self.refuse(ControlError(f"a {len(frames) - 1}-part message that is not a hello or data message"),
                        self._sender(frames), peer)
            return None
        kind = frames[1].bytes
        if kind == K_HELLO:
            self.budget.charge(peer)
            self._hello(rid, frames, peer)
            return None
        if kind == K_BYE:
            self.budget.charge(peer)
            try:
                stream = control.parse(frames[2].bytes, control.GOODBYE)["stream"]
            except ControlError as exc:
                self.refuse(exc, self._sender(frames), peer)
                return None
            st = self.streams.get(stream)
            if st is None or st.peer != rid:
                self.refuse(ControlError(f"a goodbye for stream {stream}, which this peer does not own"),
                            self._sender(frames), peer)
            else:
                st.bye = True
            return None
        sid = wire.stream_of(frames[2].buffer)
        if sid is not None:  # a frame for a stream this connection does not hold: refused before the checksum
            st = self.streams.get(sid)
            if st is None or st.peer != rid:
                self.refuse(UnknownPeerError(f"data for stream {sid} from a peer that did not open it with a "
                                             f"hello"), self._sender(frames), peer)
                return None
        data = frames[2].bytes
        rx = time.time_ns()
        try:
            header, payload = wire.unpack(data, self.fingerprint, max_payload=self.max_payload,
                                          expected_latent_shape=self.latent_shape,
                                          max_frame_side=self.max_frame_side)
            st = self.streams.get(header.stream_id)
            if st is None or st.peer != rid:
                raise UnknownPeerError(f"data for stream {header.stream_id} from a peer that did not open it with "
                                       f"a hello")
            self._admit(st, header)
        except wire.WireError as exc:
            self.refuse(exc, self._sender(frames), peer)
            return None
        st.last_seen = time.monotonic()
        if header.eos:
            return None
        self.accepted += 1
        self.bytes += len(data)
        st.received += 1
        self.commit.admit(st.stream, header.frame_index, st.session)
        return header, payload, data, rx

    def _admit(self, st: StreamState, h: wire.WireHeader) -> None:
        """Check one frame against its stream's state; raises a RefuseError. A replay frame the server already
        holds (in flight, or finished: then acknowledged again) is a ReplayedError: an edge that restarted or
        reconnected may resend a few; its ack follows when the original is finished."""
        i = h.frame_index
        if not h.eos and h.live != (st.mode == "live"):
            raise ModeError(f"stream {st.stream} was opened as {st.mode} (hello) but frame {i} is flagged "
                            f"{'live' if h.live else 'replay'}")
        if st.mode == "replay":
            if i < st.next:
                if i < st.finished_next or i in st.finished_above:  # already finished: say so again
                    self._send(st.peer, K_ACK, ACK_FORMAT.pack(st.stream, i, st.finished_next))
                raise ReplayedError(f"stream {st.stream} frame {i} again (server expects {st.next})")
            if st.eos is not None:
                raise EndedError(f"stream {st.stream} frame {i} after its end-of-stream at frame {st.eos} "
                                 f"(a new edge session starts a new run)")
            if i > st.next:
                now = time.monotonic()
                if now - st.last_nack > 0.3:
                    st.last_nack = now
                    self._send(st.peer, K_NACK, NACK_FORMAT.pack(st.stream, st.next))
                raise OutOfOrderError(f"stream {st.stream} frame {i} while frame {st.next} is due")
            if h.eos:
                st.eos = i
                st.next = i + 1
                return
            if len(st.pending) >= 2 * self.window:
                raise CreditError(f"stream {st.stream}: {len(st.pending)} frames in flight, window {self.window}")
            st.next = i + 1
        else:
            if st.eos is not None:
                if h.eos and i == st.eos:
                    return  # the same end-of-stream again
                raise EndedError(f"stream {st.stream} frame {i} after its end-of-stream at frame {st.eos} "
                                 f"(a new edge session starts a new run)")
            if h.eos:
                st.eos = i
                return
            if i <= st.last:
                raise ReplayedError(f"stream {st.stream} frame {i} not after {st.last}")
            if len(st.pending) >= 2 * self.live_window:
                raise CreditError(f"stream {st.stream}: {len(st.pending)} frames in flight, window {self.live_window}")
            st.last = i
        st.pending.add(i)

    def _owned(self, st: StreamState, now: float) -> bool:
        """The stream's owner is alive: heard within ``owner_timeout_s`` and its end not yet acknowledged."""
        return not st.eos_acked and not st.bye and now - st.last_seen < self.owner_timeout_s

    def _busy(self, rid: bytes, stream: int, holder: str, sender: str, peer: str) -> None:
        """Refuse a hello for a stream another key owns; the edge retries a little, then stops with the text."""
        free = next(i for i in range(len(self.streams) + 2) if i not in self.streams and i != stream)
        exc = StreamOwnerError(f"stream {stream} belongs to another edge ({holder}) that is still using it; one "
                               f"stream has one owner and another key cannot take it over. Give each edge its "
                               f"own stream id, e.g. --stream-id {free}")
        self.refuse(exc, sender, peer)
        self._send(rid, K_ERROR, BUSY, str(exc).encode())

    def _reclaimable(self, candidates, now: float) -> StreamState | None:
        """The stream slot to give up first: ended or silent for ``reclaim_s``, nothing in flight; the one silent
        longest."""
        best = None
        for s in candidates:
            if s.pending or not (s.eos_acked or s.bye or now - s.last_seen > self.reclaim_s):
                continue
            if best is None or s.last_seen < best.last_seen:
                best = s
        return best

    def _reclaim(self, st: StreamState, now: float) -> None:
        """Free the slot of ``st`` (its run stays in the commit log unless it has no row: then it is forgotten, so
        a flood of hellos leaves nothing behind)."""
        del self.streams[st.stream]
        self.commit.forget(st.stream, st.session)
        self.reclaimed += 1
        self._note(st.peer_id, f"[{self.name}] stream {st.stream} ({st.sender}): slot reclaimed after "
                               f"{now - st.last_seen:.1f} s of silence" if not (st.eos_acked or st.bye) else
                               f"[{self.name}] stream {st.stream} ({st.sender}): slot of the ended stream reused")

    def _slot(self, stream: int, peer: str, sender: str, now: float) -> bool:
        """Room for a new session of ``stream`` from ``peer``: within its stream cap, the server's stream cap
        (silent streams give their slots up) and its session budget; refused with StreamLimitError otherwise.
        Nothing is reclaimed for a hello that is then refused."""
        mine = [s for s in self.streams.values() if s.peer_id == peer and s.stream != stream]
        own_victim = None
        if len(mine) >= self.max_streams_per_peer:
            own_victim = self._reclaimable(mine, now)
            if own_victim is None:
                self.refuse(StreamLimitError(f"hello for stream {stream} refused: this peer holds {len(mine)} "
                                             f"live streams, the most one peer may hold (max_streams_per_peer)"),
                            sender, peer)
                return False
        victim = None
        if own_victim is None and stream not in self.streams and len(self.streams) >= self.max_streams:
            victim = self._reclaimable(self.streams.values(), now)
            if victim is None:
                self.refuse(StreamLimitError(f"too many streams (max {self.max_streams}, each heard within "
                                             f"{self.reclaim_s:g} s): hello for stream {stream} refused"),
                            sender, peer)
                return False
        if not self.sessions_budget.take(peer, 1, now):
            self.refuse(StreamLimitError(f"hello for stream {stream} refused: this peer opens sessions faster than "
                                         f"{self.session_rate:g} per second (after {self.max_streams_per_peer} at "
                                         f"once); it is welcome again in a moment"), sender, peer)
            return False
        for v in (own_victim, victim):
            if v is not None:
                self._reclaim(v, now)
        return True

    def _hello(self, rid: bytes, frames, peer: str | None = None) -> None:
        sender = self._sender(frames)
        peer = peer if peer is not None else self._peer(frames)
        try:
            h = control.parse(frames[2].bytes, control.HELLO)
        except ControlError as exc:
            self.refuse(exc, sender, peer)
            return
        if h["proto"] != PROTO:
            exc = ControlError(f"hello for protocol {h['proto']}; this server speaks protocol {PROTO}: run the "
                               f"same ladon-stream version on edge and server")
            self.refuse(exc, sender, peer)
            self._send(rid, K_ERROR, str(exc).encode())
            return
        stream, session, mode, fp = h["stream"], h["session"], h["mode"], h["fingerprint"].lower()
        if fp != self.fingerprint.hex():
            exc = wire.FingerprintMismatch(f"model fingerprint {fp[:32]} does not match this server's "
                                           f"{self.fingerprint.hex()}: edge and server must load the same checkpoint")
            self.refuse(exc, sender, peer)
            self._send(rid, K_ERROR, str(exc).encode())
            return
        source = h.get("source") if mode == "replay" else None
        key = self._meta(frames)[2]
        edge_session = session
        owner = f"key {key}" if key else f"session {session}"
        st = self.streams.get(stream)
        now = time.monotonic()
        if (stream, session) in self._ended and (st is None or st.session != session):
            # an edge whose run ended (and whose stream may have a newer run): it takes nothing over
            self.refuse(EndedError(f"hello for stream {stream} from session {session}, whose run has ended; a new "
                                   f"edge session starts a new run"), sender, peer)
            return
        if st is not None and (st.session != session or st.owner != owner):
            if st.owner != owner and self._owned(st, now):
                self._busy(rid, stream, f"{_owner_label(st.owner)}, {st.sender}, {st.mode}, heard "
                                        f"{now - st.last_seen:.1f} s ago", sender, peer)
                return
            if st.session != session and _may_continue(st.mode == "replay" and st.eos is None, st.owner, st.source,
                                                       owner, mode, source):
                session = st.session  # a restarted edge on the same source: it continues the run held here
                owner = f"key {key}" if key else f"session {session}"
            else:
                if st.owner != owner:
                    why = "ended" if st.eos_acked or st.bye else f"silent for {now - st.last_seen:.1f} s"
                    self._note(peer, f"[{self.name}] stream {stream}: its owner ({_owner_label(st.owner)}) {why}; "
                                     f"{_owner_label(owner)} takes it over")
                st = None  # a new run: the stream ended, or its owner restarted elsewhere or went away
        elif st is None:
            run = self.commit.run_info(stream)
            if run is not None and run["session"] != session and \
                    _may_continue(not run["ended"], run["owner"], run["source"], owner, mode, source):
                session = run["session"]  # the run recorded before a server restart, left by an earlier edge
                owner = f"key {key}" if key else f"session {session}"
            recorded = self.commit.owner_of(stream)
            if recorded is not None and recorded != owner and now - self.started < self.owner_timeout_s:
                self._busy(rid, stream, f"{_owner_label(recorded)}, recorded before this server started "
                                        f"{now - self.started:.1f} s ago", sender, peer)
                return
        if st is None:
            if not self._slot(stream, peer, sender, now):
                return
            nxt = self.commit.next_for(stream, session, owner, source)
            st = StreamState(stream, mode, session, rid, sender, owner=owner, next=nxt, last=nxt - 1,
                             finished_next=nxt, source=source, peer_id=peer)
            self.streams[stream] = st
            how = (f", continuing run {session} of an earlier edge session at frame {nxt}" if session != edge_session
                   else f", resuming at frame {nxt}" if nxt else "")
            self._note(peer, f"[{self.name}] stream {stream} ({mode}) opened by {sender}, session {edge_session}"
                             + how)
        elif st.mode != mode:
            self.refuse(ModeError(f"hello for stream {stream} as {mode}, but session {session} opened it as "
                                  f"{st.mode}"), sender, peer)
            return
        elif st.peer != rid:  # same run, new connection: the edge reconnected, or restarted on the same source
            st.peer, st.sender, st.owner, st.peer_id = rid, sender, owner, peer
            if session != edge_session:
                self._note(peer, f"[{self.name}] stream {stream}: a restarted edge ({sender}, session "
                                 f"{edge_session}) continues run {session} at frame {st.finished_next}")
            else:
                self._note(peer, f"[{self.name}] stream {stream} reconnected from {sender}")
        if not st.connected:
            st.connected = True
            self._note(peer, f"[{self.name}] stream {stream} back ({sender})")
        st.last_seen = now
        self._send(rid, K_WELCOME, json.dumps({"instance": self.instance, "stream": stream,
                                               "next": st.finished_next if st.mode == "replay" else 0,
                                               "window": self.window if st.mode == "replay" else self.live_window,
                                               "session": st.session}).encode())

    # ------------------------------------------------------------------ finish
    def flush_acks(self) -> int:
        n = 0
        q = self.commit.queue
        while True:
            try:
                item = q.get_nowait()
            except Exception:  # noqa: BLE001 - queue.Empty
                break
            n += 1
            stream, idx = item[0], item[1]
            run = item[2] if len(item) > 2 else None
            st = self.streams.get(stream)
            if st is None or (run is not None and run != st.session):
                continue  # a frame of an earlier run (its edge is gone): nothing to acknowledge
            st.pending.discard(idx)
            if st.mode == "replay":
                if idx >= st.finished_next:
                    st.finished_above.add(idx)
                while st.finished_next in st.finished_above:
                    st.finished_above.discard(st.finished_next)
                    st.finished_next += 1
            self._send(st.peer, K_ACK, ACK_FORMAT.pack(stream, idx, st.finished_next if st.mode == "replay" else 0))
        for st in self.streams.values():  # a stream whose frames are all finished: acknowledge its end
            if st.eos is not None and not st.eos_acked and not st.pending and \
                    (st.mode == "live" or st.finished_next >= st.eos):
                st.eos_acked = True
                st.finished_next = max(st.finished_next, st.eos + 1)
                self.commit.end(st.stream, st.session)
                self._ended[(st.stream, st.session)] = None
                if len(self._ended) > 4096:
                    self._ended.popitem(last=False)
                self._send(st.peer, K_ACK, ACK_FORMAT.pack(st.stream, st.eos, st.eos + 1))
                self._note(st.peer_id, f"[{self.name}] stream {st.stream} ended after {st.eos} frames "
                                       f"({st.received} received by this server instance)")
        return n

    def all_done(self) -> bool:
        """Every stream has sent end-of-stream and everything it sent is finished (its eos then acknowledged)."""
        if not self.streams:
            return False
        for st in self.streams.values():
            if st.eos is None or st.pending:
                return False
            if not st.eos_acked:
                return False
        return True

    def all_gone(self) -> bool:
        return all(st.bye for st in self.streams.values())

    def ack_eos(self) -> None:
        for st in self.streams.values():
            if st.eos is not None:
                self._send(st.peer, K_ACK, ACK_FORMAT.pack(st.stream, st.eos, st.eos + 1))

    def housekeeping(self) -> None:
        control.trim_pending()
        now = time.monotonic()
        for st in self.streams.values():
            if st.connected and now - st.last_seen > 3.0 and st.eos is None:
                st.connected = False
                self._note(st.peer_id, f"[{self.name}] stream {st.stream} ({st.sender}) silent for "
                                       f"{now - st.last_seen:.1f} s")

    def status(self) -> str:
        if not self.streams:
            return "no edge connected"
        return "; ".join(f"stream {s.stream} {s.mode} {'up' if s.connected else 'silent'} {s.sender} "
                         f"rx {s.received} pending {len(s.pending)}" for s in self.streams.values())

    def close(self) -> None:
        self.sock.close(500)
