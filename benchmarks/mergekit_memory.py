"""Peak memory and time of a one-shot merge of N Llama-shaped bf16 models, for every merge method we share with
mergekit: `python -m evolver_kernels.merge` and mergekit itself (`mergekit-yaml`), on the same YAML file and
the same model directories, each run in its own process, one after the other.

    python benchmarks/mergekit_memory.py --size 125m --n 5
    python benchmarks/mergekit_memory.py --methods ties slerp --json benchmarks/results/mergekit-memory.json
    python benchmarks/mergekit_memory.py --size 7b --layers 4 --n 3     # a 7B's tensors, 4 of its 32 layers

The models are N + 1 Hugging Face directories (the last is the base model) with random bf16 weights, written
once under --root, tensor by tensor (`--layers` keeps every tensor's shape and takes fewer layers, so that 7B-shaped
models fit the disk). Peak = anonymous RSS above the process's baseline (RssAnon, sampled every 2 ms): what the
merge holds beyond the page cache its memory-mapped reads use. Both tools write the merged model to --root; disk =
the most bytes allocated under the output directory while the merge runs (its scratch files included).
The merged tensors of the two tools are compared too (max |difference| over all tensors), so a row whose
results disagree shows it. The I/O roofline is measured in the same run, per method: the input files it reads,
read once with their page cache emptied (posix_fadvise DONTNEED), and one file of the output's size written and
synced; each merge starts from an emptied page cache too, and is given as a multiple of that roofline, timed
both with the tool's imports done before the clock and as the whole command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import torch
import yaml

from evolver_kernels.testing.synthetic import SIZES, AnonPeak, PeakSampler

# method: (global parameters, per-model parameters, models used: None = all N, base_model needed)
CASES: dict[str, tuple[dict, dict, int | None, bool]] = {
    "linear": ({}, {"weight": 1.0}, None, False),
    "task_arithmetic": ({"lambda": 0.8}, {"weight": 1.0}, None, True),
    "ties": ({"density": 0.3}, {"weight": 1.0}, None, True),
    "slerp": ({"t": 0.3}, {}, 1, True),  # base_model is slerp's first endpoint
    "nuslerp": ({}, {"weight": 1.0}, 2, False),
    "multislerp": ({}, {"weight": 1.0}, None, False),
    "karcher": ({}, {}, None, False),
    "model_stock": ({}, {}, None, True),
    "breadcrumbs": ({"density": 0.5, "gamma": 0.05}, {"weight": 1.0}, None, True),
    "breadcrumbs_ties": ({"density": 0.5, "gamma": 0.05}, {"weight": 1.0}, None, True),
    "sce": ({"select_topk": 0.5}, {}, None, True),
    "nearswap": ({"t": 0.5}, {}, 1, True),
    "ram": ({}, {}, None, True),
    "ramplus_tl": ({}, {}, None, True),
    "arcee_fusion": ({}, {}, 1, True),
    # mergekit's dare: `density` kept, L1 rescale (ours: della / della_linear with epsilon 0, Philox drops)
    "dare_linear": ({"density": 0.5}, {"weight": 1.0}, None, True),
    "dare_ties": ({"density": 0.5}, {"weight": 1.0}, None, True),
    "della": ({"density": 0.5, "epsilon": 0.1}, {"weight": 1.0}, None, True),
    "della_linear": ({"density": 0.5, "epsilon": 0.1}, {"weight": 1.0}, None, True),
    "passthrough": ({}, {}, 2, False),  # layer stacking: the first 2/3 of model 0's layers, the last 2/3 of model 1's
}
RANDOM = ("dare_linear", "dare_ties", "della", "della_linear")  # drops differ by design (Philox vs torch.bernoulli)


def build_models(size: str, n: int, root: str, layers: int | None = None) -> list[str]:
    """n + 1 bf16 Llama directories under root (base last): one random base plus small perturbations, each
    written tensor by tensor (a 7B-shaped model never in memory whole). `layers` overrides the size's layer
    count: every tensor keeps the size's shape."""
    from transformers import LlamaConfig

    from evolver_kernels.io.shards import write_shards
    from evolver_kernels.storage.arena import layer_index
    from evolver_kernels.testing.synthetic import llama_shapes

    hidden, inter, depth, vocab, heads, kv = SIZES[size]
    depth = layers or depth
    dirs = [os.path.join(root, f"model{k}") for k in range(n)] + [os.path.join(root, "base")]
    if all(os.path.isfile(os.path.join(d, "config.json")) for d in dirs):
        return dirs
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=depth,
        vocab_size=vocab,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    shapes = {name: shape for name, shape in llama_shapes(size) if (layer_index(name) or 0) < depth}
    names = sorted(shapes)
    seeds = {name: k for k, name in enumerate(names)}

    def tensor(name: str, model: int | None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seeds[name])
        t = torch.randn(shapes[name], generator=gen) * 0.02
        if model is not None:
            t += 0.01 * torch.randn(shapes[name], generator=gen.manual_seed(1_000_003 * (model + 1) + seeds[name]))
        return t.to(torch.bfloat16)

    for k, d in enumerate(dirs):
        if os.path.isfile(os.path.join(d, "config.json")):
            continue
        model = None if d == dirs[-1] else k
        write_shards(
            d, [(name, torch.bfloat16, shapes[name]) for name in names], lambda name, model=model: tensor(name, model)
        )
        config.save_pretrained(d)  # config.json last: it marks a complete model directory
    return dirs


