"""The wire format: one self-describing, length-checked binary message per encoded frame.

Layout (little endian, ``struct`` format :data:`HEADER_FORMAT`, :data:`HEADER_SIZE` = 74 bytes), then the payload::

    offset size field
         0    4 magic            b"LADN"
         4    1 version          1
         5    1 flags            bit 0 END_OF_STREAM, bit 1 LIVE (frame may be dropped under load)
         6    2 header_len       bytes before the payload; >= 74 (later versions may append fields)
         8    4 stream_id        u32
        12    8 frame_index      u64, per stream, from 0
        20    8 capture_ns       i64, wall clock (time.time_ns) when the source captured the frame
        28    8 sent_ns          i64, wall clock when the edge handed the message to ZeroMQ
        36   16 fingerprint      model fingerprint (codec.fingerprint): the entropy model's CDF tables
        52    6 latent C, H, W   u16 x 3
        58    4 orig W, H        u16 x 2: the frame size before letterboxing (server maps results back)
        62    4 edge_us          u32: letterbox + encode + entropy-code time on the edge, microseconds
        66    4 payload_len      u32
        70    4 crc32            zlib.crc32 over header bytes [0, 70) + extension bytes + payload

:func:`unpack` checks, in this order and before anything is allocated or decoded: total length, magic,
version, header length, payload length against the bytes received, latent-shape and frame-size limits (the
receiver's own ``max_frame_side`` too), and the checksum (then, when given, the receiver's fingerprint).
Session-level checks (replayed or out-of-order frame indices, unknown peers, credit overruns) live in
:mod:`transport.session`. Each failure raises its own :class:`WireError` subclass whose message names what is
wrong.
The data size a benchmark reports is ``len(message)``: header included.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"LADN"
VERSION = 1
HEADER_FORMAT = "<4sBBHIQqq16s3H2HII"  # everything up to and including payload_len; crc32 follows
_BODY = struct.Struct(HEADER_FORMAT)
_CRC = struct.Struct("<I")
HEADER_SIZE = _BODY.size + _CRC.size  # 74
FINGERPRINT_SIZE = 16

FLAG_EOS = 0x01
FLAG_LIVE = 0x02
KNOWN_FLAGS = FLAG_EOS | FLAG_LIVE

MAX_PAYLOAD = 64 * 1024 * 1024  # 64 MiB: far above any frame this codec emits
MAX_CHANNELS = 1024
MAX_SIDE = 8192
MAX_LATENT_ELEMENTS = 64 * 1024 * 1024


class WireError(ValueError):
    """A message that is not a valid wire message. Subclasses say which check failed."""


class TruncatedError(WireError):
    """Fewer bytes than the fixed header (or than the header length says)."""


class BadMagicError(WireError):
    """The message does not start with b'LADN': not ours, or misaligned."""


class VersionError(WireError):
    """A wire version this build does not read."""


class HeaderLengthError(WireError):
    """header_len smaller than the fixed header or beyond the message."""


class LengthMismatchError(WireError):
    """payload_len disagrees with the bytes received, or exceeds MAX_PAYLOAD."""


class ShapeError(WireError):
    """Latent shape or original frame size outside the limits."""


class FrameSizeError(ShapeError):
    """An original frame size beyond the receiver's own limit (``max_frame_side``): refused before the frame
    costs memory or time downstream (the video sink and the result mapping work at that size)."""


class ChecksumError(WireError):
    """CRC32 mismatch: the bytes were corrupted in transit."""


class FlagsError(WireError):
    """Unknown flag bits set."""


class FingerprintMismatch(WireError):
    """The message came from a model whose entropy tables this server does not hold."""


@dataclass(frozen=True)
class WireHeader:
    stream_id: int
    frame_index: int
    capture_ns: int
    sent_ns: int
    fingerprint: bytes
    latent_shape: tuple[int, int, int]
    orig_size: tuple[int, int]  # (width, height)
    edge_us: int = 0
    flags: int = 0
    version: int = VERSION

    @property
    def eos(self) -> bool:
        return bool(self.flags & FLAG_EOS)

    @property
    def live(self) -> bool:
        return bool(self.flags & FLAG_LIVE)


def pack(header: WireHeader, payload: bytes) -> bytes:
    """Header + payload as one bytes object (what goes on the wire)."""
    if len(header.fingerprint) != FINGERPRINT_SIZE:
        raise ValueError(f"fingerprint must be {FINGERPRINT_SIZE} bytes, got {len(header.fingerprint)}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD={MAX_PAYLOAD}")
    c, h, w = header.latent_shape
    ow, oh = header.orig_size
    body = _BODY.pack(MAGIC, VERSION, header.flags & 0xFF, HEADER_SIZE, header.stream_id & 0xFFFFFFFF,
                      header.frame_index, header.capture_ns, header.sent_ns, header.fingerprint,
                      c, h, w, ow, oh, min(int(header.edge_us), 0xFFFFFFFF), len(payload))
    crc = zlib.crc32(payload, zlib.crc32(body))
    return b"".join((body, _CRC.pack(crc), payload))


def end_of_stream(stream_id: int, frame_count: int, fingerprint: bytes, sent_ns: int = 0) -> bytes:
    """Control message: stream ``stream_id`` ended after ``frame_count`` frames (frame_index = count)."""
    return pack(WireHeader(stream_id, frame_count, 0, sent_ns, fingerprint, (0, 0, 0), (0, 0), flags=FLAG_EOS), b"")


_STREAM = struct.Struct("<I")
_STREAM_AT = 8


def stream_of(message: bytes | bytearray | memoryview) -> int | None:
    """The stream id a message declares, read without checking anything else (None when it does not even start
    like a wire message): lets a receiver refuse a frame for a stream its sender does not hold before it pays
    for the checksum. The full checks still follow in :func:`unpack`."""
    buf = memoryview(message)
    if buf.nbytes < HEADER_SIZE or bytes(buf[:4]) != MAGIC:
        return None
    return _STREAM.unpack_from(buf, _STREAM_AT)[0]


def unpack(message: bytes | bytearray | memoryview, expected_fingerprint: bytes | None = None, *,
           max_payload: int = MAX_PAYLOAD, expected_latent_shape: tuple[int, int, int] | None = None,
           max_frame_side: int = MAX_SIDE) -> tuple[WireHeader, memoryview]:
    """Check a message and split it into header and payload (a zero-copy view). Raises a WireError subclass.

    ``max_payload``: a receiver's own (tighter) payload limit; ``expected_latent_shape``: the latent shape its
    model produces (a frame declaring any other is refused before the checksum is computed); ``max_frame_side``:
    the largest original frame width or height it takes (:class:`FrameSizeError` beyond)."""
    buf = memoryview(message).cast("B") if not isinstance(message, memoryview) else message.cast("B")
    n = len(buf)
    if n < HEADER_SIZE:
        if n >= 4 and bytes(buf[:4]) != MAGIC:
            raise BadMagicError(f"bad magic {bytes(buf[:4])!r}, expected {MAGIC!r}: not a ladon wire message")
        raise TruncatedError(f"message of {n} bytes is shorter than the {HEADER_SIZE}-byte header")
    (magic, version, flags, header_len, stream_id, index, capture_ns, sent_ns, fingerprint,
     c, h, w, ow, oh, edge_us, payload_len) = _BODY.unpack_from(buf, 0)
    if magic != MAGIC:
        raise BadMagicError(f"bad magic {magic!r}, expected {MAGIC!r}: not a ladon wire message")
    if version != VERSION:
        raise VersionError(f"wire version {version} is not supported (this build reads version {VERSION}); "
                           f"run the same ladon-stream version on edge and server")
    if flags & ~KNOWN_FLAGS:
        raise FlagsError(f"unknown flag bits 0x{flags & ~KNOWN_FLAGS:02x} in wire flags 0x{flags:02x}")
    if header_len < HEADER_SIZE or header_len > n:
        raise HeaderLengthError(f"header_len {header_len} outside [{HEADER_SIZE}, {n}] (message is {n} bytes)")
    if payload_len > min(MAX_PAYLOAD, max_payload):
        raise LengthMismatchError(f"payload_len {payload_len} exceeds the limit {min(MAX_PAYLOAD, max_payload)}")
    if header_len + payload_len != n:
        raise LengthMismatchError(f"payload_len {payload_len} + header_len {header_len} != {n} bytes received "
                                  f"({'truncated' if header_len + payload_len > n else 'trailing bytes'})")
    if not flags & FLAG_EOS:
        if not (1 <= c <= MAX_CHANNELS and 1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE) or c * h * w > MAX_LATENT_ELEMENTS:
            raise ShapeError(f"latent shape ({c}, {h}, {w}) outside limits: channels 1..{MAX_CHANNELS}, "
                             f"sides 1..{MAX_SIDE}, at most {MAX_LATENT_ELEMENTS} elements")
        if not (1 <= ow <= MAX_SIDE and 1 <= oh <= MAX_SIDE):
            raise ShapeError(f"original frame size {ow}x{oh} outside 1..{MAX_SIDE}")
        if ow > max_frame_side or oh > max_frame_side:
            raise FrameSizeError(f"original frame size {ow}x{oh} exceeds this receiver's limit of "
                                 f"{max_frame_side}x{max_frame_side} (raise server.receive max_frame_side, or "
                                 f"scale the source down)")
        if expected_latent_shape is not None and (c, h, w) != tuple(expected_latent_shape):
            raise ShapeError(f"latent shape ({c}, {h}, {w}) is not this model's {tuple(expected_latent_shape)}")
    (crc,) = _CRC.unpack_from(buf, _BODY.size)
    actual = zlib.crc32(buf[HEADER_SIZE:], zlib.crc32(buf[:_BODY.size]))  # extension bytes + payload
    if actual != crc:
        raise ChecksumError(f"CRC32 mismatch: header says 0x{crc:08x}, bytes give 0x{actual:08x} "
                            f"(stream {stream_id}, frame {index}): corrupted in transit")
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise FingerprintMismatch(f"model fingerprint {fingerprint.hex()} does not match this server's "
                                  f"{expected_fingerprint.hex()}: edge and server must load the same checkpoint")
    header = WireHeader(stream_id, index, capture_ns, sent_ns, bytes(fingerprint), (c, h, w), (ow, oh),
                        edge_us, flags, version)
    return header, buf[header_len:]
