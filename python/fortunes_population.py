"""A second, larger scenario: topic classification of Debian's fortunes by category, with experts trained on
non-IID label partitions (the setting of the paper's GLUE non-IID experiments).

Data: the `fortunes` Debian package (/usr/share/games/fortunes, installed by scripts/demo_fortunes.sh when
missing). CATEGORIES below, up to PER_CATEGORY quotes each, split 60/20/20 per category into train / dev /
test. The dev and test files cover every category (IID). The train pool is cut into 4 partitions: expert k
takes 80% of its examples from its two home categories (2k, 2k+1) and 20% from the others, so each expert
knows two topics well and the rest poorly. Each expert starts from the same MiniLM ancestor with a seeded
8-way head (python/recipes.py). Deterministic from --seed; cached.

    python python/fortunes_population.py --out .cache/fortunes-population
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from recipes import build_base, cached_manifest, train_experts, write_manifest

FORTUNES_DIR = "/usr/share/games/fortunes"
CATEGORIES = ["computers", "politics", "science", "work", "art", "literature", "law", "food"]
PER_CATEGORY = 250
EXPERTS = 4
HOME_FRACTION = 0.8
RECIPE_VERSION = 1


def read_quotes(category: str) -> list[str]:
    path = os.path.join(FORTUNES_DIR, category)
    if not os.path.isfile(path):
        sys.exit(f"{path} is missing: install Debian's fortunes package (apt-get install fortunes)")
    with open(path, encoding="utf-8", errors="replace") as f:
        quotes = [" ".join(q.split()) for q in f.read().split("\n%\n")]
    return [q for q in quotes if 20 <= len(q) <= 600]


def write_splits(out: str, seed: int) -> dict:
    rng = random.Random(seed)
    splits = {"train": [], "dev": [], "test": []}
    for cat in CATEGORIES:
        quotes = read_quotes(cat)
        rng.shuffle(quotes)
        quotes = quotes[:PER_CATEGORY]
        a, b = round(0.6 * len(quotes)), round(0.8 * len(quotes))
        splits["train"] += [{"text": q, "label": cat} for q in quotes[:a]]
        splits["dev"] += [{"text": q, "label": cat} for q in quotes[a:b]]
        splits["test"] += [{"text": q, "label": cat} for q in quotes[b:]]
    # non-IID partitions of the train pool
    per_expert = len(splits["train"]) // EXPERTS
    by_cat = {c: [r for r in splits["train"] if r["label"] == c] for c in CATEGORIES}
    for rows in by_cat.values():
        rng.shuffle(rows)
    partitions = []
    for k in range(EXPERTS):
        home = CATEGORIES[2 * k : 2 * k + 2]
        take_home = int(HOME_FRACTION * per_expert) // len(home)
        part = []
        for c in home:
            part += by_cat[c][:take_home]
            by_cat[c] = by_cat[c][take_home:]
        partitions.append((home, part))
    rest = [r for rows in by_cat.values() for r in rows]
    rng.shuffle(rest)
    share = len(rest) // EXPERTS
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    counts = {}
    names = []
    for k, (home, part) in enumerate(partitions):
        part = part + rest[k * share : (k + 1) * share]
        rng.shuffle(part)
        name = "+".join(home)
        names.append(name)
        with open(os.path.join(data_dir, f"expert{k}.train.jsonl"), "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
        counts[f"expert{k} ({name})"] = len(part)
    for split in ("dev", "test"):
        rng.shuffle(splits[split])
        with open(os.path.join(data_dir, f"all.{split}.jsonl"), "w") as f:
            for r in splits[split]:
                f.write(json.dumps(r) + "\n")
        counts[split] = len(splits[split])
    return {"counts": counts, "expert_names": names}


def build(
    out: str, seed: int = 0, epochs: int = 5, lr: float = 1e-4, batch_size: int = 16, max_length: int = 64, log=print
) -> dict:
    out = os.path.abspath(out)
    params = {
        "recipe": RECIPE_VERSION,
        "seed": seed,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "max_length": max_length,
        "categories": CATEGORIES,
        "per_category": PER_CATEGORY,
    }
    manifest = cached_manifest(out, params, log)
    if manifest is not None:
        return manifest
    os.makedirs(out, exist_ok=True)
    info = write_splits(out, seed)
    log(f"[population] splits: {info['counts']}")
    base = build_base(out, seed, CATEGORIES)
    names = [f"expert{k}" for k in range(EXPERTS)]
    experts = train_experts(
        base,
        out,
        names,
        [os.path.join(out, "data", f"{n}.train.jsonl") for n in names],
        seed,
        epochs,
        lr,
        batch_size,
        max_length,
        log,
    )
    return write_manifest(
        out,
        params,
        {
            "base": base,
            "experts": experts,
            "expert_names": info["expert_names"],
            "expert_domains": ["all"],
            "held_out_domain": None,
            "counts": info["counts"],
            "dev": [os.path.join(out, "data", "all.dev.jsonl")],
            "test": {"all": os.path.join(out, "data", "all.test.jsonl")},
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".cache/fortunes-population")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(build(args.out, seed=args.seed), indent=2))
