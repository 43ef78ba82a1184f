"""The weight pipeline against straightforward PyTorch: layouts, offspring, merged candidates, replacements,
whatever the chunk size."""

import pytest
import torch
from _util import assert_bitwise_equal

from evolver_kernels.evolve.offspring import OffspringSpec, WeightPipeline
from evolver_kernels.kernels.reference import de_mutate_crossover_reference
from evolver_kernels.storage.arena import ALIGN, Arena, Layout
from evolver_kernels.storage.population import MemoryPopulation
from evolver_kernels.testing import tiny_models


def _population(n=4, dtype_mix=True, seed=0):
    params = [
        (("b.weight",), torch.float32, (7, 5)),
        (("a.bias",), torch.float32, (3,)),
        (("emb.weight", "head.weight"), torch.bfloat16 if dtype_mix else torch.float32, (11, 9)),
    ]
    layout = Layout.from_params(params)
    pop = MemoryPopulation(layout, n, "cpu")
    gen = torch.Generator().manual_seed(seed)
    for arena in pop.arenas:
        for e in layout.entries:
            arena.view(e).copy_(torch.randn(e.shape, generator=gen))
    return layout, pop


def test_layout_is_canonical_aligned_and_ties_once():
    layout, _ = _population()
    assert [e.name for e in layout.entries] == ["a.bias", "b.weight", "emb.weight"]
    assert layout.entries[2].aliases == ("emb.weight", "head.weight")
    assert all(e.offset % ALIGN == 0 for e in layout.entries)
    assert set(layout.groups) == {"float32", "bfloat16"}
    assert layout.groups["bfloat16"][0] == 0 and layout.groups["float32"][0] == layout.groups["bfloat16"][1]
    shuffled = Layout.from_params(
        [
            (("head.weight", "emb.weight"), torch.bfloat16, (11, 9)),
            (("b.weight",), torch.float32, (7, 5)),
            (("a.bias",), torch.float32, (3,)),
        ]
    )
    assert shuffled.fingerprint() == layout.fingerprint()


def test_layout_of_tiny_model_matches_its_parameters():
    import transformers

    model = transformers.GPT2LMHeadModel(tiny_models.make_config("gpt2"))
    layout = Layout.of_model(model)
    assert sum(e.numel for e in layout.entries) == sum(p.numel() for p in model.parameters())
    tied = [e for e in layout.entries if len(e.aliases) > 1]
    assert [set(e.aliases) for e in tied] == [{"lm_head.weight", "transformer.wte.weight"}]


def _spec(strategy, i=1, picks=(2,)):
    return OffspringSpec(i=i, strategy=strategy, picks=picks, F=0.5, CR=0.5, seed=1234)


@pytest.mark.parametrize("chunk", [64, 128, 1 << 20])
@pytest.mark.parametrize("strategy,picks", [("evolver", (2,)), ("rand/1", (0, 2, 3))])
def test_offspring_matches_reference_for_any_chunk(chunk, strategy, picks):
    layout, pop = _population()
    out = Arena.empty(layout)
    spec = _spec(strategy, picks=picks)
    WeightPipeline(pop, "cpu", chunk=chunk).offspring_into(spec, out)
    base_i, a_i, b_i = spec.roles()
    for g, (base_index, _) in layout.groups.items():

        def buf(k, g=g):
            return pop.arenas[k].buffers[g]

        want = de_mutate_crossover_reference(
            buf(1), buf(base_i), buf(a_i), buf(b_i), F=0.5, CR=0.5, seed=1234, offset=base_index
        )
        assert_bitwise_equal(out.buffers[g], want, g)


@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_merged_candidate_is_the_fp32_mean_with_the_offspring_in_its_slot(chunk):
    layout, pop = _population()
    pipe = WeightPipeline(pop, "cpu", chunk=chunk)
    child = Arena.empty(layout)
    pipe.offspring_into(_spec("evolver"), child)
    merged = Arena.empty(layout)
    pipe.merged_into(merged, replace=[_spec("evolver")])
    for g in layout.groups:
        parts = [child.buffers[g] if k == 1 else pop.arenas[k].buffers[g] for k in range(4)]
        acc = torch.zeros(parts[0].shape)
        for p in parts:
            acc += p.float()
        assert_bitwise_equal(merged.buffers[g], (acc / 4).to(parts[0].dtype), g)


def test_synchronous_apply_uses_the_population_before_any_write():
    layout, pop = _population()
    specs = [_spec("evolver", i=1, picks=(2,)), _spec("evolver", i=2, picks=(1,))]  # each reads the other's parent
    pipe = WeightPipeline(pop, "cpu", chunk=64)
    want = []
    for s in specs:
        a = Arena.empty(layout)
        pipe.offspring_into(s, a)
        want.append(a)
    pipe.apply(specs)
    for s, w in zip(specs, want):
        for g in layout.groups:
            assert_bitwise_equal(pop.arenas[s.i].buffers[g], w.buffers[g], f"slot {s.i} {g}")


def test_save_and_load_flat_roundtrip(tmp_path):
    layout, pop = _population()
    pop.save(2, str(tmp_path / "ind.safetensors"))
    other = MemoryPopulation(layout, 1, "cpu")
    other.load(0, str(tmp_path / "ind.safetensors"))
    for g in layout.groups:
        assert_bitwise_equal(other.arenas[0].buffers[g], pop.arenas[2].buffers[g], g)
    layout2, _ = _population(dtype_mix=False)
    with pytest.raises(ValueError, match="another model layout"):
        MemoryPopulation(layout2, 1, "cpu").load(0, str(tmp_path / "ind.safetensors"))


@pytest.mark.parametrize("method", ["average", "fisher"])
def test_staged_reads_give_the_same_bytes(method):
    """Double-buffered staging (on by default only for a GPU computing on a population off the device) forced
    on the CPU: every read of the offspring, merge and replacement loops is served from the staged buffers,
    and the results are the bytes of unstaged reads."""
    from evolver_kernels.methods.merger import Merger
    from evolver_kernels.methods.statistics import FisherStats

    results = []
    for staged in (False, True):
        layout, pop = _population(n=5)
        fisher = FisherStats.zeros(layout, 5) if method == "fisher" else None
        if fisher is not None:
            for k, bufs in enumerate(fisher.buffers):
                for b in bufs.values():
                    b.fill_(1.0 + k)
        pipe = WeightPipeline(pop, "cpu", chunk=64, staging=staged, merger=Merger(method, stats=fisher))
        specs = [
            OffspringSpec(
                i=i, strategy="rand/1", picks=((i + 1) % 5, (i + 2) % 5, (i + 3) % 5), F=0.7, CR=0.4, seed=9 + i
            )
            for i in (1, 3)
        ]
        single, merged = Arena.empty(layout), Arena.empty(layout)
        pipe.offspring_into(specs[0], single)
        pipe.merged_into(merged, replace=specs)
        pipe.apply(specs)
        results.append([single.buffers, merged.buffers, [a.buffers for a in pop.arenas]])
        if staged:
            assert pipe.staging.hits > 0 and pipe.staging.misses == 0
        else:
            assert pipe.staging.hits == 0
    for group in results[0][0]:
        assert_bitwise_equal(results[1][0][group], results[0][0][group], "offspring")
        assert_bitwise_equal(results[1][1][group], results[0][1][group], "merged")
        for k in range(5):
            assert_bitwise_equal(results[1][2][k][group], results[0][2][k][group], f"individual {k}")
