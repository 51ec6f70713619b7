"""The engine process's threads: OpenMP sleeps instead of spinning when `elasticmoe serve` starts
torch (a spinning thread holds a core a worker needs), and torch's thread count is the CPUs the
process may run on (its affinity) but one left to the API, Ray and the OS, not the machine's count
nor a constant."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import read_until


def test_serve_starts_openmp_passive(tmp_path):
    """libgomp prints its settings at load with OMP_DISPLAY_ENV=VERBOSE: the CLI must have asked
    for the passive policy with a short bounded spin before torch loaded it; libgomp's default
    spins 300000 rounds (through a whole expert phase)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    # a model directory that does not exist: the server fails its config check right after torch
    # is imported, before anything is started
    out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(tmp_path / "none")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert "is not a directory" in out.stderr + out.stdout
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in out.stderr, out.stderr[-2000:]
    spin = re.search(r"GOMP_SPINCOUNT = '(\d+)'", out.stderr)
    assert spin is not None and int(spin.group(1)) <= 10000, out.stderr[-2000:]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to restrict one away")
@pytest.mark.parametrize("cpus", [1, 2])
def test_engine_threads_follow_the_affinity(cpus):
    allowed = sorted(os.sched_getaffinity(0))[:cpus]
    code = ("import torch; from server.engine.threads import engine_threads; "
            "n = engine_threads(reserved=0); print(n, torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         preexec_fn=lambda: os.sched_setaffinity(0, allowed))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(cpus), str(cpus)]


@pytest.mark.parametrize("cpus, threads", [(1, 1), (2, 1), (3, 2), (64, 63)])
def test_engine_leaves_one_cpu_to_the_rest(cpus, threads):
    """Without --engine-threads the engine takes its CPUs but one (at least one): on 2 cores, 2
    engine threads served 41 tok/s at batch 1 where 1 served 79 (threads.py)."""
    from server.engine.threads import auto_threads

    assert auto_threads(cpus) == threads


def test_serve_takes_the_engine_thread_count_asked_for(tiny_models):
    """`--engine-threads N` sets the engine process's torch threads (0, the default: its CPUs);
    a negative count is refused naming the flag, before anything starts."""

    bad = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_models["mixtral"]),
                            "--engine-threads", "-1", "--port", "0", "--http-port", "-1", "--metrics-port", "-1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = bad.communicate(timeout=120)
    except subprocess.TimeoutExpired:   # it started serving: the flag was not checked
        os.killpg(bad.pid, signal.SIGKILL)
        _, err = bad.communicate()
    assert bad.returncode == 2 and "--engine-threads -1 is out of range" in err, err[-2000:]
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_models["mixtral"]),
                             "--workers", "1", "--engine-threads", "1", "--port", "0", "--http-port", "-1",
                             "--metrics-port", "-1", "--ray-num-cpus", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        read_until(proc, lines, "torch threads")
        assert any("engine: 1 torch threads" in line for line in lines), "".join(lines)[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_wide_steps_take_every_cpu():
    """Steps of at least WIDE_STEP_TOKENS tokens (prefill) use every CPU, decode steps the CPUs but
    one; a count asked for with --engine-threads holds for every step."""
    import torch

    from server.engine.threads import WIDE_STEP_TOKENS, StepThreads, available_cpus, step_threads

    before = torch.get_num_threads()   # step_threads sets this process's count: put it back after
    try:
        auto = step_threads(0)
        assert auto.for_tokens(1) == max(1, available_cpus() - 1) and auto.for_tokens(WIDE_STEP_TOKENS) == available_cpus()
        fixed = step_threads(3)
        assert fixed.for_tokens(1) == fixed.for_tokens(4096) == 3
        assert StepThreads(1, 2).for_tokens(WIDE_STEP_TOKENS - 1) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to tell wide from narrow")
def test_the_engine_runs_a_long_prompt_wide_and_decode_narrow(tiny_models, ray_local):
    from tests.conftest import generate, running_server

    with running_server(tiny_models["mixtral"], workers=1, max_step_tokens=512) as server:
        server.engine.steps_by_threads.clear()
        generate(server.channel, list(range(3, 203)), max_tokens=4, ignore_eos=True)   # 200-token prompt
        cpus = len(os.sched_getaffinity(0))
        seen = dict(server.engine.steps_by_threads)
        assert seen.get(cpus, 0) >= 1 and seen.get(cpus - 1, 0) >= 3, seen
