"""The front door's security: TLS (and mutual TLS), the Admin credential on every Admin RPC, Admin
on its own address, and reflection switched off. Certificates are made here, signed by a CA of the
test's own; every check is a real gRPC call over loopback."""
from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from server.api.front import GrpcFront, admin_address
from server.api.security import bearer
from server.config import ServerConfig
from tests.conftest import generate, running_server

TOKEN = "s3cret-admin-token"


def _cert(subject: str, key, issuer_name, issuer_key, ca: bool, server: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all as PEM files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("elasticmoe test CA", ca_key, None, None, ca=True, server=False)
    files = {"ca": ca}
    for who, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        files[who] = _cert(f"elasticmoe {who}", key, ca.subject, ca_key, ca=False, server=server)
        (root / f"{who}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    out = {}
    for name, cert in files.items():
        (root / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[name] = str(root / f"{name}.pem")
    out["server_key"], out["client_key"] = str(root / "server.key"), str(root / "client.key")
    return out


def tls_channel(port: int, pki: dict[str, str], client_cert: bool = False) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        Path(pki["ca"]).read_bytes(),
        Path(pki["client_key"]).read_bytes() if client_cert else None,
        Path(pki["client"]).read_bytes() if client_cert else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


@pytest.fixture(scope="module")
def server(tiny_models, ray_local, pki):
    with running_server(tiny_models["mixtral"], workers=1, tls_cert=pki["server"], tls_key=pki["server_key"],
                        admin_token=TOKEN) as s:
        s.channel.close()
        s.channel = tls_channel(s.port, pki)
        yield s


def second_front(server, tmp_path: Path, **front) -> GrpcFront:
    """Another front door over the same engine and controller (real servicers), on new ports."""
    cfg = ServerConfig(model=str(server.config.model), port=0, **front)
    door = GrpcFront(cfg, server.front.inference, server.front.admin)
    door.start()
    door.set_serving(True)
    return door


def test_tls_client_is_served(server):
    tokens, _, last = generate(server.channel, [5, 17, 33], max_tokens=4, ignore_eos=True)
    assert len(tokens) == 4 and last.finish_reason == pb.FINISH_REASON_LENGTH


def test_plaintext_client_is_refused(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as plain:
        with pytest.raises(grpc.RpcError) as err:
            generate(plain, [5, 17, 33], max_tokens=4, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=10)


def _call_every_admin_rpc(channel: grpc.Channel, metadata, timeout: float = 10.0) -> dict[str, grpc.StatusCode]:
    """Each Admin RPC of the proto, called with an empty request: the status it ends with. Empty
    requests change nothing (Scale to 0 workers is refused as bad input once admitted)."""
    codes = {}
    service = pb.DESCRIPTOR.services_by_name["Admin"]
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        kind = channel.unary_stream if method.server_streaming else channel.unary_unary
        call = kind(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            result = call(b"", metadata=metadata, timeout=timeout)
            if method.server_streaming:
                next(iter(result), None)
            codes[method.name] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            codes[method.name] = exc.code()
    return codes


def test_every_admin_rpc_needs_the_credential(server):
    for metadata in (None, bearer("wrong-token"), (("authorization", TOKEN),)):
        codes = _call_every_admin_rpc(server.channel, metadata)
        assert set(codes) >= {"GetTopology", "Scale"}
        assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, (metadata, codes)
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.AdminStub(server.channel).Scale(pb.ScaleRequest(num_workers=2), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(server.controller.topology.workers) == 1   # nothing changed


def test_admin_with_the_credential_and_health_without(server):
    topo = pb_grpc.AdminStub(server.channel).GetTopology(pb.GetTopologyRequest(), metadata=bearer(TOKEN), timeout=10)
    assert len(topo.workers) == 1
    codes = _call_every_admin_rpc(server.channel, bearer(TOKEN), timeout=3.0)   # a watch runs until then
    assert grpc.StatusCode.UNAUTHENTICATED not in codes.values(), codes
    status = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_mutual_tls_refuses_a_client_without_a_certificate(server, pki, tmp_path):
    door = second_front(server, tmp_path, tls_cert=pki["server"], tls_key=pki["server_key"],
                        tls_client_ca=pki["ca"])
    try:
        port = door.bound.port
        with tls_channel(port, pki) as anonymous:
            with pytest.raises(grpc.RpcError) as err:
                generate(anonymous, [5, 17, 33], max_tokens=2, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with tls_channel(port, pki, client_cert=True) as known:
            tokens, _, _ = generate(known, [5, 17, 33], max_tokens=2)
            assert len(tokens) == 2
    finally:
        door.stop(grace=1)


def test_admin_on_its_own_address_and_reflection_off(server, pki, tmp_path):
    door = second_front(server, tmp_path, admin_address="127.0.0.1:0", reflection=False)
    try:
        assert door.bound.admin_address and door.bound.admin_address != f"127.0.0.1:{door.bound.port}"
        with grpc.insecure_channel(f"127.0.0.1:{door.bound.port}") as public, \
                grpc.insecure_channel(door.bound.admin_address) as admin:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.AdminStub(public).GetTopology(pb.GetTopologyRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert len(pb_grpc.AdminStub(admin).GetTopology(pb.GetTopologyRequest(), timeout=10).workers) == 1
            assert len(generate(public, [5, 17, 33], max_tokens=2)[0]) == 2
            with pytest.raises(grpc.RpcError) as err:
                generate(admin, [5, 17, 33], max_tokens=2, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            for channel in (public, admin):
                hs = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert hs.status == health_pb2.HealthCheckResponse.SERVING
                req = reflection_pb2.ServerReflectionRequest(list_services="")
                with pytest.raises(grpc.RpcError) as err:
                    list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([req]), timeout=10))
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        door.stop(grace=1)


def test_reflection_is_on_by_default(server):
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    (resp,) = list(reflection_pb2_grpc.ServerReflectionStub(server.channel).ServerReflectionInfo(iter([req]),
                                                                                                 timeout=10))
    names = {s.name for s in resp.list_services_response.service}
    assert {"elasticmoe.v1.Inference", "elasticmoe.v1.Admin", "grpc.health.v1.Health"} <= names


def test_admin_moves_to_loopback_when_inference_is_public(tiny_models):
    model = str(tiny_models["mixtral"])
    assert admin_address(ServerConfig(model=model, host="127.0.0.1", port=50051)) is None
    assert admin_address(ServerConfig(model=model, host="0.0.0.0", port=50051)) == "127.0.0.1:50052"
    assert admin_address(ServerConfig(model=model, host="10.1.2.3", port=0)) == "127.0.0.1:0"
    assert admin_address(ServerConfig(model=model, host="0.0.0.0", admin_address="10.1.2.3:7000")) == "10.1.2.3:7000"


def test_cli_admin_commands_take_the_credential_and_the_ca(server, pki, capsys, monkeypatch):
    from server.cli import main

    address = f"127.0.0.1:{server.port}"
    monkeypatch.delenv("ELASTICMOE_ADMIN_TOKEN", raising=False)
    assert main(["topology", "--address", address, "--tls-ca", pki["ca"]]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["topology", "--address", address, "--tls-ca", pki["ca"], "--admin-token", TOKEN]) == 0
    assert "topology v" in capsys.readouterr().out
    monkeypatch.setenv("ELASTICMOE_ADMIN_TOKEN", TOKEN)
    assert main(["topology", "--address", address, "--tls-ca", pki["ca"]]) == 0
    assert main(["generate", "hello", "--address", address, "--tls-ca", pki["ca"], "--max-tokens", "2"]) == 0


@pytest.mark.parametrize("bad, word", [
    (dict(tls_cert="/nonexistent.pem", tls_key="/nonexistent.key"), "--tls-cert"),
    (dict(tls_cert=__file__), "--tls-key"),
    (dict(tls_client_ca=__file__), "--tls-client-ca"),
    (dict(admin_token=" "), "--admin-token"),
    (dict(admin_address="nowhere"), "--admin-address"),
    (dict(shutdown_grace_s=-1.0), "--shutdown-grace"),
    (dict(max_streams_per_connection=0), "--max-streams-per-connection"),
    (dict(stream_write_timeout_s=0.0), "--stream-write-timeout"),
    (dict(stream_write_timeout_s=float("inf")), "--stream-write-timeout"),
    (dict(stream_interval=0), "--stream-interval"),
])
def test_bad_front_door_flags_are_refused(tiny_models, bad, word):
    with pytest.raises(ValueError, match=word):
        ServerConfig(model=str(tiny_models["mixtral"]), **bad)
