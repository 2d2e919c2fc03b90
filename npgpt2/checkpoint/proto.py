"""The two protobuf messages of a TensorBundle index, decoded and encoded by hand.

Wire format: each field is a varint key (field_number << 3 | wire_type) followed by a varint (type 0),
8 bytes (type 1), a varint length and that many bytes (type 2), or 4 bytes (type 5). proto3 omits
fields equal to their default (0, empty), so every field defaults when absent.

    BundleHeaderProto: 1 num_shards int32, 2 endianness enum (0 LITTLE, 1 BIG),
                       3 version VersionDef {1 producer int32, 2 min_consumer int32, 3 bad_consumers repeated int32}
    BundleEntryProto:  1 dtype enum, 2 shape TensorShapeProto {2 dim repeated {1 size int64, 2 name string},
                       3 unknown_rank bool}, 3 shard_id int32, 4 offset int64, 5 size int64,
                       6 crc32c fixed32 (masked), 7 slices repeated TensorSliceProto
"""
import dataclasses
import struct


class ProtoError(ValueError):
    """Malformed protobuf bytes; callers turn it into an Npgpt2Error naming the file."""


def read_varint(buf, pos, limit=None):
    """Decode a base-128 varint at buf[pos]; return (value, new_pos). At most 10 bytes (64 bits)."""
    limit = len(buf) if limit is None else limit
    value = 0
    shift = 0
    while True:
        if pos >= limit:
            raise ProtoError("varint runs past the end of its buffer")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
        if shift >= 70:
            raise ProtoError("varint longer than 10 bytes")


def write_varint(value):
    """Encode a non-negative int < 2**64 (negative ints as their 64-bit two's complement)."""
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _signed64(v):
    return v - (1 << 64) if v >= 1 << 63 else v


def iter_fields(buf):
    """Yield (field_number, wire_type, value): int for types 0/1/5, bytes for type 2."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ProtoError("field number 0")
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 1:
            if pos + 8 > n:
                raise ProtoError("fixed64 runs past the end")
            value = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            if pos + length > n:
                raise ProtoError("length-delimited field runs past the end")
            value = bytes(buf[pos:pos + length])
            pos += length
        elif wire == 5:
            if pos + 4 > n:
                raise ProtoError("fixed32 runs past the end")
            value = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise ProtoError(f"unsupported wire type {wire}")
        yield field, wire, value


def _expect(field, wire, want):
    if wire != want:
        raise ProtoError(f"field {field} has wire type {wire}, expected {want}")


@dataclasses.dataclass
class BundleHeader:
    num_shards: int = 0
    endianness: int = 0  # 0 LITTLE, 1 BIG
    producer: int = 0
    min_consumer: int = 0
    bad_consumers: tuple = ()


@dataclasses.dataclass
class BundleEntry:
    dtype: int = 0
    shape: tuple = ()
    unknown_rank: bool = False
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0  # masked, as stored
    num_slices: int = 0


def _parse_version(buf, header):
    bad = []
    for field, wire, value in iter_fields(buf):
        if field == 1:
            _expect(field, wire, 0)
            header.producer = _signed64(value)
        elif field == 2:
            _expect(field, wire, 0)
            header.min_consumer = _signed64(value)
        elif field == 3:
            if wire == 2:  # packed repeated
                pos = 0
                while pos < len(value):
                    v, pos = read_varint(value, pos)
                    bad.append(_signed64(v))
            else:
                _expect(field, wire, 0)
                bad.append(_signed64(value))
    header.bad_consumers = tuple(bad)


def parse_header(buf):
    """BundleHeaderProto bytes -> BundleHeader."""
    header = BundleHeader()
    for field, wire, value in iter_fields(buf):
        if field == 1:
            _expect(field, wire, 0)
            header.num_shards = _signed64(value)
        elif field == 2:
            _expect(field, wire, 0)
            header.endianness = value
        elif field == 3:
            _expect(field, wire, 2)
            _parse_version(value, header)
    return header


def _parse_shape(buf, entry):
    dims = []
    for field, wire, value in iter_fields(buf):
        if field == 2:
            _expect(field, wire, 2)
            size = 0
            for f, w, v in iter_fields(value):
                if f == 1:
                    _expect(f, w, 0)
                    size = _signed64(v)
            dims.append(size)
        elif field == 3:
            _expect(field, wire, 0)
            entry.unknown_rank = bool(value)
    entry.shape = tuple(dims)


def parse_entry(buf):
    """BundleEntryProto bytes -> BundleEntry (slices are only counted)."""
    entry = BundleEntry()
    for field, wire, value in iter_fields(buf):
        if field == 1:
            _expect(field, wire, 0)
            entry.dtype = value
        elif field == 2:
            _expect(field, wire, 2)
            _parse_shape(value, entry)
        elif field == 3:
            _expect(field, wire, 0)
            entry.shard_id = _signed64(value)
        elif field == 4:
            _expect(field, wire, 0)
            entry.offset = _signed64(value)
        elif field == 5:
            _expect(field, wire, 0)
            entry.size = _signed64(value)
        elif field == 6:
            _expect(field, wire, 5)
            entry.crc32c = value
        elif field == 7:
            _expect(field, wire, 2)
            entry.num_slices += 1
    return entry


def _varint_field(field, value):
    """A varint field, omitted when zero (proto3)."""
    return write_varint(field << 3) + write_varint(value) if value else b""


def _bytes_field(field, payload):
    """A length-delimited field; sub-messages are written even when empty (they have presence)."""
    return write_varint(field << 3 | 2) + write_varint(len(payload)) + payload


def encode_header(num_shards=1, endianness=0, producer=1, min_consumer=0):
    """BundleHeaderProto as TensorFlow's BundleWriter writes it (version always present)."""
    version = _varint_field(1, producer) + _varint_field(2, min_consumer)
    return (_varint_field(1, num_shards) + _varint_field(2, endianness)
            + _bytes_field(3, version))


def encode_entry(dtype, shape, offset, size, crc32c_masked, shard_id=0):
    """BundleEntryProto as BundleWriter::Add writes it: the shape message is always present."""
    shape_msg = b"".join(_bytes_field(2, _varint_field(1, d)) for d in shape)
    out = _varint_field(1, dtype) + _bytes_field(2, shape_msg)
    out += _varint_field(3, shard_id) + _varint_field(4, offset) + _varint_field(5, size)
    if crc32c_masked:
        out += write_varint(6 << 3 | 5) + struct.pack("<I", crc32c_masked)
    return out
