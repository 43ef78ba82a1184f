"""Memory and time of a one-shot merge of N Llama-shaped bf16 models: ours (streamed through the fused merge)
against stacking (what mergekit's generalized task arithmetic and peft's merge_utils do per tensor: stack the
N task vectors, a torch.bernoulli mask for DARE, top-k by sorting for TIES), each in its own process.

    python benchmarks/merge_memory.py --size 125m --n 5 --methods average ties dare_ties

The models are flat safetensors files read through memory maps in both pipelines (page cache, not counted),
and both write the merged model into one in-memory copy. Peak = anonymous RSS above the process's baseline
(CPU, sampled every 2 ms) or max_memory_allocated (GPU), reported in bytes and in model copies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from evolver_kernels.kernels.reference import naive_merge
from evolver_kernels.methods import merger as merging
from evolver_kernels.storage.arena import Arena
from evolver_kernels.storage.population import DiskPopulation
from evolver_kernels.testing.synthetic import SIZES, AnonPeak, llama_layout, synthetic_population

DENSITY, DROP_P, SCALE = 0.3, 0.3, 1.0


def _population(size: str, n: int, root: str):
    """n + 1 individuals on disk (the last is the base model), written once and reused across runs."""
    layout = llama_layout(size)
    if not os.path.exists(os.path.join(root, f"ind{n}.safetensors")):
        synthetic_population(layout, n + 1, "disk", root=root)
    return layout, DiskPopulation(layout, n + 1, root)


def run_ours(method: str, size: str, n: int, device: str, root: str) -> dict:
    layout, disk = _population(size, n, root)
    from evolver_kernels.storage.population import PopulationPrefix

    pop = PopulationPrefix(disk, n)
    base = Arena(layout, {g: disk.read(n, g, 0, s).to(device) for g, (_, s) in layout.groups.items()})
    out = Arena.empty(layout, device)
    start = time.perf_counter()
    if method == "average":
        merging.average(pop, out)
    elif method == "task_arithmetic":
        merging.task_arithmetic(pop, base, out, SCALE)
    else:
        merging.ties(pop, base, out, DENSITY, SCALE, drop_p=DROP_P if method == "dare_ties" else 0.0)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start}


def run_stacking(method: str, size: str, n: int, device: str, root: str) -> dict:
    layout, disk = _population(size, n, root)
    out = Arena.empty(layout, device)
    start = time.perf_counter()
    for e in layout.entries:
        lo, hi = e.offset, e.offset + e.numel
        xs = [disk.read(k, e.group, lo, hi).to(device).view(e.shape) for k in range(n)]
        base = disk.read(n, e.group, lo, hi).to(device).view(e.shape)
        if method == "average":
            merged = naive_merge(xs, weights=[1.0] * n)
        elif method == "task_arithmetic":
            merged = naive_merge(xs, weights=[1.0] * n, base=base, scale=SCALE)
        else:
            merged = naive_merge(
                xs,
                weights=[1.0] * n,
                base=base,
                density=DENSITY,
                scale=SCALE,
                drop_p=DROP_P if method == "dare_ties" else 0.0,
            )
        out.view(e).copy_(merged)
        del xs, merged
    if device == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start}


def child(pipeline: str, method: str, size: str, n: int, device: str, root: str) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    _population(size, n, root)  # written before measuring
    baseline = AnonPeak.now()
    sampler = AnonPeak()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = (run_ours if pipeline == "ours" else run_stacking)(method, size, n, device, root)
    result["peak_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else sampler.stop() - baseline
    print(json.dumps(result))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="125m", choices=list(SIZES))
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["average", "task_arithmetic", "ties", "dare_ties"],
        choices=["average", "task_arithmetic", "ties", "dare_ties"],
    )
    parser.add_argument("--root", default=None, help="where the models' files go (default: a temporary directory)")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    root = args.root or os.path.join(tempfile.gettempdir(), f"evolver-merge-{args.size}-n{args.n}")
    if args.child:
        child(*args.child, args.size, args.n, args.device, root)
        return
    copy_bytes = llama_layout(args.size).nbytes
    results = {}
    print(
        f"one-shot merge of N = {args.n} {args.size}-shaped bf16 models (one copy {copy_bytes / 2**30:.2f} GiB) on "
        f"{args.device}; ties/dare_ties: density {DENSITY}, dare drop p {DROP_P}"
    )
    print("| method | pipeline | peak GiB | model copies | seconds |\n| --- | --- | --- | --- | --- |")
    for method in args.methods:
        for pipeline in ("ours", "stacking"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    pipeline,
                    method,
                    "--size",
                    args.size,
                    "--n",
                    str(args.n),
                    "--device",
                    args.device,
                    "--root",
                    root,
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                r = {"error": (out.stderr or "")[-300:] or f"exit code {out.returncode}"}
                print(f"| {method} | {pipeline} | failed: {r['error'][-100:]!r} | | |")
            else:
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r["copies"] = r["peak_bytes"] / copy_bytes
                print(
                    f"| {method} | {pipeline} | {r['peak_bytes'] / 2**30:.3f} | {r['copies']:.2f} | {r['seconds']:.2f} |"
                )
            results[f"{method}/{pipeline}"] = r
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "size": args.size,
                    "n": args.n,
                    "device": args.device,
                    "copy_bytes": copy_bytes,
                    "density": DENSITY,
                    "drop_p": DROP_P,
                    "results": results,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
