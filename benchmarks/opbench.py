"""Operator benchmark: every backend of de_mutate_crossover side by side with naive PyTorch, the
contract-exact reference and a plain copy moving the same bytes, in one process.

    python benchmarks/opbench.py                      # CPU: sizes 2**16 .. 2**26, fp32 and bf16
    python benchmarks/opbench.py --device cuda        # GPU: sizes up to 2**30, CUDA-event medians

Each row: median time, achieved GB/s (bytes the op must move: each distinct input once, the output once),
the fraction of the copy bandwidth measured at the same byte count in the same run, the speed-up over
naive PyTorch, and the memory allocated beyond `out` (CPU: torch profiler allocation events; GPU:
max_memory_allocated). Results go to a JSON file; `--plot` draws GB/s against size (the roofline plot).
Benchmarks are not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import evolver_kernels as ek
from evolver_kernels.kernels.reference import de_mutate_crossover_reference, naive_de_mutate_crossover

STRATEGY_INPUTS = {"evolver": 2, "rand/1": 4}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def machine() -> dict:
    info = {"platform": platform.platform(), "cpu_cores": os.cpu_count(), "torch": torch.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except OSError:
        info["commit"] = "unknown"
    return info


def rotation_count(set_bytes: int, device: str) -> int:
    """How many input sets to rotate through so that one round moves over four times the GPU's L2 (a warm L2
    would hold small cases and overstate their bandwidth); 1 on the CPU, where the recorded CPU tables use one
    set at every size."""
    if device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or 50 << 20
    return max(1, min(64, -(-4 * l2 // set_bytes)))


class Case:
    """Inputs for one (size, dtype, strategy), drawn on the device (randn: never zeros), each set with its own
    output; on a GPU enough sets rotate that every call reads from and writes to device memory, not L2."""

    def __init__(self, n: int, dtype: torch.dtype, strategy: str, device: str):
        gen = torch.Generator(device=device).manual_seed(n)
        self.n, self.dtype, self.strategy = n, dtype, strategy
        k = STRATEGY_INPUTS[strategy]
        element = torch.empty((), dtype=dtype).element_size()
        self.bytes_moved = (k + 1) * n * element
        self.sets = []
        for _ in range(rotation_count(self.bytes_moved, device)):
            ts = [torch.randn(n, generator=gen, device=device).to(dtype) for _ in range(k)]
            self.sets.append((ts, torch.empty(n, dtype=dtype, device=device)))
        self._turn = 0
        self.out = self.sets[0][1]

    def args(self):
        """The next set's inputs in de_mutate_crossover's order (x, base, a, b); self.out becomes its output."""
        ts, self.out = self.sets[self._turn % len(self.sets)]
        self._turn += 1
        if self.strategy == "evolver":
            x, a = ts
            return x, x, a, x
        return tuple(ts)


def op_fn(case: Case, impl: str):
    def call():
        x, base, a, b = case.args()  # selects the next set, and with it case.out
        if impl == "naive":
            return naive_de_mutate_crossover(x, base, a, b, F=0.5, CR=0.5)
        if impl == "reference":
            return de_mutate_crossover_reference(x, base, a, b, F=0.5, CR=0.5, seed=1, out=case.out)
        return ek.de_mutate_crossover(x, base, a, b, F=0.5, CR=0.5, seed=1, out=case.out, backend=impl)

    return call


def copy_fn(case: Case):
    """A plain copy moving the op's byte count (read half, write half), rotated like the op's inputs."""
    half = case.bytes_moved // 2 // case.out.element_size()
    device = case.out.device.type
    pairs = [
        (torch.randn(half, device=device).to(case.dtype), torch.empty(half, dtype=case.dtype, device=device))
        for _ in range(rotation_count(case.bytes_moved, device))
    ]
    turns = itertools.count()

    def copy():
        src, dst = pairs[next(turns) % len(pairs)]
        return dst.copy_(src)

    return copy


def time_fn(fn, device: str, min_time: float = 0.2, max_reps: int = 50) -> float:
    """Median seconds per call."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        samples = []
        start_t = time.perf_counter()
        while len(samples) < max_reps and (time.perf_counter() - start_t < min_time or len(samples) < 5):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            samples.append(s.elapsed_time(e) / 1e3)
        return statistics.median(samples)
    samples = []
    start_t = time.perf_counter()
    while len(samples) < max_reps and (time.perf_counter() - start_t < min_time or len(samples) < 3):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def extra_bytes(fn, device: str, out_bytes: int, returns_new: bool) -> int:
    """Bytes allocated by one call beyond the output (the output counts when the call allocates it)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - before
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        used = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
    return max(used - (out_bytes if returns_new else 0), 0)


def run(
    device: str,
    sizes: list[int],
    dtypes: list[str],
    strategies: list[str],
    impls: list[str],
    threads: int | None,
    reference_max: int,
):
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for dname in dtypes:
        for strategy in strategies:
            for n in sizes:
                case = Case(n, DTYPES[dname], strategy, device)
                t_copy = time_fn(copy_fn(case), device)
                copy_gbs = case.bytes_moved / t_copy / 1e9
                t_naive = None
                for impl in impls:
                    if impl == "reference" and n > reference_max:
                        continue  # the oracle builds int64 Philox tensors: seconds per call at these sizes
                    fn = op_fn(case, impl)
                    t = time_fn(fn, device)
                    if impl == "naive":
                        t_naive = t
                    gbs = case.bytes_moved / t / 1e9
                    row = {
                        "device": device,
                        "dtype": dname,
                        "strategy": strategy,
                        "numel": n,
                        "impl": impl,
                        "ms": t * 1e3,
                        "GB/s": gbs,
                        "copy GB/s": copy_gbs,
                        "copy fraction": gbs / copy_gbs,
                        "speedup vs naive": (t_naive / t) if t_naive else None,
                        "extra bytes": extra_bytes(fn, device, n * case.out.element_size(), impl == "naive"),
                    }
                    rows.append(row)
                    print(format_row(row), flush=True)
                del case
    return rows


def format_row(r: dict) -> str:
    sp = f"{r['speedup vs naive']:.1f}x" if r["speedup vs naive"] else "-"
    return (
        f"| {r['device']} | {r['dtype']} | {r['strategy']} | 2^{r['numel'].bit_length() - 1} | {r['impl']} | "
        f"{r['ms']:.3f} | {r['GB/s']:.1f} | {100 * r['copy fraction']:.0f}% | {sp} | {r['extra bytes'] / 2**20:.1f} |"
    )


HEADER = (
    "| device | dtype | strategy | numel | impl | ms (median) | GB/s | of copy | vs naive | extra MiB |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r["dtype"], r["strategy"]) for r in rows})
    fig, axes = plt.subplots(1, len(combos), figsize=(4.5 * len(combos), 3.6), dpi=110, squeeze=False)
    for ax, (dname, strategy) in zip(axes[0], combos):
        sel = [r for r in rows if r["dtype"] == dname and r["strategy"] == strategy]
        for impl in sorted({r["impl"] for r in sel}):
            pts = sorted((r["numel"], r["GB/s"]) for r in sel if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        copy = sorted({(r["numel"], r["copy GB/s"]) for r in sel})
        ax.plot([p[0] for p in copy], [p[1] for p in copy], "k--", label="copy (ceiling)")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dname}, {strategy}")
        ax.set_xlabel("elements")
        ax.set_ylabel("GB/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--min-exp", type=int, default=16)
    parser.add_argument("--max-exp", type=int, default=None, help="default 26 on cpu, 30 on cuda")
    parser.add_argument("--step", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--strategies", nargs="+", default=["evolver", "rand/1"], choices=list(STRATEGY_INPUTS))
    parser.add_argument(
        "--impls", nargs="+", default=None, help="default: naive, reference, then every compiled backend"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reference-max-exp", type=int, default=22, help="time the reference up to this size")
    parser.add_argument(
        "--json", default=None, help="where to write the rows (default benchmarks/results/ops-<device>.json)"
    )
    parser.add_argument("--plot", default=None, help="PNG of GB/s against size")
    args = parser.parse_args(argv)
    max_exp = args.max_exp or (26 if args.device == "cpu" else 30)
    sizes = [2**e for e in range(args.min_exp, max_exp + 1, args.step)]
    if sizes[-1] != 2**max_exp:
        sizes.append(2**max_exp)
    backends = [b for b in ek.available_backends(args.device) if b != "reference"]
    if args.device == "cpu":
        backends = [
            b for b in backends if b != "triton"
        ]  # the interpreter is a correctness tool, not a backend to time
    impls = args.impls or ["naive", "reference"] + backends
    if "naive" in impls:
        impls = ["naive"] + [i for i in impls if i != "naive"]
    print(HEADER)
    rows = run(args.device, sizes, args.dtypes, args.strategies, impls, args.threads, 2**args.reference_max_exp)
    doc = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "command": " ".join(["python", "benchmarks/opbench.py"] + (argv if argv is not None else sys.argv[1:])),
        "rows": rows,
    }
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"ops-{args.device}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    if args.plot:
        plot(rows, args.plot)
    print(f"\nwrote {path}" + (f" and {args.plot}" if args.plot else ""))


if __name__ == "__main__":
    main()
