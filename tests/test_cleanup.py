"""Every node cleaned: a dead worker's segments are reclaimed on its node after failover, and a
server that starts removes the segments of servers that are gone (killed without cleaning up)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import torch

from memory.owners import claim_namespace, owners_path, sweep_orphans
from memory.segments import SHM_DIR, ExpertSegment, ExpertShape, segment_name
from tests.conftest import generate, leftover_segments, running_server, wait_for

SHAPE = ExpertShape(8, 16, torch.float32)


def expert_files(namespace: str) -> set[str]:
    """The namespace's expert segments in /dev/shm (not its owner file, not transient rings)."""
    return {f for f in leftover_segments(namespace) if f.startswith(f"emoe-{namespace}-")
            and f"emoe-{namespace}-ring-" not in f}


def test_a_dead_workers_segments_are_reclaimed_on_its_node(tiny_models, ray_local):
    with running_server(tiny_models["olmoe"], workers=3) as server:
        ns = server.namespace
        topo = server.controller.topology
        assert expert_files(ns) == set(topo.segments.values())
        victim = topo.placement.workers[2]
        os.kill(topo.workers[victim].pid, signal.SIGKILL)
        # its exchange finds it gone, or, standing by for the node's lead, the engine's look at its link
        generate(server.channel, [5, 6, 7], max_tokens=4)
        wait_for(lambda: victim not in server.controller.topology.workers, 60, "the loss to be seen")
        assert server.failover.wait_idle(120)
        deadline = time.monotonic() + 60
        while expert_files(ns) != set(server.controller.topology.segments.values()):
            assert time.monotonic() < deadline, (
                sorted(expert_files(ns) - set(server.controller.topology.segments.values())))
            time.sleep(0.1)
        # the victim's segments that remain are exactly those survivors remapped and still serve
        assert victim not in server.controller.topology.workers
    assert expert_files(ns) == set() and not os.path.exists(owners_path(ns))


def _dead_server(namespace: str) -> None:
    """A process that claims `namespace`, creates segments, and is killed without cleaning up."""
    code = (f"from memory.owners import claim_namespace\n"
            f"from memory.segments import ExpertSegment, ExpertShape, segment_name\n"
            f"import torch, sys, time\n"
            f"claim_namespace({namespace!r})\n"
            f"segs = [ExpertSegment.create(segment_name({namespace!r}, 0, e, 'w1'), "
            f"ExpertShape(8, 16, torch.float32)) for e in range(3)]\n"
            f"print('ready', flush=True)\n"
            f"time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_server_that_starts_sweeps_the_namespaces_of_dead_servers(tiny_models, ray_local):
    dead, live, unowned = (uuid.uuid4().hex[:8] for _ in range(3))
    _dead_server(dead)
    assert len(expert_files(dead)) == 3
    claim_namespace(live)   # owned by this (living) process
    kept = [ExpertSegment.create(segment_name(ns, 0, 0, "w1"), SHAPE) for ns in (live, unowned)]
    try:
        with running_server(tiny_models["mixtral"], workers=1):
            assert expert_files(dead) == set() and not os.path.exists(owners_path(dead))
            assert len(expert_files(live)) == 1, "a living owner's segments stay"
            assert len(expert_files(unowned)) == 1, "segments of an unknown owner stay"
    finally:
        for seg in kept:
            seg.close()
            seg.unlink()
        os.unlink(owners_path(live))


def test_a_recycled_pid_is_no_owner(tmp_path):
    ns = uuid.uuid4().hex[:8]
    shm = str(tmp_path)
    with open(owners_path(ns, shm), "w") as f:
        f.write(f"{os.getpid()} 1\n")   # our pid, but a start time that is not ours: a recycled pid
    open(os.path.join(shm, f"emoe-{ns}-w1-L0-E0"), "w").close()
    assert sweep_orphans(shm) == {ns: 1}
    assert os.listdir(shm) == []
    claim_namespace(ns, shm_dir=shm)
    open(os.path.join(shm, f"emoe-{ns}-w1-L0-E0"), "w").close()
    assert sweep_orphans(shm) == {} and len(os.listdir(shm)) == 2
    assert SHM_DIR == "/dev/shm"


def test_owners_follow_the_segment_directory_set_after_import(tmp_path, monkeypatch):
    """$ELASTICMOE_SHM_DIR is read when a function is called, not when memory.owners was imported
    (a test cluster's raylet sets it for its node only): the owner file, the sweep and a dead
    worker's reclaim all work there, and /dev/shm is not touched."""
    from memory.owners import disown_namespace, unlink_worker_segments

    ns, dead = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    shm = tmp_path / "node-shm"
    shm.mkdir()
    decoy = os.path.join(SHM_DIR, f"emoe-{ns}-w1-L0-E1")   # no owner file: nobody else sweeps it
    open(decoy, "w").close()
    try:
        monkeypatch.setenv("ELASTICMOE_SHM_DIR", str(shm))
        claim_namespace(ns)
        assert os.path.exists(shm / f"emoe-{ns}.owners") and not os.path.exists(os.path.join(SHM_DIR, f"emoe-{ns}.owners"))
        assert owners_path(ns) == str(shm / f"emoe-{ns}.owners")
        seg = ExpertSegment.create(segment_name(ns, 0, 0, "w1"), SHAPE)   # lands in the same directory
        seg.close()
        (shm / f"emoe-{dead}.owners").write_text(f"{os.getpid()} 1\n")   # a recycled pid: gone
        (shm / f"emoe-{dead}-w1-L0-E0").touch()
        assert sweep_orphans() == {dead: 1}
        assert unlink_worker_segments(ns, "w1") == 1
        disown_namespace(ns)
        assert os.listdir(shm) == []
        assert os.path.exists(decoy), "a sweep or reclaim in $ELASTICMOE_SHM_DIR removed a file of /dev/shm"
    finally:
        os.unlink(decoy)
        disown_namespace(ns, SHM_DIR)   # only if the claim went astray
