"""Decoding a GenerateRequest so that bad bytes become INVALID_ARGUMENT naming the field.

grpc's generated deserializer raises on a `string` field that is not UTF-8, and grpc answers
INTERNAL "Exception deserializing request!" before any handler runs. The Generate handler is
registered with `decode_generate` instead: the normal parse first (the fast path), and only when
it fails a parse with a twin of the message whose `string` fields are `bytes` (same field numbers,
same wire format; the public proto is unchanged), which tells which field holds the bad bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from server.api import elasticmoe_pb2 as pb

_PACKAGE = pb.DESCRIPTOR.package
_TWIN_PACKAGE = f"{_PACKAGE}.lenient"


@dataclass(frozen=True)
class Undecodable:
    """What the deserializer hands the handler when the bytes are not a valid request."""
    error: str


def _twin_file() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "elasticmoe/v1/lenient_twin.proto"
    fdp.package = _TWIN_PACKAGE
    del fdp.service[:]

    def retype(msg: descriptor_pb2.DescriptorProto) -> None:
        for f in msg.field:
            # map keys cannot be bytes; no map is reachable from a GenerateRequest anyway
            if f.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING and not msg.options.map_entry:
                f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            if f.type_name.startswith(f".{_PACKAGE}."):
                f.type_name = f".{_TWIN_PACKAGE}." + f.type_name[len(_PACKAGE) + 2:]
        for nested in msg.nested_type:
            retype(nested)

    for msg in fdp.message_type:
        retype(msg)
    return fdp


_pool = descriptor_pool.DescriptorPool()
_pool.Add(_twin_file())
_GenerateTwin = message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{_TWIN_PACKAGE}.GenerateRequest"))


def _bad_utf8_field(msg: Message, prefix: str = "") -> str | None:
    """The path of the first bytes field (of the twin) that is not UTF-8, e.g. `sampling.stop[2]`."""
    for field, value in msg.ListFields():
        name = prefix + field.name
        if field.type == field.TYPE_BYTES:
            values = value if field.is_repeated else [value]
            for i, v in enumerate(values):
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError as exc:
                    where = f"{name}[{i}]" if field.is_repeated else name
                    return f"{where}: not valid UTF-8 (byte {exc.start})"
        elif field.type == field.TYPE_MESSAGE and not field.is_repeated:
            found = _bad_utf8_field(value, name + ".")
            if found:
                return found
    return None


def decode_generate(data: bytes) -> pb.GenerateRequest | Undecodable:
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError:
        pass
    twin = _GenerateTwin()
    try:
        twin.ParseFromString(data)
    except DecodeError:
        return Undecodable("request: not a valid GenerateRequest message")
    return Undecodable(_bad_utf8_field(twin) or "request: not a valid GenerateRequest message")