def merged_dirs(method: str, dirs: list[str]) -> list[str]:
    """The model directories a case merges (dirs: the models, then the base), the base not included."""
    count = CASES[method][2]
    return dirs[:-1] if count is None else dirs[:count]


def write_yaml(method: str, dirs: list[str], path: str) -> None:
    params, per_model, _, with_base = CASES[method]
    models = merged_dirs(method, dirs)
    config = {
        "merge_method": method,
        "dtype": "bfloat16",
        "models": [{"model": m, **({"parameters": per_model} if per_model else {})} for m in models],
    }
    if method == "passthrough":
        with open(os.path.join(models[0], "config.json")) as f:
            layers = json.load(f)["num_hidden_layers"]
        cut = layers * 2 // 3
        del config["models"]
        config["slices"] = [
            {"sources": [{"model": models[0], "layer_range": [0, cut]}]},
            {"sources": [{"model": models[1], "layer_range": [layers - cut, layers]}]},
        ]
    if with_base:
        config["base_model"] = dirs[-1]
    if params:
        config["parameters"] = params
    with open(path, "w") as f:
        yaml.safe_dump(config, f)


def safetensors_of(model_dir: str) -> list[str]:
    return sorted(os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.endswith(".safetensors"))


def drop_cache(paths: list[str]) -> None:
    """Empties the page cache of these files (posix_fadvise DONTNEED: no privilege needed; dirty pages are
    written first), so that the next read of them comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def io_roofline(inputs: list[str], out_dir: str, out_bytes: int, block: int = 64 << 20) -> dict:
    """What the hardware allows a merge: every input file read once from a cold page cache, and one file of the
    output's size written and synced, in this process, timed. Returns seconds for each and their sum."""
    drop_cache(inputs)
    buf = bytearray(block)
    start = time.perf_counter()
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    read_s = time.perf_counter() - start
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, "roofline.bin")
    start = time.perf_counter()
    with open(target, "wb", buffering=0) as f:
        left = out_bytes
        while left > 0:
            left -= f.write(memoryview(buf)[: min(block, left)])
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    drop_cache([target])
    os.remove(target)
    return {"read_s": read_s, "write_s": write_s, "seconds": read_s + write_s}


def allocated_under(root: str) -> int:
    """Bytes allocated under a directory: st_blocks of every file (scratch files included)."""
    total = 0
    for d, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):  # removed while we looked
                total += os.lstat(os.path.join(d, name)).st_blocks * 512
    return total


def child(tool: str, config: str, out: str) -> None:
    """Runs one merge in this process and prints its peak anonymous memory, its peak disk under `out` and its
    seconds."""
    torch.set_num_threads(os.cpu_count() or 1)
    # each tool's modules imported before the baseline: the peak is the merge's, not the libraries'
    if tool == "ours":
        from evolver_kernels.merge import main as ours
    else:
        import mergekit.merge
        from mergekit.scripts.run_yaml import main as mergekit
    baseline = AnonPeak.now()
    sampler, disk = AnonPeak(), PeakSampler(lambda: allocated_under(out), 0.02)
    start = time.perf_counter()
    if tool == "ours":
        code = ours(["--config", config, "--out", out])
    else:
        try:
            mergekit.main([config, out, "--no-copy-tokenizer"], standalone_mode=False)
            code = 0
        except SystemExit as err:
            code = int(err.code or 0)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {"peak_bytes": sampler.stop() - baseline, "disk_bytes": disk.stop(), "seconds": seconds, "code": code}
        )
    )


