"""Storage tiers at a size CI affords (about 200 MB of synthetic Llama-shaped bf16 weights): one generation
gives the same bytes on every tier, and peak anonymous memory stays within the bound of the design
(N + 1 copies plus a fixed chunk budget on the memory tiers; 1 copy plus the budget on disk)."""

import json
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import json, sys, torch
    from evolver_kernels.testing.synthetic import AnonPeak, llama_layout, population_digest, synthetic_population, weight_generation
    tier, root = sys.argv[1], sys.argv[2]
    base = AnonPeak.now()
    sampler = AnonPeak()
    layout = llama_layout("tiny")
    pop = synthetic_population(layout, 4, tier, root=root)
    accepted = weight_generation(pop, chunk=1 << 20, seed=3)
    peak = sampler.stop() - base
    print(json.dumps({"peak": peak, "copy": layout.nbytes, "accepted": accepted, "digest": population_digest(pop)}))
""")
BUDGET = 64 << 20  # chunk buffers (1M elements), allocator slack, the interpreter's own growth


def _run(tier, root):
    out = subprocess.run([sys.executable, "-c", CHILD, tier, str(root)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return {tier: _run(tier, tmp_path_factory.mktemp(tier)) for tier in ("gpu", "cpu", "disk")}


def test_every_tier_gives_the_same_bytes(results):
    assert results["gpu"]["accepted"], "the generation should accept at least one offspring"
    assert results["gpu"]["digest"] == results["cpu"]["digest"] == results["disk"]["digest"]
    assert results["gpu"]["accepted"] == results["cpu"]["accepted"] == results["disk"]["accepted"]


@pytest.mark.parametrize("tier", ["gpu", "cpu"])
def test_memory_tiers_hold_n_plus_one_copies(results, tier):
    r = results[tier]
    assert r["peak"] <= 5 * r["copy"] + BUDGET, f"{r['peak'] / r['copy']:.2f} copies"


def test_disk_tier_holds_one_copy(results):
    r = results["disk"]
    assert r["peak"] <= 1 * r["copy"] + BUDGET, f"{r['peak'] / r['copy']:.2f} copies"
