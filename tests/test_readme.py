"""The README's commands, run as a new user would: `make serve` in the background, the CLI lines of
"Calling it" against it, then Ctrl-C, after which no worker, Ray process or shared memory is left."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import read_until

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(heading: str) -> list[str]:
    """Command lines of the first ```bash block under `## heading`."""
    section = README.split(f"## {heading}", 1)[1]
    code = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in code.splitlines() if line.split("#", 1)[0].strip()]


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_readme_commands(tmp_path):
    assert "make serve" in _block("The two commands") and "make test" in _block("The two commands")
    calls = _block("Calling it")
    assert any("generate" in c for c in calls) and any(" scale " in c for c in calls)
    model = tmp_path / "model"
    before = set(os.listdir("/dev/shm"))   # other servers' segments are not this server's to remove
    env = dict(os.environ, MODEL=str(model))
    env.pop("CI", None)
    serve = subprocess.Popen(["make", "serve"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    lines: list[str] = []
    try:
        read_until(serve, lines, "Ctrl-C stops it")
        assert any("elasticmoe serving" in line for line in lines), "".join(lines[-30:])
        for call in calls:
            if " serve " in call:
                continue   # a second server on the same port is not what a user would run next
            argv = shlex.split(call.replace("/tmp/qwen", str(tmp_path / "qwen")))
            done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{call}\n{done.stdout}\n{done.stderr}"
            if "generate" in call:
                assert done.stdout.strip(), "generate streamed no text"
                assert "completion tokens" in done.stderr
            if " scale " in call:
                assert "committed" in done.stdout and "3 workers" in done.stdout
            if "topology" in call:
                assert "topology v" in done.stdout and "computing" in done.stdout
                # a reader that goes away at once (`| head`): a quiet exit, no traceback
                cut = subprocess.run(["sh", "-c", f"{call} | true"], cwd=ROOT, capture_output=True, text=True,
                                     timeout=300)
                assert "Traceback" not in cut.stderr and "BrokenPipe" not in cut.stderr, cut.stderr
        children = _descendants(serve.pid)
        assert any("raylet" in p.name() for p in children), [p.name() for p in children]
        namespace_segments = [f for f in os.listdir("/dev/shm") if f.startswith("emoe-") and f not in before]
        assert namespace_segments
    finally:
        os.killpg(serve.pid, signal.SIGINT)   # Ctrl-C
        try:
            out, _ = serve.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            out, _ = serve.communicate()
    assert "shutting down" in out, out[-2000:]
    deadline = time.monotonic() + 30   # Ray's own processes may take a moment to exit
    while time.monotonic() < deadline and any(_alive(p) for p in children):
        time.sleep(0.5)
    left = [p.name() for p in children if _alive(p)]
    assert not left, f"processes left after Ctrl-C: {left}"
    assert not [f for f in os.listdir("/dev/shm") if f in namespace_segments], "shared memory left behind"
