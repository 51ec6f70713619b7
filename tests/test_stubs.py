"""The checked-in gRPC stubs are exactly what server.api.codegen makes of the .proto, and the .proto
keeps every service, method, message, field and enum value that CONTRACT.md promises."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from server.api import codegen
from server.api import elasticmoe_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT.parent / "shared" / "CONTRACT.md"     # CI checks out ../shared beside the clone


def test_stubs_are_what_codegen_makes(tmp_path):
    codegen.generate(tmp_path)
    for name in codegen.FILES:
        fresh, checked_in = (tmp_path / name).read_text(), (codegen.OUT / name).read_text()
        assert fresh == checked_in, f"server/api/{name} is stale: run `make proto`"


def test_stubs_are_built_from_the_proto_in_the_tree():
    assert pb.DESCRIPTOR.name == codegen.PROTO
    assert (ROOT / "proto" / codegen.PROTO).is_file()


# -- the contract --------------------------------------------------------------------------------

def contract_proto() -> str:
    if not CONTRACT.is_file():
        pytest.skip(f"no {CONTRACT} (CI checks out ../shared beside the clone)")
    blocks = re.findall(r"```proto\n(.*?)```", CONTRACT.read_text(), flags=re.S)
    if not blocks:
        pytest.skip(f"{CONTRACT} has no ```proto block")
    return "\n".join(blocks)


def compile_proto(tmp_path: Path, body: str) -> descriptor_pb2.FileDescriptorProto:
    from grpc_tools import protoc

    src = tmp_path / "contract.proto"
    src.write_text(f'syntax = "proto3";\npackage {pb.DESCRIPTOR.package};\n{body}')
    out = tmp_path / "contract.desc"
    assert protoc.main(["protoc", f"-I{tmp_path}", f"--descriptor_set_out={out}", str(src)]) == 0, \
        "the proto block of CONTRACT.md does not compile"
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    assert len(files) == 1
    return files[0]


def shape(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    """Everything a client depends on, keyed by name, comparable across two compilations."""
    out: dict[str, object] = {}
    for s in fd.service:
        for m in s.method:
            out[f"service {s.name}.{m.name}"] = (m.input_type, m.output_type, m.client_streaming,
                                                 m.server_streaming)
    for msg in fd.message_type:
        out[f"message {msg.name}"] = True
        for f in msg.field:
            out[f"field {msg.name}.{f.name}"] = (f.number, f.type, f.label, f.type_name, f.proto3_optional)
    for e in fd.enum_type:
        for v in e.value:
            out[f"enum {e.name}.{v.name}"] = v.number
    return out


def test_proto_keeps_everything_the_contract_names(tmp_path):
    promised = shape(compile_proto(tmp_path, contract_proto()))
    served = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(served)
    have = shape(served)
    assert "service Inference.Generate" in promised and "field SamplingParams.seed" in promised
    missing = sorted(k for k in promised if k not in have)
    changed = sorted(k for k in promised if k in have and have[k] != promised[k])
    assert not missing, f"renamed or removed (CONTRACT.md needs a migration note): {missing}"
    assert not changed, {k: (promised[k], have[k]) for k in changed}


def test_proto_has_the_grpc_additions_the_contract_plans():
    """CONTRACT.md's "Additions planned" gRPC bullet names `Message.field` and `Service.Method`s:
    each is served, and WatchOperations streams."""
    if not CONTRACT.is_file():
        pytest.skip(f"no {CONTRACT} (CI checks out ../shared beside the clone)")
    text = CONTRACT.read_text()
    section = text[text.find("## Additions planned"):]
    bullet = re.search(r"^- gRPC:(.*?)(?=^- |\Z)", section, flags=re.S | re.M)
    if bullet is None:
        pytest.skip(f"{CONTRACT} plans no gRPC additions")
    names = re.findall(r"`(\w+)\.(\w+)`", bullet.group(1))
    assert names, bullet.group(1)
    missing = []
    for owner, member in names:
        if owner in pb.DESCRIPTOR.services_by_name:
            if member not in pb.DESCRIPTOR.services_by_name[owner].methods_by_name:
                missing.append(f"rpc {owner}.{member}")
        elif owner not in pb.DESCRIPTOR.message_types_by_name:
            missing.append(f"message {owner}")
        elif member not in pb.DESCRIPTOR.message_types_by_name[owner].fields_by_name:
            missing.append(f"field {owner}.{member}")
    assert not missing, f"planned in CONTRACT.md, not in the proto: {missing}"
    watch = pb.DESCRIPTOR.services_by_name["Admin"].methods_by_name["WatchOperations"]
    assert watch.server_streaming and not watch.client_streaming
    assert "removable_workers" in pb.DESCRIPTOR.message_types_by_name["Topology"].fields_by_name
