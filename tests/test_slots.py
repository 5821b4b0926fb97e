"""Slots (slots.py): calls in flight bounded across the processes of one host by byte locks in one file, freed by the
kernel when a process dies; without a file, in the process alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT

from passthru.slots import REGION, SlotFile, host_slots, region_of, region_of_token

HOLDER = """
import sys, time
from passthru.slots import SlotFile
slots = SlotFile(sys.argv[1])
held = [slots.take(int(sys.argv[2]), int(sys.argv[3])) for _ in range(int(sys.argv[4]))]
print(" ".join(map(str, held)), flush=True)
time.sleep(60)
"""


def hold_in_another_process(path: Path, region: int, size: int, count: int) -> tuple[subprocess.Popen[str], str]:
    """A process (another worker) that takes `count` slots and keeps them until it is killed; what it took."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(region), str(size), str(count)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout is not None
    return holder, holder.stdout.readline().strip()


def stop(holder: subprocess.Popen[str]) -> None:
    holder.kill()
    holder.wait(10)
    assert holder.stdout is not None
    holder.stdout.close()


@pytest.mark.parametrize("shared", [True, False], ids=["file", "process-local"])
def test_a_bound_admits_its_size_and_a_given_slot_is_taken_again(tmp_path: Path, shared: bool) -> None:
    slots = SlotFile(str(tmp_path / "routes.slots") if shared else None)
    region, other = region_of("/a"), region_of("/b")
    taken = [slots.take(region, 3) for _ in range(3)]
    assert sorted(taken) == [0, 1, 2]  # type: ignore[type-var]
    assert slots.take(region, 3) is None
    assert slots.take(other, 1) is not None  # another bound is not touched
    slots.give(region, taken[1])  # type: ignore[arg-type]
    assert slots.take(region, 3) == taken[1]
    assert slots.take(region, 4) == 3  # a bound raised: the new slot only
    assert slots.take(region, 2) is None  # lowered under what is held: nothing more


def test_processes_of_one_host_share_a_bound_and_a_killed_one_frees_its_slots(tmp_path: Path) -> None:
    path = tmp_path / "routes.slots"
    region = region_of("/v1/chat/completions")
    holder, held = hold_in_another_process(path, region, 5, 3)
    try:
        assert len(held.split()) == 3 and "None" not in held
        here = SlotFile(str(path))
        mine = [here.take(region, 5) for _ in range(3)]
        assert mine[2] is None and None not in mine[:2]  # 3 there, 2 here: the bound is 5 on the host
        assert {str(index) for index in mine[:2]}.isdisjoint(held.split())
        os.kill(holder.pid, signal.SIGKILL)  # a worker killed mid-call: the kernel lets go of its locks
        holder.wait(10)
        assert holder.returncode == -signal.SIGKILL
        assert [here.take(region, 5) for _ in range(4)].count(None) == 1  # its 3 slots are free; 5 held here now
    finally:
        stop(holder)


def test_threads_of_one_process_never_share_a_slot(tmp_path: Path) -> None:
    """A POSIX lock is its process's, so the kernel would let two threads lock one byte: the file keeps which slots
    its process holds."""
    slots = SlotFile(str(tmp_path / "keys.slots"))
    region = region_of_token("ab" * 32)
    start = threading.Barrier(16)
    results: list[int | None] = []

    def take() -> None:
        start.wait(5)
        results.append(slots.take(region, 4))

    threads = [threading.Thread(target=take) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(index for index in results if index is not None) == [0, 1, 2, 3]
    holder, held = hold_in_another_process(tmp_path / "keys.slots", region, 4, 1)
    try:
        assert held == "None"  # and another process finds the bound full
    finally:
        stop(holder)


def test_a_slot_given_back_is_free_for_other_processes(tmp_path: Path) -> None:
    path = tmp_path / "routes.slots"
    region = region_of("/r")
    here = SlotFile(str(path))
    index = here.take(region, 1)
    assert index == 0
    holder, held = hold_in_another_process(path, region, 1, 1)
    stop(holder)
    assert held == "None"
    here.give(region, index)
    here.give(region, index)  # twice: nothing more happens
    holder, held = hold_in_another_process(path, region, 1, 1)
    stop(holder)
    assert held == "0"


def test_regions_are_whole_and_far_apart() -> None:
    assert region_of("/a") % REGION == 0 and region_of("/a") == region_of("/a") != region_of("/b")
    assert region_of_token("0" * 63 + "1") == 0 and region_of_token("f" * 64) == (2**48 - 1) * REGION < 2**63
    routes, keys = host_slots("/srv/limits")
    assert (routes.path, keys.path) == ("/srv/limits/routes.slots", "/srv/limits/keys.slots")
    assert host_slots(None)[0].path is None