def max_difference(a: str, b: str) -> float:
    from safetensors.torch import load_file

    def tensors(d):
        out = {}
        for name in sorted(os.listdir(d)):
            if name.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, name)))
        return out

    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys():
        return float("nan")
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="125m", choices=list(SIZES))
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument(
        "--layers", type=int, default=None, help="layers of each model (default: the size's); tensors keep its shapes"
    )
    parser.add_argument("--methods", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--tools", nargs="+", default=["ours", "mergekit"], choices=["ours", "mergekit"])
    parser.add_argument("--root", default=None, help="models and outputs (default: a directory under /tmp)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--keep-outputs", action="store_true", help="keep each method's merged models under --root")
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    shape = args.size if args.layers is None else f"{args.size}-{args.layers}layers"
    root = args.root or os.path.join("/tmp", f"evolver-mergekit-{shape}-n{args.n}")
    dirs = build_models(args.size, args.n, root, args.layers)
    copy_bytes = sum(
        os.path.getsize(os.path.join(dirs[0], f)) for f in os.listdir(dirs[0]) if f.endswith(".safetensors")
    )
    print(f"one-shot merge of {args.n} {shape}-shaped bf16 Llama models (one copy {copy_bytes / 2**30:.2f} GiB)")
    print(
        "Each merge starts with the inputs' page cache emptied; its roofline (every input it reads read once, "
        "one output written and synced, measured before it in this run) and times as multiples of it: the merge "
        "alone (imports done before the clock) and the whole command (a fresh process: interpreter, imports, merge)."
    )
    print(
        "| method | roofline s | ours: peak GiB (copies), disk GiB, s (x roofline), whole command s (x) | "
        "mergekit: the same | max abs difference |\n| --- | --- | --- | --- | --- |"
    )
    results = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EVOLVER_PROGRESS": "0"}
    for method in args.methods:
        config = os.path.join(root, f"{method}.yml")
        write_yaml(method, dirs, config)
        with_base = CASES[method][3]
        inputs = [f for d in merged_dirs(method, dirs) + [dirs[-1]] * with_base for f in safetensors_of(d)]
        row = {"roofline": io_roofline(inputs, os.path.join(root, "roofline"), copy_bytes)}
        for tool in args.tools:
            out = os.path.join(root, f"out-{tool}-{method}")
            shutil.rmtree(out, ignore_errors=True)
            drop_cache(inputs)
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, __file__, "--child", tool, config, out], capture_output=True, text=True, env=env
            )
            whole = time.perf_counter() - start
            lines = proc.stdout.strip().splitlines()
            try:
                row[tool] = json.loads(lines[-1])
                if row[tool]["code"] != 0:
                    raise ValueError
                row[tool]["whole_command_s"] = whole
            except (IndexError, ValueError):
                row[tool] = {"error": (proc.stderr or proc.stdout)[-300:]}
        if all(t in row and "error" not in row[t] for t in ("ours", "mergekit")):
            row["max_abs_difference"] = max_difference(
                os.path.join(root, f"out-ours-{method}"), os.path.join(root, f"out-mergekit-{method}")
            )
        if not args.keep_outputs:  # 7B-shaped outputs of every method would fill the disk
            for tool in args.tools:
                shutil.rmtree(os.path.join(root, f"out-{tool}-{method}"), ignore_errors=True)

        roof = row["roofline"]["seconds"]

        def cell(r, roof=roof):
            if "error" in r:
                return "failed: " + " ".join(r["error"].split())[-80:]
            return (
                f"{r['peak_bytes'] / 2**30:.3f} ({r['peak_bytes'] / copy_bytes:.2f}), "
                f"{r['disk_bytes'] / 2**30:.2f}, {r['seconds']:.1f} ({r['seconds'] / roof:.1f}x), "
                f"{r['whole_command_s']:.1f} ({r['whole_command_s'] / roof:.1f}x)"
            )

        diff = row.get("max_abs_difference", "-")
        if method in RANDOM and diff != "-":
            diff = f"{diff} (random drops)"
        print(
            f"| {method} | {roof:.1f} | {cell(row['ours']) if 'ours' in row else '-'} | "
            f"{cell(row['mergekit']) if 'mergekit' in row else '-'} | {diff} |",
            flush=True,
        )
        results[method] = row
        if args.json:  # after every method: a long run stopped early keeps the rows it measured
            with open(args.json, "w") as f:
                json.dump(
                    {
                        "size": args.size,
                        "layers": args.layers,
                        "n": args.n,
                        "copy_bytes": copy_bytes,
                        "results": results,
                    },
                    f,
                    indent=1,
                )


if __name__ == "__main__":
    main()
