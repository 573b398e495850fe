"""hope.runtime.configure_threads: the one CPU-thread policy of hope-train, hope-eval, the demo and hope-learn."""
from __future__ import annotations

import pytest
import torch

import hope.runtime as runtime


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_flag_wins_then_omp_num_threads_then_idle_cores(monkeypatch):
    monkeypatch.setattr(runtime, "idle_cores", lambda: 3)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.configure_threads(1) == 1 == torch.get_num_threads()
    assert runtime.thread_source(1) == "--num_threads"
    assert runtime.configure_threads(None) == 2 == torch.get_num_threads()
    assert runtime.thread_source(None) == "OMP_NUM_THREADS"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert runtime.configure_threads(None) == 3 == torch.get_num_threads()
    assert runtime.thread_source(None) == "idle cores"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine share the idle cores
    assert runtime.configure_threads(None) == 1


def test_idle_cores_subtracts_the_load_of_other_processes(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (5.2, 0.0, 0.0))
    assert runtime.idle_cores() == 3
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert runtime.idle_cores() == 1


@pytest.mark.parametrize("num_threads, omp, message", [(0, None, "--num_threads must be at least 1"),
                                                      (None, "four", "OMP_NUM_THREADS='four' is not"),
                                                      (None, "0", "OMP_NUM_THREADS must be at least 1")])
def test_bad_counts_are_refused(monkeypatch, num_threads, omp, message):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    with pytest.raises(ValueError, match=message):
        runtime.configure_threads(num_threads)


def test_the_choice_is_described_with_its_source(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.describe_threads(2, 2) == "2 CPU threads (from --num_threads)"
    assert runtime.describe_threads(1, None) == "1 CPU thread (from idle cores; --num_threads N to change)"
