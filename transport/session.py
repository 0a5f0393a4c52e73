"""The edge <-> server link in one import: the protocol (:mod:`transport.protocol`: message kinds, credits, acks,
replay, ownership, live), the edge's end (:mod:`transport.edge_session`) and the server's end
(:mod:`transport.server_session`). Each end lives in its own module; this one names what callers use."""
from __future__ import annotations

from transport.edge_session import EdgeClient
from transport.protocol import (BUSY, K_ACK, K_BYE, K_DATA, K_ERROR, K_HELLO, K_NACK, K_WELCOME, MODES, POLICIES,
                                PROTO, LinkTimeout, Refused)
from transport.server_session import (CreditError, EndedError, FloodError, InternalError, ModeError, OutOfOrderError,
                                      PartsError, RefuseError, ReplayedError, ServerSession, StreamLimitError,
                                      StreamOwnerError, StreamState, UnknownPeerError)

__all__ = ["BUSY", "K_ACK", "K_BYE", "K_DATA", "K_ERROR", "K_HELLO", "K_NACK", "K_WELCOME", "MODES", "POLICIES",
           "PROTO", "LinkTimeout", "Refused", "EdgeClient", "ServerSession", "StreamState", "RefuseError",
           "ReplayedError", "OutOfOrderError", "UnknownPeerError", "CreditError", "EndedError", "ModeError",
           "StreamOwnerError", "StreamLimitError", "FloodError", "PartsError", "InternalError"]
