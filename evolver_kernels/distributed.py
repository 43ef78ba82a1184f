"""Ranks for the synchronous schedule under torchrun: each rank evaluates the offspring i with
i % world == rank; scores are gathered, and every node then applies the same acceptances to its copy of the
population (held once per node in host memory or on disk, written by the node's local rank 0, node_share.py;
one per rank on GPUs), so the result is the same for any number of ranks and nodes. Without torchrun
(WORLD_SIZE unset or 1) everything here is a no-op."""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch

COLLECTIVE_TIMEOUT = datetime.timedelta(hours=6)


def process_group_up() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def leave(code: int) -> None:
    """Flushes the output and ends the process with `code`, skipping the interpreter's teardown (Ranks.exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Ranks:
    """This process's place: global rank and world size, and its node's (torchrun's LOCAL_RANK,
    LOCAL_WORLD_SIZE and GROUP_RANK): local rank 0 is the node's writer of a shared population."""

    def __init__(
        self,
        rank: int = 0,
        world: int = 1,
        local_rank: int | None = None,
        local_world: int | None = None,
        node: int = 0,
    ):
        self.rank, self.world = rank, world
        self.local_rank = rank if local_rank is None else local_rank
        self.local_world = world if local_world is None else local_world
        self.node = node

    @property
    def node_writer(self) -> bool:
        return self.local_rank == 0

    @property
    def node_key(self) -> tuple[str, int]:
        """This rank's node: the host name and the node rank (a launcher may leave GROUP_RANK unset)."""
        return socket.gethostname(), self.node

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(device_type: str) -> Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Ranks()
        import torch.distributed as dist

        if not dist.is_initialized():
            # a long timeout: the other ranks wait at barriers while rank 0 alone does long work (the outputs of a
            # 70B model, held-out selection); a rank that dies is caught by torchrun, not by this timeout
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
        launcher = Ranks.of_launcher()
        rank, world = dist.get_rank(), dist.get_world_size()
        return Ranks(
            rank,
            world,
            launcher.local_rank if "LOCAL_RANK" in os.environ else rank,
            launcher.local_world if "LOCAL_WORLD_SIZE" in os.environ else world,
            launcher.node,
        )

    @staticmethod
    def of_launcher() -> Ranks:
        """The launcher's numbers (torchrun's environment) without a process group: what --dry-run plans for."""
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        return Ranks(
            rank,
            world,
            int(env.get("LOCAL_RANK", rank)),
            int(env.get("LOCAL_WORLD_SIZE", world)),
            int(env.get("GROUP_RANK", 0)),
        )

    def mine(self, i: int) -> bool:
        return i % self.world == self.rank

    def gather(self, scores: dict) -> dict:
        """The union of every rank's dict (keys are individuals: no two ranks write one key)."""
        if not self.enabled:
            return scores
        import torch.distributed as dist

        parts = [None] * self.world
        dist.all_gather_object(parts, scores)
        merged = {}
        for part in parts:
            merged.update(part)
        return merged

    def broadcast(self, value):
        """Rank 0's value on every rank."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Waits for every rank (a no-op without ranks)."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def exit(self, code: int) -> None:
        """Ends this rank's process, once every rank is done: barrier, destroy_process_group, flush, os._exit.
        Gloo's threads can outlive destroy_process_group while another library still holds the group, and a
        process leaving through the interpreter's teardown with them running aborts now and then ("terminate
        called without an active exception", SIGABRT: 1 run in 16 under load), which fails the whole torchrun
        after its work is done. Everything a rank writes is closed before this is called."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        leave(code)

    def device(self, requested: torch.device) -> torch.device:
        if self.enabled and requested.type == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
        return requested
