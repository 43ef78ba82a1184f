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
import time

import torch

SIZES = {  # hidden, intermediate, layers, vocab, heads, kv heads
    "tiny": (256, 688, 4, 32000, 4, 4),
    "125m": (768, 2048, 12, 32000, 12, 12),
    "1b": (2048, 5632, 22, 32000, 32, 4),
    "7b": (4096, 11008, 32, 32000, 32, 32),
}


def llama_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, layers, vocab, heads, kv = SIZES[size]
    kv_dim = h // heads * kv
    shapes = [("model.embed_tokens.weight", (vocab, h)), ("lm_head.weight", (vocab, h)), ("model.norm.weight", (h,))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv_dim, h)),
            (p + "self_attn.v_proj.weight", (kv_dim, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)), (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    return shapes


def fill(t: torch.Tensor, seed: int) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    for lo in range(0, t.numel(), 1 << 20):
        hi = min(lo + (1 << 20), t.numel())
        t.view(-1)[lo:hi].copy_(torch.randn(hi - lo, generator=g))


def synthetic_fitness(values: torch.Tensor) -> float:
    """Cheap and deterministic: a strided sample's mean (stands in for an evaluation pass)."""
    return float(values.view(-1)[:: 4099].float().mean())


def run_ours(size: str, n: int, device: str) -> dict:
    from evolver_kernels.arena import Arena, Layout
    from evolver_kernels.offspring import OffspringSpec, WeightPipeline
    from evolver_kernels.population import MemoryPopulation

    layout = Layout.from_params(((name,), torch.bfloat16, shape) for name, shape in llama_shapes(size))
    pop = MemoryPopulation(layout, n, device)
    for i, arena in enumerate(pop.arenas):
        for buf in arena.buffers.values():
            fill(buf, i)
    arena = Arena.empty(layout, device)
    pipe = WeightPipeline(pop, torch.device(device))
    group = next(iter(layout.groups))
    pipe.merged_into(arena)
    best = synthetic_fitness(arena.buffers[group])
    start = time.perf_counter()
    for i in range(n):
        spec = OffspringSpec(i=i, strategy="evolver", picks=((i + 1) % n,), F=0.5, CR=0.5, seed=1000 + i)
        pipe.merged_into(arena, replace=[spec])
        score = synthetic_fitness(arena.buffers[group])
        if score > best:
            pipe.apply([spec])
            best = score
    if device == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "numel": layout.numel}


def run_reference(size: str, n: int, device: str) -> dict:
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
    best = synthetic_fitness(torch.stack(pop).mean(0))
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        r = (i + 1) % n
        v = (1 - 0.5) * pop[i] + 0.5 * pop[r]
        mask = (torch.rand(numel, generator=gen) < 0.5).to(device)
        u = torch.where(mask, v, pop[i])
        candidate = [u if k == i else pop[k] for k in range(n)]
        merged = torch.stack(candidate).mean(0)
        score = synthetic_fitness(merged)
        if score > best:
            pop[i] = u
            best = score
        del v, mask, merged, candidate
    if device == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "numel": numel}


def child(mode: str, size: str, n: int, device: str) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = (run_ours if mode == "ours" else run_reference)(size, n, device)
    if device == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        result["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    print(json.dumps(result))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="125m", choices=list(SIZES))
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--modes", nargs="+", default=["ours", "reference"], choices=["ours", "reference"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.size, args.n, args.device)
        return
    copy_bytes = sum(torch.Size(s).numel() for _, s in llama_shapes(args.size)) * 2
    results = {}
    for mode in args.modes:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--size", args.size, "--n", str(args.n),
                              "--device", args.device], capture_output=True, text=True)
        if out.returncode != 0:
            results[mode] = {"error": (out.stderr or "")[-500:] or f"exit code {out.returncode} (killed: out of memory?)"}
        else:
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["copies"] = r["peak_bytes"] / copy_bytes
            results[mode] = r
    print(f"| pipeline | size | N | one copy GiB | peak GiB | model copies | generation s |\n| --- | --- | --- | --- | --- | --- | --- |")
    for mode, r in results.items():
        if "error" in r:
            print(f"| {mode} | {args.size} | {args.n} | {copy_bytes / 2**30:.2f} | failed: {r['error'][-120:]!r} | | |")
            continue
        print(f"| {mode} | {args.size} | {args.n} | {copy_bytes / 2**30:.2f} | {r['peak_bytes'] / 2**30:.2f} | "
              f"{r['copies']:.2f} | {r['seconds']:.2f} |")
    if all("copies" in results.get(m, {}) for m in ("ours", "reference")):
        print(f"\nreference / ours peak memory: {results['reference']['peak_bytes'] / results['ours']['peak_bytes']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "n": args.n, "device": args.device, "copy_bytes": copy_bytes,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
