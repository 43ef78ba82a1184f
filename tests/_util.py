"""Comparison helpers for kernel tests and merges against mergekit, and the compiler's resource report of GPU
code."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import torch

# a script that runs evolve and SIGKILLs itself at a chosen point (its docstring)
KILL_RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_run.py")


def run_evolve(argv: list[str]) -> dict:
    """`python -m evolver_kernels.evolve` in this process with `argv` (which names --out); asserts exit 0 and
    returns the run's evolution.json."""
    import json

    from evolver_kernels.evolve import main

    assert main(argv) == 0
    with open(os.path.join(argv[argv.index("--out") + 1], "evolution.json")) as f:
        return json.load(f)


BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as int64 (sign-magnitude order made monotone for ulp distances)."""
    raw = t.contiguous().view(BITS[t.dtype]).to(torch.int64)
    width = 32 if t.dtype == torch.float32 else 16
    raw = raw & ((1 << width) - 1)
    sign = raw >> (width - 1)
    magnitude = raw & ((1 << (width - 1)) - 1)
    return torch.where(sign == 1, -magnitude, magnitude)


MERGEKIT_RTOL, MERGEKIT_ATOL = 1e-5, 1e-6  # fp32 sums in another order: a few ulps


def assert_same_as_mergekit(case: str, from_yaml: dict, from_flags: dict, theirs: dict) -> None:
    """Our merge from a mergekit YAML equals mergekit's within fp32 rounding, and the same merge given by flags
    has the YAML's bytes."""
    assert set(from_yaml) == set(theirs) == set(from_flags)
    worst = max((from_yaml[k] - theirs[k]).abs().max().item() for k in theirs)
    print(f"{case}: max |ours - mergekit| = {worst:.3g}")
    for name in theirs:
        torch.testing.assert_close(
            from_yaml[name],
            theirs[name],
            rtol=MERGEKIT_RTOL,
            atol=MERGEKIT_ATOL,
            msg=lambda m, n=name: f"{case} {n}: {m}",
        )
        assert torch.equal(from_flags[name], from_yaml[name]), f"{case} {name}: flags and YAML differ"


_MERGEKIT_RUNNER = """
import sys
from mergekit.scripts.run_yaml import main
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
    main([config, out, "--no-copy-tokenizer"], standalone_mode=False)
"""


def run_mergekit(root, configs: dict[str, dict]) -> None:
    """Writes each config as root/<name>.yml and runs mergekit itself on all of them in one subprocess (its
    import dominates the time), its outputs in root/<name>-mergekit; offline."""
    import sys

    import yaml

    argv = []
    for name, config in configs.items():
        (root / f"{name}.yml").write_text(yaml.safe_dump(config))
        argv += [str(root / f"{name}.yml"), str(root / f"{name}-mergekit")]
    subprocess.run(
        [sys.executable, "-c", _MERGEKIT_RUNNER, *argv],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def merge_cli_error(pop, out, capsys, argv: list[str], n_models: int = 2) -> str:
    """The error `python -m evolver_kernels.merge` prints for argv with the tiny population's base (and its
    first n_models models unless argv names them: "{m0}", "{m1}" stand for the first two); exit code 2."""
    from evolver_kernels.merge import main

    m = pop.models
    if "--models" not in argv:
        argv = [*argv, "--models", *m[:n_models]]
    argv = [a.format(m0=m[0], m1=m[1]) for a in argv]
    assert main([*argv, "--base", pop.base, "--out", str(out)]) == 2
    return capsys.readouterr().err


def random_population(
    shapes: dict[str, tuple[int, ...]], n: int, seed: int = 0, sparse: float = 0.0, dtype: torch.dtype = torch.float32
):
    """(layout, population, base): n models around a seeded N(0, 1) base, each moved by 0.3 N(0, 1); with
    `sparse`, each model changes only that random fraction of the elements."""
    from evolver_kernels.storage.arena import Arena, Layout
    from evolver_kernels.storage.population import MemoryPopulation

    layout = Layout.from_params(((k,), dtype, s) for k, s in shapes.items())
    gen = torch.Generator().manual_seed(seed)
    pop = MemoryPopulation(layout, n, "cpu")
    base = Arena.empty(layout)
    for e in layout.entries:
        base.view(e).copy_(torch.randn(e.shape, generator=gen))
        for a in pop.arenas:
            changed = torch.rand(e.shape, generator=gen) < sparse if sparse else torch.ones(e.shape, dtype=torch.bool)
            a.view(e).copy_(base.view(e).float() + torch.where(changed, 0.3 * torch.randn(e.shape, generator=gen), 0.0))
    return layout, pop, base


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    g = got.contiguous().view(BITS[got.dtype])
    w = want.contiguous().view(BITS[want.dtype])
    bad = (g != w).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.numel()} elements differ in bits, first at {bad[:5].flatten().tolist()}"


def assert_within_one_ulp(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Values within 1 ulp of the output dtype; NaN where the reference is NaN; +0 and -0 both zero."""
    assert got.dtype == want.dtype and got.shape == want.shape
    g64, w64 = got.double(), want.double()
    both_nan = torch.isnan(g64) & torch.isnan(w64)
    equal = (g64 == w64) | both_nan
    close = (bits(got) - bits(want)).abs() <= 1
    ok = equal | (close & ~torch.isnan(g64) & ~torch.isnan(w64))
    bad = (~ok).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} elements beyond 1 ulp, first at {bad[:5].tolist()}: "
        f"got {got.flatten()[bad[:5]].tolist()} want {want.flatten()[bad[:5]].tolist()}"
    )


def cuobjdump(*args: str) -> str:
    """stdout of the cuobjdump that ships with Triton's CUDA backend (no CUDA toolkit or GPU needed)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, *args], check=True, capture_output=True, text=True).stdout


def resource_usage(path: str) -> list[tuple[str, dict[str, int]]]:
    """[(kernel, {"reg", "stack", "shared", "local"})] for every kernel of every architecture in a cubin or a
    library (cuobjdump -res-usage): registers per thread, stack, shared and local memory (spills) in bytes."""
    return [
        (name, {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", fields)})
        for name, fields in re.findall(r"Function (\S+?):?\n\s*(REG:.*)", cuobjdump("-res-usage", path))
    ]


# -- torchrun on this machine (gloo ranks): the runs of several processes --


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun_env(shm) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "EVOLVER_PROGRESS": "0", "EVOLVER_SHM_DIR": str(shm)}


def torchrun(
    argv: list[str],
    shm,
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    port: int | None = None,
    script: list[str] | None = None,
) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--nnodes={nnodes}",
        f"--node_rank={node_rank}",
        "--master_addr=127.0.0.1",
        f"--master_port={port or free_port()}",
        *(script or ["-m", "evolver_kernels.evolve"]),
        *argv,
    ]
    return subprocess.Popen(command, env=_torchrun_env(shm), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return err
