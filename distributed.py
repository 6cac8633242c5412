"""The process's place in a torchrun job (or a plain single process) and the few collectives we use."""

import datetime
import os
import re
import signal
import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist


class LaunchError(RuntimeError):
    """The launch does not fit this machine (more processes than GPUs)."""


def launched_rank():
    """This process's rank under torchrun (0 in a plain process), before any process group exists."""
    return int(os.environ.get("RANK", 0))


def timeout_message(exc, proc, timeout_s):
    """The one-line error where `exc` is gloo's collective timeout under torchrun ("Timed out waiting ...",
    "Application timeout caused pair closure"), else None; NCCL's watchdog ends the process with its own message."""
    distributed = proc is not None and proc.enabled
    if not (distributed and isinstance(exc, RuntimeError) and re.search(r"time(d)? ?out", str(exc).lower())):
        return None
    return (f"rank {proc.rank} waited more than dist_timeout={timeout_s} s for the other processes in a collective: "
            "one of them is stuck, stopped or dead, so the job ends")


class Distributed:
    """Rank, world size and device of this process; one process per GPU under torchrun. `timeout_s`: how long a
    collective waits for the other processes (configs.dist_timeout)."""

    def __init__(self, timeout_s=1800):
        self.enabled = "RANK" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            if self.local_rank >= gpus:
                raise LaunchError(f"LOCAL_RANK={self.local_rank} but this machine has {gpus} GPU(s): torchrun "
                                   f"--nproc_per_node exceeds the GPUs of this machine; use at most {gpus}")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.enabled:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        self.main = self.rank == 0
        self.local_main = self.local_rank == 0  # the first process on its machine

    @contextmanager
    def local_main_first(self):
        """The block on each machine's first process, then the others: a shared cache filled once, not raced on."""
        if not self.local_main:
            self.barrier()
        yield
        if self.local_main:
            self.barrier()

    def broadcast(self, obj):
        """rank 0's value of a picklable object, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, tensor):
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def sync_buffers(self, module):
        """Copy rank 0's buffers (BatchNorm statistics) to every rank: DDP broadcasts them at the start of each forward,
        so after the last step each rank holds its own last batch's; this makes all hold the model rank 0 saves."""
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def close(self):
        if self.enabled:
            dist.destroy_process_group()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Stopped(Exception):
    """A signal stopped the run after an iteration (last.pth written) or the last (`final`): exit 128 + the signal."""

    def __init__(self, signum, iteration, path, final=False):
        name = signal.Signals(signum).name
        if final:
            message = (f"stopped by {name} after the last iteration ({iteration}), before the final evaluation; "
                       f"{path} holds the final weights: score them with python evaluate.py --ckpt {path}")
        else:
            message = f"stopped by {name} after iteration {iteration}; {path} holds it: continue with python " \
                      f"train.py resume={path}"
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """While entered, SIGTERM (a cluster's preemption) and SIGINT ask the run to stop after the current iteration; a
    second SIGINT, or any signal once the final weights are saved (`saved_final`), stops the process at once."""

    def __init__(self):
        self.signum, self._previous, self.final = None, {}, None

    def _handle(self, signum, frame):
        if self.final is not None:
            raise Stopped(signum, *self.final, final=True)
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def saved_final(self, iteration, path):
        """The final weights are at `path`: a signal received before ends the run now, one received later at once."""
        self.final = (iteration, path)
        if self.signum is not None:
            raise Stopped(self.signum, iteration, path, final=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python sets handlers there only
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
