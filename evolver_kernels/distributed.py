"""Ranks for the synchronous schedule under torchrun: each rank evaluates the offspring i with
i % world == rank; scores are gathered, and every rank then applies the same acceptances to its own copy of
the population, so the result is the same for any number of ranks. Without torchrun (WORLD_SIZE unset or 1)
everything here is a no-op."""

from __future__ import annotations

import os

import torch


class Ranks:
    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

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
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return Ranks(dist.get_rank(), dist.get_world_size())

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

    def device(self, requested: torch.device) -> torch.device:
        if self.enabled and requested.type == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
        return requested
