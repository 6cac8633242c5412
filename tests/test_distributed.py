"""Launch checks and the order of work across processes, without starting a process group."""

import pytest
import torch

import distributed
from distributed import Distributed, LaunchError


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    # torchrun --nproc_per_node=3 on a 2-GPU machine: the third process has LOCAL_RANK=2.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device called"))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(LaunchError, match=r"LOCAL_RANK=2 but this machine has 2 GPU\(s\).*--nproc_per_node"):
        Distributed()


@pytest.mark.parametrize("local_rank, order", [(0, ["work", "barrier"]), (1, ["barrier", "work"])])
def test_local_main_works_first(monkeypatch, local_rank, order):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    proc = Distributed()
    assert proc.local_rank == local_rank and proc.local_main == (local_rank == 0)
    events = []
    monkeypatch.setattr(distributed.Distributed, "barrier", lambda self: events.append("barrier"))
    with proc.local_main_first():
        events.append("work")
    assert events == order
