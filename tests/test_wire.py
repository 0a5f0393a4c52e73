"""Wire format: round trip and every malformed case raising its own WireError subclass, before any decode."""
import struct
import zlib

import pytest

from transport import wire

FP = bytes(range(16))


def _msg(payload=b"\x01\x02\x03" * 10, **kw):
    h = dict(stream_id=7, frame_index=123456789012, capture_ns=1_700_000_000_123_456_789, sent_ns=1_700_000_000_2,
             fingerprint=FP, latent_shape=(24, 16, 16), orig_size=(640, 480), edge_us=1234, flags=0)
    h.update(kw)
    return wire.pack(wire.WireHeader(**h), payload)


def _recrc(b: bytearray) -> bytes:
    body = wire._BODY.size
    struct.pack_into("<I", b, body, zlib.crc32(bytes(b[wire.HEADER_SIZE:]), zlib.crc32(bytes(b[:body]))))
    return bytes(b)


def test_round_trip_and_size():
    payload = bytes(range(256)) * 3
    m = _msg(payload)
    assert len(m) == wire.HEADER_SIZE + len(payload) == 74 + len(payload)
    h, p = wire.unpack(m, FP)
    assert bytes(p) == payload
    assert (h.stream_id, h.frame_index, h.capture_ns, h.latent_shape, h.orig_size, h.edge_us) == \
        (7, 123456789012, 1_700_000_000_123_456_789, (24, 16, 16), (640, 480), 1234)
    assert h.fingerprint == FP and not h.eos and not h.live
    assert wire.unpack(_msg(flags=wire.FLAG_LIVE))[0].live


def test_end_of_stream_message():
    h, p = wire.unpack(wire.end_of_stream(3, 42, FP))
    assert h.eos and h.stream_id == 3 and h.frame_index == 42 and len(p) == 0


@pytest.mark.parametrize("mutate, err, text", [
    (lambda m: m[:10], wire.TruncatedError, "shorter than"),
    (lambda m: m[:-1], wire.LengthMismatchError, "payload_len"),
    (lambda m: m + b"x", wire.LengthMismatchError, "trailing"),
    (lambda m: b"JUNK" + m[4:], wire.BadMagicError, "magic"),
    (lambda m: b"JUNK", wire.BadMagicError, "magic"),
    (lambda m: m[:4] + bytes([9]) + m[5:], wire.VersionError, "version 9"),
    (lambda m: m[:5] + bytes([0x80]) + m[6:], wire.FlagsError, "flag"),
    (lambda m: m[:6] + struct.pack("<H", 10) + m[8:], wire.HeaderLengthError, "header_len"),
    (lambda m: m[:-3] + bytes([m[-3] ^ 0xFF]) + m[-2:], wire.ChecksumError, "CRC32"),
    (lambda m: m[:40] + bytes([m[40] ^ 1]) + m[41:], wire.ChecksumError, "CRC32"),
])
def test_malformed(mutate, err, text):
    with pytest.raises(err, match=text):
        wire.unpack(mutate(_msg()))


def test_shape_limits_checked_before_checksum():
    b = bytearray(_msg())
    struct.pack_into("<3H", b, 52, 5000, 16, 16)  # 5000 channels
    with pytest.raises(wire.ShapeError, match="latent shape"):
        wire.unpack(_recrc(b))
    b = bytearray(_msg())
    struct.pack_into("<2H", b, 58, 0, 480)
    with pytest.raises(wire.ShapeError, match="original frame size"):
        wire.unpack(_recrc(b))


def test_huge_declared_payload_refused():
    b = bytearray(_msg())
    struct.pack_into("<I", b, 66, wire.MAX_PAYLOAD + 1)
    with pytest.raises(wire.LengthMismatchError, match="limit"):
        wire.unpack(bytes(b))


def test_fingerprint_mismatch():
    with pytest.raises(wire.FingerprintMismatch, match="fingerprint"):
        wire.unpack(_msg(), expected_fingerprint=b"\xff" * 16)


def test_all_errors_are_wire_errors():
    for cls in (wire.TruncatedError, wire.BadMagicError, wire.VersionError, wire.HeaderLengthError,
                wire.LengthMismatchError, wire.ShapeError, wire.ChecksumError, wire.FingerprintMismatch):
        assert issubclass(cls, wire.WireError)


def test_receiver_limits_latent_shape_and_payload():
    m = _msg(b"x" * 100)
    wire.unpack(m, FP, expected_latent_shape=(24, 16, 16), max_payload=100)
    with pytest.raises(wire.ShapeError, match="not this model's"):
        wire.unpack(m, FP, expected_latent_shape=(24, 8, 8))
    with pytest.raises(wire.LengthMismatchError, match="limit 99"):
        wire.unpack(m, FP, max_payload=99)
