"""A real `elasticmoe serve --host 0.0.0.0` without --admin-address: Admin is not served on the public
Inference port (UNIMPLEMENTED there) but on 127.0.0.1:port+1; and an SSE stream whose client reads
nothing ends at the HTTP write deadline, its request cancelled.

The server binds beyond loopback, so it runs inside a private network namespace (`unshare -n`, or
`unshare -rn` for a user allowed user namespaces) whose only interface is its own loopback: nothing
outside the test can reach it. Where no namespace can be made, it binds the host's 0.0.0.0 for the
seconds of the test and only 127.0.0.1 is dialled; the HTTP stall needs the namespace's small TCP
buffers (on the host's, megabytes of SSE would have to pile up first) and is skipped then.
One server start (tests/public_bind_probe.py drives it) answers every test here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def netns_prefix() -> list[str] | None:
    """The command that runs another in a new network namespace here, or None."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0:
            return prefix
    return None


@pytest.fixture(scope="module")
def seen(tiny_models, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("public_bind") / "seen.json"
    prefix = netns_prefix()
    cmd = [sys.executable, "-m", "tests.public_bind_probe", str(tiny_models["mixtral"]), str(out)]
    if prefix:
        cmd = [*prefix, "--", *cmd, "--netns"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.exists(), f"the probe wrote nothing (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(out.read_text())
    result["log"] = proc.stdout + proc.stderr
    return result


def test_admin_is_not_on_the_public_inference_port(seen):
    assert seen["admin_on_inference_port"] == "UNIMPLEMENTED", seen
    assert seen["generate_on_inference_port"] == 3, seen


def test_admin_is_on_loopback_port_plus_one(seen):
    assert seen["admin_on_loopback"] == "OK", seen
    assert seen.get("workers_on_loopback") == 1, seen
    assert seen["generate_on_loopback"] == "UNIMPLEMENTED", seen
    assert "Admin served on 127.0.0.1:" in seen["log"] and "beyond loopback" in seen["log"]


def test_the_server_stops_cleanly_on_sigint(seen):
    assert seen["exit_code"] == 0, seen["log"][-3000:]


def test_an_sse_stream_its_client_stops_reading_is_ended_and_its_request_cancelled(seen):
    if not seen["netns"]:
        pytest.skip("no network namespace here: the stall would need megabytes in the host's TCP buffers")
    stall = seen["http_stall"]
    assert stall["stalls"] == 1, stall
    assert stall["cancelled"] == 1 and stall["ok"] == 0, stall
    assert stall["running"] == 0 and stall["kv_usage"] == 0, stall
