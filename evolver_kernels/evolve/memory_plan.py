"""The memory plan of an evolution run: a pure function of the model's layout and the options, printed before
any heavy work (and by --dry-run, which builds nothing), and the refusal when it cannot fit.

Counted in bytes (docs/ARCHITECTURE.md §4), per node: N individuals on their tier (once per node in host
memory or on disk, once per rank on GPUs: node_share.py), per rank one evaluation model (placed by
--device-map, or on the compute device), the base model for task-vector merges, chunk buffers, merge
statistics, the scoring logits (the causal-LM logits budget, lm-eval's batch), and on disk the disk tier's
files plus, under --out, the checkpointed individuals, the statistics and the output model.
"""

from __future__ import annotations

import dataclasses

from evolver_kernels.io.rundir import format_bytes


@dataclasses.dataclass(frozen=True)
class PlanInputs:
    copy_bytes: int  # one model copy (the layout's bytes)
    numel: int  # evolved elements of a model
    n: int  # individuals
    tier: str  # gpu | cpu | disk
    compute: str  # the compute device: "cpu" or "cuda:K"
    evaluation: dict[str, int]  # bytes of one model copy per device it is placed on
    placement: str  # a phrase for where the evaluation model lives
    base_model: bool
    chunk_elements: int
    stats_bytes: int = 0  # host bytes of the merge method's statistics
    stats_name: str = ""
    logits_bytes: int = 0  # scoring's logits (causal-LM: 4x the budget; lm-eval: a batch's), on the compute device
    scratch_root: str = ""  # where the disk tier's files go
    out: str = ""
    checkpoint_linked: bool = False  # the disk tier hard-links its files into the checkpoint (same filesystem)
    backends: dict[str, str] = dataclasses.field(default_factory=dict)  # the backend each device runs
    local_ranks: int = 1  # ranks of this node (torchrun): each holds its evaluation model and chunk buffers
    shared_root: str = ""  # with several ranks: where the node's one host-memory population lives (shared memory)
    # individuals are replaced and checkpointed (--search weights); --search recipe reads the models only
    replaces: bool = True


@dataclasses.dataclass(frozen=True)
class Plan:
    lines: tuple[str, ...]
    host: int
    devices: dict[str, int]  # bytes needed on each GPU
    disk: tuple[tuple[str, str, int], ...]  # (what, directory, bytes)

    def text(self) -> str:
        return "\n".join(self.lines)

    def refusal(self, host_free: int | None, device_free, disk_problem) -> str | None:
        """Why the plan cannot run, given the free host memory (None: unknown), device_free(device) -> bytes and
        disk_problem(needs) -> a sentence or None; None when it fits."""
        problem = None
        if host_free is not None and self.host > host_free:
            problem = f"the plan needs {format_bytes(self.host)} of host memory, {format_bytes(host_free)} is available"
        for device, need in self.devices.items():
            free = device_free(device)
            if need > free:
                problem = f"the plan needs {format_bytes(need)} on {device}, {format_bytes(free)} is free"
        disk = disk_problem(list(self.disk))
        if disk:
            problem = disk
        if problem:
            problem += " (try --population-on cpu or disk, fewer models, or another --device)"
        return problem


def memory_plan(p: PlanInputs) -> Plan:
    on_gpu = p.compute.startswith("cuda")
    k = p.local_ranks
    # a merge's n input chunks, twice when staged (double buffering, staging.py), offspring chunks, fp32 work
    chunk = p.chunk_elements * 4 * (2 * p.n + 5)
    pop_bytes = p.n * p.copy_bytes
    copies = 2 if p.base_model else 1  # the evaluation arena, and the base model's for merges
    evaluation = {d: b * copies for d, b in p.evaluation.items()}
    # per rank of the node (each GPU is one rank's): its chunk buffers, statistics, evaluation model, logits
    host = k * (chunk + p.stats_bytes + evaluation.get("cpu", 0) + (p.logits_bytes if not on_gpu else 0))
    devices: dict[str, int] = {}
    if on_gpu:
        devices[p.compute] = chunk + evaluation.get(p.compute, 0) + p.logits_bytes
    for device, nbytes in evaluation.items():  # with --device-map, other GPUs hold only their share
        if device not in ("cpu", p.compute):
            devices[device] = devices.get(device, 0) + nbytes
    pop_disk = shm = 0
    if p.tier == "disk":
        # a replacement is written beside the file it replaces (once per node)
        pop_disk = pop_bytes + p.copy_bytes * p.replaces
    elif p.tier == "gpu" and on_gpu:
        devices[p.compute] += pop_bytes  # each rank's own GPU
    elif p.shared_root:
        host += pop_bytes  # once per node, in shared memory (node_share.py)
        shm = pop_bytes
    else:
        host += k * pop_bytes
    # under --out: checkpointed individuals (each replaced one is written before its old file goes, unless the
    # disk tier hard-links its own files), the statistics, the output model
    checkpointed = 0 if p.checkpoint_linked or not p.replaces else (p.n + 1) * p.copy_bytes
    out_disk = checkpointed + p.stats_bytes + p.copy_bytes
    disk_total = pop_disk + out_disk
    per_rank = f" per rank ({k} ranks on this node)" if k > 1 else ""
    pop_where = (
        " in shared memory, once for the node's ranks"
        if p.shared_root
        else " once for the node's ranks"
        if k > 1 and p.tier == "disk"
        else per_rank
    )
    # the gpu tier is the compute device's memory: the host's when the device is the CPU
    tier = "gpu (the compute device: the CPU, so host memory)" if p.tier == "gpu" and not on_gpu else p.tier
    lines = (
        f"memory plan: one model copy = {format_bytes(p.copy_bytes)} ({p.numel:,} evolved elements); "
        f"{'population' if p.replaces else 'the models (read only)'}: {p.n} copies on {tier}{pop_where} "
        f"({format_bytes(pop_bytes)}); "
        f"evaluation model: 1 copy on {p.placement}{per_rank}"
        + ("; base model: 1 copy there" if p.base_model else "")
        + f"; chunk buffers <= {format_bytes(chunk)}{per_rank}"
        + (f"; evaluation logits <= {format_bytes(p.logits_bytes)}" if p.logits_bytes else "")
        + (f"; {p.stats_name} statistics (host): {format_bytes(p.stats_bytes)}" if p.stats_bytes else ""),
        f"  needs: host {format_bytes(host)}"
        + "".join(f", {d} {format_bytes(b)}" for d, b in devices.items() if b)
        + (f", disk {format_bytes(disk_total)}" if disk_total else ""),
    ) + (("  backends: " + ", ".join(f"{d} runs {b}" for d, b in p.backends.items()),) if p.backends else ())
    disk = (
        ("the population", p.scratch_root, pop_disk),
        ("checkpoint and output", p.out, out_disk),
        ("the shared-memory population", p.shared_root, shm),
    )
    return Plan(lines=lines, host=host, devices=devices, disk=disk)


def host_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
