"""Peak node memory of `torchrun --nproc_per_node K -m evolver_kernels.evolve` with the population held once per
node (this checkout) against one copy per rank (an older commit, run from a git worktree), same models, same
options, one after the other; the memory plan each run printed beside it.

    python benchmarks/node_memory.py --cache .cache --ranks 2 4 --baseline 07b7222

Models: the drug-review demo's 4 MiniLM experts (python/drug_population.py; fp32, 90.9 MB each), built into
--cache when missing. Options: --fitness individual --schedule synchronous --population-on cpu, 1 generation,
16 dev examples per file (the memory does not depend on how long the run evaluates). Node memory is sampled
every 20 ms: the anonymous memory (RssAnon) of torchrun and all its descendants plus the growth of the machine's
shared memory (Shmem in /proc/meminfo) since just before the run, so pages mapped by several ranks count once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/meminfo")


def _tree(root: int) -> list[int]:
    """root and its descendants (from /proc/<pid>/stat's parent pid)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def _anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class NodePeak:
    """Peak of (RssAnon of the process tree) + (Shmem growth), sampled every 20 ms until stop()."""

    def __init__(self, pid: int):
        self.pid, self.shmem0, self.peak, self.peak_shmem = pid, _meminfo("Shmem"), 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            shmem = max(0, _meminfo("Shmem") - self.shmem0)
            total = sum(_anon(p) for p in _tree(self.pid)) + shmem
            if total > self.peak:
                self.peak, self.peak_shmem = total, shmem

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peak, self.peak_shmem


def run(checkout: str, manifest: dict, ranks: int, out: str, extra: tuple[str, ...] = ()) -> dict:
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        "--master_port=29517",
        "-m",
        "evolver_kernels.evolve",
        "--models",
        *manifest["experts"],
        "--dev",
        *manifest["dev"],
        "--out",
        out,
        "--fitness",
        "individual",
        "--schedule",
        "synchronous",
        "--population-on",
        "cpu",
        "--generations",
        "1",
        "--max-dev-examples",
        "16",
        "--max-length",
        "128",
        "--seed",
        "0",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": checkout, "OMP_NUM_THREADS": "1", "EVOLVER_PROGRESS": "0"}
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = NodePeak(child.pid)
    _, err = child.communicate()
    peak, shmem = sampler.stop()
    if child.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    plan = re.search(r"needs: host ([\d.]+ [KMG]iB)", err)
    return {
        "peak_bytes": peak,
        "shmem_bytes": shmem,
        "seconds": time.perf_counter() - start,
        "plan_host": plan.group(1) if plan else None,
        "plan": next((ln for ln in err.splitlines() if ln.startswith("memory plan")), ""),
    }


def worktree(commit: str) -> str:
    """A checkout of `commit` that runs with this checkout's compiled extensions (same C++ sources)."""
    path = os.path.join(tempfile.gettempdir(), f"evolver-baseline-{commit}")
    if not os.path.isdir(path):
        subprocess.run(
            ["git", "-C", ROOT, "worktree", "add", "--detach", path, commit], check=True, capture_output=True
        )
    for name in os.listdir(os.path.join(ROOT, "evolver_kernels")):
        if name.endswith(".so"):
            shutil.copy2(os.path.join(ROOT, "evolver_kernels", name), os.path.join(path, "evolver_kernels", name))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=".cache")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--baseline", default="07b7222", help="a commit that holds one population copy per rank")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    import drug_population

    manifest = drug_population.build(
        os.path.join(args.cache, "drug-population"), log=lambda m: print(m, file=sys.stderr)
    )
    copy = sum(os.path.getsize(os.path.join(e, "model.safetensors")) for e in manifest["experts"][:1])
    old = worktree(args.baseline)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ranks:
            # the same command with --dry-run: K interpreters with torch, the tokenizer and the dev data, no weights
            dry = run(ROOT, manifest, k, os.path.join(tmp, f"{k}-dry"), ("--dry-run",))
            print(f"{k} ranks, --dry-run: {dry['peak_bytes'] / 2**30:.2f} GiB", flush=True)
            results.append({**dry, "ranks": k, "population": "none (--dry-run)", "copies": dry["peak_bytes"] / copy})
            for name, checkout in (("once per node", ROOT), (f"per rank ({args.baseline})", old)):
                r = run(checkout, manifest, k, os.path.join(tmp, f"{k}-{len(results)}"))
                r.update(
                    ranks=k,
                    population=name,
                    copies=r["peak_bytes"] / copy,
                    above_dry_run_copies=(r["peak_bytes"] - dry["peak_bytes"]) / copy,
                )
                results.append(r)
                print(
                    f"{k} ranks, population {name}: peak node memory {r['peak_bytes'] / 2**30:.2f} GiB "
                    f"({r['above_dry_run_copies']:.1f} model copies above the --dry-run; shared memory "
                    f"{r['shmem_bytes'] / 2**30:.2f} GiB), "
                    f"plan's host need {r['plan_host']}, {r['seconds']:.0f} s",
                    flush=True,
                )
    print(f"one model copy: {copy / 2**20:.1f} MiB; N = {len(manifest['experts'])}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"copy_bytes": copy, "runs": results}, f, indent=2)


if __name__ == "__main__":
    main()
