"""The edge <-> server link protocol, its constants and errors: DEALER (edge) <-> ROUTER (server), credits, acks, heartbeats.

Every ZeroMQ message is multipart: a one-byte kind, then its body.

edge -> server
    ``H`` json  hello / heartbeat (every ``heartbeat_s``): ``{"proto", "stream", "session", "mode", "fingerprint"}``
                and, from a replay edge that can name its input, ``"source"`` (a digest of the input's identity)
    ``D`` wire  one :mod:`transport.wire` message (a frame, or the end-of-stream message)
    ``B`` json  goodbye: the edge got its end-of-stream acknowledged (``{"stream"}``); a server with
                ``exit_on_eos`` waits for it (up to a grace period) so its last acks are not lost on exit
server -> edge
    ``W`` json  welcome (answer to every hello): ``{"instance", "stream", "next", "window", "session"}``;
                ``session`` is the run the edge delivers to: its own session, or (replay) the run an earlier
                edge session on the same source left unfinished, which the edge then continues under that id
    ``A`` <IqQ  ack: stream, frame index finished (-1: none), contiguous high-water mark + 1 ("next")
    ``N`` <IQ   the server expects ``next`` (a frame was lost on the way): resend from there
    ``E`` text  the server refuses this edge (wrong model, ...): the edge stops with that message
    ``E`` ``busy`` text  the stream belongs to another edge that is still sending: the edge retries for
                ``busy_wait_s`` (its own earlier session may just have died), then stops with that message

Every JSON message passes one schema check (:mod:`transport.control`: size, nesting depth, exact types and
ranges, finite numbers) before any field is used; what fails is refused and counted like a bad frame.

**Ownership.** A stream belongs to the CURVE key (without keys: the edge session) that opened it. While its
owner is alive (heard within ``owner_timeout_s``, its end-of-stream not yet acknowledged), a hello for that
stream from another key is refused (``StreamOwnerError``, naming the conflict and ``--stream-id``); the owner's
own key may reopen it at once (a restarted edge). After a server restart, the owner recorded in the state file
gets ``owner_timeout_s`` to come back first.

**Credits.** The server's welcome grants ``window`` frames in flight per stream; the edge sends only while
fewer than ``window`` of its frames are unacknowledged, so the server never holds more than ``window`` frames
of one stream (fair queuing across edges comes from ROUTER plus the per-stream window).

**Replay** (lossless, exactly once, in order): the server accepts frame ``next`` only, acknowledges a frame
once it is finished (its :class:`transport.runs.RunLedger` says so: in a pipeline, once every committing stage
wrote it), and a restarted server knows from a durable ledger (the JSONL sink's) what it already finished
(``next``). The edge keeps every unacknowledged frame; when it meets a new server instance (a
restart: the welcome's ``instance`` changed) it drops what the server says is done and resends the rest.
Across edge restarts too: a new edge session replaying the same source (``source``) on the same stream, with
the run's key (without keys: once the old session is silent), continues the unfinished run: the welcome names
the run and its ``next``, and the edge skips every frame below it. A run that ended, another source or another
key starts a new run (rows from frame 0, a new ``session`` in each row).

**Limits and fair queuing**: per peer (CURVE key, else address) a cap on streams held and on new sessions per
second; slots of streams silent for a few seconds are reclaimed when a new stream needs one; messages are
served in turns across peers and a peer over its budget of costly messages has the rest dropped unread
(:class:`ServerSession`).

**Live** (bounded latency): the edge keeps a short queue of the newest frames (``drop-oldest`` or
``drop-newest``), counts what it drops, and never resends; the server accepts increasing indices only.
"""
from __future__ import annotations

import struct

import zmq

PROTO = 1
K_HELLO, K_DATA, K_WELCOME, K_ACK, K_NACK, K_ERROR, K_BYE = b"H", b"D", b"W", b"A", b"N", b"E", b"B"
BUSY = b"busy"  # the middle part of an ``E`` that the edge may retry (the stream's owner is still alive)
MAX_ERROR_TEXT = 4096
ACK_FORMAT = struct.Struct("<IqQ")
NACK_FORMAT = struct.Struct("<IQ")
POLICIES = ("drop-oldest", "drop-newest")
MODES = ("replay", "live")


class LinkTimeout(RuntimeError):
    """No server answered (or took a frame) within the link timeout."""


class Refused(RuntimeError):
    """The server refused this edge (its ``E`` message)."""


def tune(sock: zmq.Socket, heartbeat: bool = True) -> None:
    """Reconnection with exponential back-off (100 ms doubling up to 2 s) and, on connecting sockets, ZMTP
    heartbeats (a dead link is noticed within 3 s; the other side answers the pings whatever its settings).

    The server's ROUTER gets ``heartbeat=False``: in libzmq 4.3.5 a connection whose input is stopped (its
    receive pipe full: a peer sending faster than the server reads) and whose peer then hangs up is marked
    with an I/O error, and the next heartbeat-interval timer writes to it anyway and aborts the process
    (``Assertion failed: !_io_error (src/stream_engine_base.cpp:310)``, the same family as libzmq #3937): any
    peer could take the server down. The server notices silent edges by their hellos instead."""
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    if heartbeat:
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        sock.setsockopt(zmq.HEARTBEAT_TTL, 3000)
