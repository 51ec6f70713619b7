"""A worker's kernel threads: its share of the CPUs its process may run on, with the workers of
its node that compute the same layer (experts/kernels/threads.py)."""
from __future__ import annotations

import threading

import torch

from experts.kernels.threads import KernelThreads, team_threads


def test_a_team_shares_the_cpus_and_nobody_gets_none():
    assert [team_threads(4, t) for t in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]
    assert team_threads(2, 1) == 2 and team_threads(1, 1) == 1 and team_threads(8, 0) == 8


def test_use_sets_the_calling_threads_count_and_a_fixed_count_wins():
    before = torch.get_num_threads()
    try:
        cpus = KernelThreads(4)
        assert cpus.use(1) == 4 and torch.get_num_threads() == 4
        assert cpus.use(2) == 2 and torch.get_num_threads() == 2
        assert cpus.use(3) == 1 and torch.get_num_threads() == 1
        assert KernelThreads(4, fixed=3).use(1) == 3 and torch.get_num_threads() == 3
        # OpenMP's count belongs to each thread once it has run torch (the kernels run on a
        # link's thread): a thread whose count was fixed before another thread's call still sets
        # its own on its first call
        mine = KernelThreads(torch.get_num_threads() + 1)
        n = mine.for_team(1)
        started, go, seen = threading.Event(), threading.Event(), []

        def link_thread() -> None:
            torch.get_num_threads()   # this thread's count is taken now, before the main thread's call
            started.set()
            go.wait(10)
            seen.append((mine.use(1), torch.get_num_threads()))

        other = threading.Thread(target=link_thread)
        other.start()
        started.wait(10)
        assert mine.use(1) == n and torch.get_num_threads() == n
        go.set()
        other.join()
        assert seen == [(n, n)]
    finally:
        torch.set_num_threads(before)

