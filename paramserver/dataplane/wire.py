"""Wire code: the data plane's ``Chunk`` framing, written and read by hand, and the update-record codec.

The payload is copied once on the server (into the message bytes gRPC must send) and
once on the client (into the caller's buffer); protobuf never touches it. The bytes on
the wire are an ordinary ``distzo.v1.Chunk`` (field 1 = header, field 2 = data), so any
gRPC client can read them with the .proto.
"""

from __future__ import annotations

import xxhash

from distzo.zo.record import Direction, UpdateRecord
from protos import common_pb2
from protos import paramserver_pb2 as pb

MASTER_DTYPE = "float32_master"  # FetchRequest.dtype asking for the fp32 master (replicas)
STATE_DTYPE = "float32_optimizer_state"  # FetchRequest.dtype asking for the optimizer state (replicas; width x 4 bytes per element)
_HEADER_TAG = 0x0A  # field 1, length-delimited
_DATA_TAG = 0x12  # field 2, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    shift = 0
    value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint in chunk")


def checksum(data: memoryview | bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def encode_chunk(header: pb.ChunkHeader, payload: memoryview) -> bytes:
    h = header.SerializeToString()
    return b"".join((bytes((_HEADER_TAG,)), _varint(len(h)), h, bytes((_DATA_TAG,)), _varint(len(payload)), payload))


def decode_chunk(message: bytes) -> tuple[pb.ChunkHeader, memoryview]:
    """Split a Chunk into its parsed header and a zero-copy view of its data."""
    buf = memoryview(message)
    try:
        if buf[0] != _HEADER_TAG:
            raise ValueError
        hlen, pos = _read_varint(buf, 1)
        header = pb.ChunkHeader.FromString(buf[pos : pos + hlen])
        pos += hlen
        if pos == len(buf):  # proto3 drops an empty bytes field
            return header, buf[pos:pos]
        if buf[pos] != _DATA_TAG:
            raise ValueError
        dlen, pos = _read_varint(buf, pos + 1)
        if pos + dlen != len(buf):
            raise ValueError
        return header, buf[pos : pos + dlen]
    except (ValueError, IndexError):
        # another encoder's field order: parse it the ordinary (copying) way
        chunk = pb.Chunk.FromString(message)
        return chunk.header, memoryview(chunk.data)


def identity(b: bytes) -> bytes:
    return b


# ----------------------------------------------------------------------------- update records
def record_to_pb(r: UpdateRecord) -> common_pb2.UpdateRecord:
    """The record as its protobuf message (the journal's payload, UpdateRequest, FollowJournal)."""
    return common_pb2.UpdateRecord(
        step=r.step,
        directions=[common_pb2.Direction(seed=d.seed, g=d.g) for d in r.directions],
        lr=r.lr,
        weight_decay=r.weight_decay,
        skipped=r.skipped,
    )


def record_from_pb(m: common_pb2.UpdateRecord) -> UpdateRecord:
    """The record of a protobuf message (not validated: see ``UpdateRecord.validate``)."""
    return UpdateRecord(
        step=m.step,
        directions=tuple(Direction(seed=d.seed, g=d.g) for d in m.directions),
        lr=m.lr,
        weight_decay=m.weight_decay,
        skipped=m.skipped,
    )
