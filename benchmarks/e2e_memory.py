"""End-to-end memory of one generation on a synthetic population of Llama-shaped bf16 models.

    python benchmarks/e2e_memory.py --size 125m --n 5          # both pipelines, each in its own process

(a) this package: population arenas, offspring written into the evaluation arena, the merged candidate
    streamed in chunks (fitness "merged", sequential schedule);
(b) the reference code's way (duguodong7/model-evolution): every model flattened to one fp32 vector, the
    crossover mask drawn on the host with torch.rand, the merged candidate by stacking the population.
Both score candidates with the same cheap synthetic fitness, so memory and time are the weight side only.
Reports peak RSS above the process's baseline (CPU) or max_memory_allocated (GPU), in GiB and in
model-sized copies (one copy = the bf16 model), and the time of the generation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from evolver_kernels.testing.synthetic import (
    SIZES,
    AnonPeak,
    llama_layout,
    llama_shapes,
    sample_score,
    synthetic_population,
    weight_generation,
)


def fill(t: torch.Tensor, seed: int) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    for lo in range(0, t.numel(), 1 << 20):
        hi = min(lo + (1 << 20), t.numel())
        t.view(-1)[lo:hi].copy_(torch.randn(hi - lo, generator=g))


def _io() -> dict[str, int]:
    """Bytes this process has read from and written to storage so far (/proc/self/io)."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


STAGING = os.environ.get("EVOLVER_STAGING")  # "0": no double buffering (to measure what the overlap buys)


def run_ours(size: str, n: int, device: str, tier: str, root: str) -> dict:
    layout = llama_layout(size)
    pop = synthetic_population(layout, n, tier, root=root, device=device)
    if tier == "disk":
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:  # measure the generation's reads, not the page cache
            f.write("1\n")
    io_before = _io()
    start = time.perf_counter()
    accepted = weight_generation(pop, device, staging=None if STAGING is None else STAGING != "0")
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    io_after = _io()
    return {
        "seconds": seconds,
        "numel": layout.numel,
        "accepted": accepted,
        "disk_read_bytes": io_after["read_bytes"] - io_before["read_bytes"],
        "disk_write_bytes": io_after["write_bytes"] - io_before["write_bytes"],
    }


def run_reference(size: str, n: int, device: str, tier: str, root: str) -> dict:
    """The reference code's data flow: fp32 flat vectors, host mask, stacked merge."""
    shapes = llama_shapes(size)
    numel = sum(torch.Size(s).numel() for _, s in shapes)
    models = []
    for i in range(n):  # each model as loaded (bf16 state dict), as the reference holds its models
        sd = {name: torch.empty(shape, dtype=torch.bfloat16, device=device) for name, shape in shapes}
        for t in sd.values():
            fill(t, i)
        models.append(sd)
    pop = [torch.cat([t.reshape(-1).float() for t in sd.values()]) for sd in models]  # models_to_pop
    best = sample_score(torch.stack(pop).mean(0))
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        r = (i + 1) % n
        v = (1 - 0.5) * pop[i] + 0.5 * pop[r]
        mask = (torch.rand(numel, generator=gen) < 0.5).to(device)
        u = torch.where(mask, v, pop[i])
        candidate = [u if k == i else pop[k] for k in range(n)]
        merged = torch.stack(candidate).mean(0)
        score = sample_score(merged)
        if score > best:
            pop[i] = u
            best = score
        del v, mask, merged, candidate
    if device == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "numel": numel}


def child(mode: str, size: str, n: int, device: str, tier: str, root: str) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    base = AnonPeak.now()
    sampler = AnonPeak()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = (run_ours if mode == "ours" else run_reference)(size, n, device, tier, root)
    result.setdefault("disk_read_bytes", 0)
    result.setdefault("disk_write_bytes", 0)
    result["seconds_per_offspring"] = result["seconds"] / n
    result["peak_anon_bytes"] = sampler.stop() - base
    result["peak_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else result["peak_anon_bytes"]
    result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="125m", choices=list(SIZES))
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--modes", nargs="+", default=["ours", "reference"], choices=["ours", "reference"])
    parser.add_argument("--tier", default="cpu", choices=["gpu", "cpu", "disk"], help="population tier for ours")
    parser.add_argument("--root", default=None, help="disk tier directory (default: a temporary one)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.size, args.n, args.device, args.tier, args.root)
        return
    root = args.root or tempfile.mkdtemp(prefix="evolver-e2e-")
    copy_bytes = sum(torch.Size(s).numel() for _, s in llama_shapes(args.size)) * 2
    print(
        f"generation: the weight side of one generation on N = {args.n} {args.size}-shaped models; disk traffic "
        "counts the generation only (the page cache is dropped after the population is written)"
    )
    results = {}
    for mode in args.modes:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--size",
                args.size,
                "--n",
                str(args.n),
                "--device",
                args.device,
                "--tier",
                args.tier,
                "--root",
                root,
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            results[mode] = {
                "error": (out.stderr or "")[-500:] or f"exit code {out.returncode} (killed: out of memory?)"
            }
        else:
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["copies"] = r["peak_bytes"] / copy_bytes
            results[mode] = r
    print(
        "| pipeline | tier | size | N | one copy GiB | peak GiB | model copies | generation s | s / offspring "
        "| disk read GiB | disk write GiB |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for mode, r in results.items():
        if "error" in r:
            print(
                f"| {mode} | {args.tier} | {args.size} | {args.n} | {copy_bytes / 2**30:.2f} | failed: {r['error'][-120:]!r} | | |"
            )
            continue
        tier = args.tier if mode == "ours" else "-"
        print(
            f"| {mode} | {tier} | {args.size} | {args.n} | {copy_bytes / 2**30:.2f} | {r['peak_bytes'] / 2**30:.2f} | "
            f"{r['copies']:.2f} | {r['seconds']:.2f} | {r['seconds_per_offspring']:.2f} | "
            f"{r['disk_read_bytes'] / 2**30:.2f} | {r['disk_write_bytes'] / 2**30:.2f} |"
        )
    if all("copies" in results.get(m, {}) for m in ("ours", "reference")):
        print(
            f"\nreference / ours peak memory: {results['reference']['peak_bytes'] / results['ours']['peak_bytes']:.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "size": args.size,
                    "n": args.n,
                    "device": args.device,
                    "tier": args.tier,
                    "copy_bytes": copy_bytes,
                    "results": results,
                },
                f,
                indent=2,
            )
    if "error" in results.get("ours", {}):
        sys.exit(1)  # the reference running out of memory is a result; ours failing is not


if __name__ == "__main__":
    main()
