"""What an evolution run leaves in --out: the model, evolution.json (pinned keys), a fitness plot and a model
card (write_outputs)."""

from __future__ import annotations

import json
import math
import os

from evolver_kernels.io.jsonio import write_json


def write_evolution_json(out_dir: str, config: dict, history: list[dict], final: dict, extra: dict) -> str:
    """Pinned keys: config, generations [{generation, population_fitness, accepted}], final_fitness. A fitness
    ranked last (NaN or infinite, evolve.Run.evaluate) is null."""
    doc = {
        "config": config,
        "generations": history,
        "final_fitness": final["score"],
        "final_per_file": final["per_file"],
    }
    doc.update(extra)
    return write_json(os.path.join(out_dir, "evolution.json"), doc)


def _summary(value) -> tuple[float, float]:
    """(best, mean) of a generation's population_fitness: a list (individual mode) or one number (merged)."""
    if isinstance(value, list):
        return max(value), sum(value) / len(value)
    return value, value


def plot_fitness(out_dir: str, history: list[dict], metric: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [h["generation"] for h in history]

    def finite(v: float) -> float:  # a fitness ranked last is a gap in the plot
        return v if math.isfinite(v) else math.nan

    best = [finite(_summary(h["population_fitness"])[0]) for h in history]
    mean = [finite(_summary(h["population_fitness"])[1]) for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(gens, best, marker="o", label="best")
    if mean != best:
        ax.plot(gens, mean, marker=".", linestyle="--", label="population mean")
    ax.set_xlabel("generation (0 = initial population)")
    ax.set_ylabel(f"dev fitness ({metric})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "fitness.png")
    fig.savefig(path)
    plt.close(fig)
    return path


def _selection_text(selection: dict | None) -> str:
    """The model card's account of held-out selection (heldout.py): every candidate's score, the winner."""
    if selection is None:
        return ""
    rows = "\n".join(f"| {c['name']} | {_number(c['score'])} |" for c in selection["candidates"])
    margin = selection["margin_over_next_best"]
    by = f", by {margin:.4f} over the next best" if margin is not None and math.isfinite(margin) else ""
    return f"""
## Selection on held-out data

The output was chosen on data the search never scored ({selection["data"]}): **{selection["chosen"]}** won{by}.

| candidate | selection score |
| --- | --- |
{rows}
"""


def _how(config: dict) -> str:
    if config.get("search") == "recipe":
        return (
            "a CMA-ES search of merge recipes (the merge's parameters per layer group and model, "
            "mergekit-evolve's genome; evolver-kernels)"
        )
    return "Evolver (differential evolution on the weights; evolver-kernels)"


def _number(value) -> str:
    return f"{value:.4f}" if value is not None and math.isfinite(value) else "-inf (non-finite)"


def write_model_card(
    out_dir: str,
    config: dict,
    history: list[dict],
    final: dict,
    metric: str,
    output_kind: str,
    selection: dict | None = None,
) -> str:
    rows = "\n".join(
        f"| {h['generation']} | {_summary(h['population_fitness'])[0]:.4f} | {_summary(h['population_fitness'])[1]:.4f} "
        f"| {len(h['accepted'])} |"
        for h in history
    )
    per_file = "\n".join(f"| {name} | {score:.4f} |" for name, score in final["per_file"].items())
    cfg = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in config.items())
    text = f"""---
tags: [evolver, model-merging, evolver-kernels]
---
# Evolved model

Fused from {len(config["models"])} models by {_how(config)}. This directory holds {output_kind}. Fitness is `{metric}` on the development
data (higher is better); no test data was used for selection.
{_selection_text(selection)}
Final dev fitness: **{final["score"]:.4f}**

| dev file | score |
| --- | --- |
{per_file}

## Fitness by generation

| generation | best | mean | accepted |
| --- | --- | --- | --- |
{rows}

![fitness](fitness.png)

## Configuration

```yaml
{cfg}
```
"""
    path = os.path.join(out_dir, "README.md")
    with open(path, "w") as f:
        f.write(text)
    return path


def write_outputs(
    out_dir: str,
    arena,
    model_dir: str,
    model_files: list[str],
    config: dict,
    history: list[dict],
    final: dict,
    extra: dict,
    metric: str,
    output_kind: str,
) -> list[str]:
    """Everything a finished evolution run leaves in `out_dir`: the model (model_io.save_model: shards named as
    in the first model's checkpoint, its config and tokenizer), evolution.json, fitness.png and the model card
    README.md. Returns every path written."""
    from evolver_kernels.io.model_io import save_model

    written = save_model(arena, model_dir, model_files, out_dir)
    written += [
        write_evolution_json(out_dir, config, history, final, extra),
        plot_fitness(out_dir, history, metric),
        write_model_card(out_dir, config, history, final, metric, output_kind, extra.get("selection")),
    ]
    return written
