"""Methods that estimate statistics on development data before merging: Fisher merging and RegMean.

- fisher: each individual's diagonal Fisher information (mean squared gradient of the log-likelihood of the dev
  examples, one example at a time, plus a floor), fp32, laid out like the population's arena; out =
  sum_k w_k F_k x_k / sum_k w_k F_k (Matena & Raffel 2022), through the fused merge.
- regmean (Jin et al. 2023): for every nn.Linear, the Gram matrix G_k = X_k^T X_k / rows of its inputs under
  individual k; merged W = (sum_k G'_k)^-1 sum_k G'_k W_k with G' = alpha G + (1 - alpha) diag(G). The Gram
  matrices never change, so sum_k G'_k is factorised (Cholesky) once, and G'_k W_k^T is computed once per
  individual and again only when that individual changes; a merge is then one sum and two triangular solves
  per layer (the reference code inverts the summed Gram matrix at every evaluation). Other tensors: the average.

Both are computed from the individuals as they are when the run starts (an offspring inherits its slot's
statistics) and saved with an evolve run's checkpoint, so a resumed run merges exactly as the uninterrupted
one. Memory: Fisher is N fp32 copies of the model; RegMean N Gram matrices per linear layer plus N fp32 copies of
the linear weights: methods for models of up to a few hundred million parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file

from evolver_kernels.methods.linear import average
from evolver_kernels.methods.registry import MergeContext, MergeMethod, Param, Statistics, register
from evolver_kernels.storage.arena import Arena, Entry, Layout
from evolver_kernels.storage.population import Population

EXAMPLES = Param("examples", int, 256, "dev examples the statistics are estimated on (once per model)", low=1)
ALPHA = Param("alpha", float, 0.5, "RegMean: factor on the Gram matrices' off-diagonal entries", low=0.0, high=1.0)

FISHER_FLOOR = 1e-6  # added to every Fisher value: a parameter no example moves still gets the plain average


class FisherStats:
    """Per-individual fp32 buffers shaped like the arena's groups; read(k, group, lo, hi) as a Population."""

    def __init__(self, layout: Layout, buffers: list[dict[str, torch.Tensor]]):
        self.layout, self.buffers = layout, buffers

    @staticmethod
    def zeros(layout: Layout, n: int, device: torch.device | str = "cpu") -> FisherStats:
        return FisherStats(
            layout, [{g: torch.zeros(size, device=device) for g, (_, size) in layout.groups.items()} for _ in range(n)]
        )

    def read(self, k: int, group: str, lo: int, hi: int) -> torch.Tensor:
        return self.buffers[k][group][lo:hi]

    def changed(self, i: int) -> None:
        """Individual i was replaced: an offspring keeps its slot's Fisher information."""

    def save(self, path: str) -> None:
        save_file({f"{k}/{g}": t.cpu() for k, bufs in enumerate(self.buffers) for g, t in bufs.items()}, path)

    @staticmethod
    def load(layout: Layout, n: int, path: str) -> FisherStats:
        flat = load_file(path)
        return FisherStats(layout, [{g: flat[f"{k}/{g}"] for g in layout.groups} for k in range(n)])


def _parameters(model: torch.nn.Module, layout: Layout) -> list[tuple[Entry, torch.nn.Parameter]]:
    return [(e, model.get_parameter(e.name)) for e in layout.entries]


def estimate_fisher(
    model: torch.nn.Module,
    layout: Layout,
    load: Callable[[int], None],
    n: int,
    evaluator,
    examples: int = 256,
    floor: float = FISHER_FLOOR,
    progress=None,
) -> FisherStats:
    """Diagonal Fisher of individuals 0 .. n-1: load(k) puts individual k into `model`; the first `examples` dev
    examples are scored one at a time (evaluator.loss) and their squared gradients averaged."""
    stats = FisherStats.zeros(layout, n)
    params = _parameters(model, layout)
    model.eval()
    try:
        for p in {id(p): p for _, p in params}.values():
            p.requires_grad_(True)
        for k in range(n):
            load(k)
            sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for _, p in params]
            count = 0
            with torch.enable_grad():
                for example in evaluator.examples(examples):
                    model.zero_grad(set_to_none=True)
                    evaluator.loss(model, example).backward()
                    pairs = [(acc, p.grad.float()) for acc, (_, p) in zip(sums, params) if p.grad is not None]
                    if pairs:  # one fused pass over every parameter: sums += grad * grad
                        grads = [g for _, g in pairs]
                        torch._foreach_addcmul_([acc for acc, _ in pairs], grads, grads)
                    count += 1
            if count == 0:
                raise ValueError("Fisher merging needs at least one dev example")
            for (e, _), acc in zip(params, sums):
                stats.buffers[k][e.group][e.offset : e.offset + e.numel] = acc.flatten().cpu()
            for buf in stats.buffers[k].values():
                buf.div_(count).add_(floor)
            if progress:
                progress(k)
    finally:
        model.zero_grad(set_to_none=True)
        for _, p in params:
            p.requires_grad_(False)
    return stats


def linear_entries(model: torch.nn.Module, layout: Layout) -> dict[str, Entry]:
    """nn.Linear module name -> the layout entry of its weight, for untied 2-D weights (a weight tied to an
    embedding is not a linear map of the layer's own inputs)."""
    by_name = {e.name: e for e in layout.entries if len(e.aliases) == 1 and len(e.shape) == 2}
    return {
        name: by_name[f"{name}.weight"]
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and f"{name}.weight" in by_name
    }


def collect_grams(
    model: torch.nn.Module,
    layout: Layout,
    load: Callable[[int], None],
    n: int,
    evaluator,
    examples: int = 256,
    progress=None,
) -> list[dict[str, torch.Tensor]]:
    """grams[k][weight name] = X^T X / rows (fp32, on the CPU) of each linear layer's inputs under individual k,
    over the first `examples` dev examples."""
    layers = linear_entries(model, layout)
    grams: list[dict[str, torch.Tensor]] = []
    for k in range(n):
        load(k)
        sums: dict[str, torch.Tensor] = {}
        rows: dict[str, int] = {}

        def hook(module, args, name, sums=sums, rows=rows):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]

        handles = [
            model.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name))
            for name in layers
        ]
        try:
            evaluator.forward_all(model, examples)
        finally:
            for h in handles:
                h.remove()
        grams.append({layers[name].name: (sums[name] / rows[name]).cpu() for name in layers if name in sums})
        if progress:
            progress(k)
    return grams


def save_grams(grams: list[dict[str, torch.Tensor]], path: str) -> None:
    save_file({f"{k}/{name}": g.contiguous() for k, gs in enumerate(grams) for name, g in gs.items()}, path)


def load_grams(path: str, n: int) -> list[dict[str, torch.Tensor]]:
    flat = load_file(path)
    grams: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, g in flat.items():
        k, _, name = key.partition("/")
        grams[int(k)][name] = g
    return grams


class RegMean:
    """RegMean over a population: merge_into(pop, out) overwrites each linear weight of `out` (already holding
    the average) with the RegMean solution. pop may be a view with offspring in some slots (Population.replaced:
    their terms are recomputed from the view; Population.stored: the population the cached terms come from)."""

    def __init__(self, layout: Layout, grams: list[dict[str, torch.Tensor]], alpha: float = 0.5):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"regmean alpha must be in [0, 1], got {alpha}")
        if not grams or not grams[0]:
            raise ValueError("RegMean found no nn.Linear layer whose weight is evolved")
        self.alpha = alpha
        self.raw_grams = grams  # what is saved with a checkpoint (alpha is applied when loading)
        self.entries = [e for e in layout.entries if e.name in grams[0]]
        self.grams = [{name: self._reduce(g) for name, g in gs.items()} for gs in grams]
        self.factors = {}
        for e in self.entries:
            total = sum(gs[e.name] for gs in self.grams)
            ridge = 1e-6 * float(total.diagonal().mean()) + 1e-12
            self.factors[e.name] = torch.linalg.cholesky(total + ridge * torch.eye(total.shape[0]))
        self.terms: list[dict[str, torch.Tensor]] = [{} for _ in grams]
        self.stale = set(range(len(grams)))

    def _reduce(self, g: torch.Tensor) -> torch.Tensor:
        return self.alpha * g + (1.0 - self.alpha) * torch.diag(g.diagonal())

    def changed(self, i: int) -> None:
        self.stale.add(i)

    def _term(self, k: int, pop, e: Entry) -> torch.Tensor:
        """G'_k W_k^T (in x out) for individual k as `pop` holds it."""
        w = pop.read(k, e.group, e.offset, e.offset + e.numel).float().cpu().view(e.shape)
        return self.grams[k][e.name] @ w.T

    def merge_into(self, pop, out: Arena) -> Arena:
        for k in sorted(self.stale):
            self.terms[k] = {e.name: self._term(k, pop.stored, e) for e in self.entries}
        self.stale.clear()
        for e in self.entries:
            rhs = None
            for k in range(len(self.terms)):
                term = self._term(k, pop, e) if k in pop.replaced else self.terms[k][e.name]
                rhs = term.clone() if rhs is None else rhs.add_(term)
            solution = torch.cholesky_solve(rhs, self.factors[e.name])  # (in x out) = W^T
            out.view(e).copy_(solution.T)
        return out


def _fisher_bytes(model, layout: Layout, n: int) -> int:
    return n * 4 * layout.numel


def _regmean_bytes(model, layout: Layout, n: int) -> int:
    return n * 4 * sum(e.shape[1] ** 2 + e.numel for e in linear_entries(model, layout).values())


def _merge_fisher(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
    return average(pop, out, ctx.weights, ctx.chunk, ctx.backend, fisher=ctx.stats)


def _merge_regmean(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
    average(pop, out, ctx.weights, ctx.chunk, ctx.backend)
    return ctx.stats.merge_into(pop, out)


register(
    MergeMethod(
        name="fisher",
        params=(EXAMPLES,),
        merge=_merge_fisher,
        describe=lambda settings: "Fisher-weighted average",
        summary="Fisher merging: sum w_k F_k x_k / sum w_k F_k with F_k model k's diagonal Fisher on dev data",
        statistics=Statistics(
            estimate=lambda model, layout, load, n, evaluator, settings, progress=None: estimate_fisher(
                model, layout, load, n, evaluator, settings["examples"], progress=progress
            ),
            save=lambda stats, path: stats.save(path),
            load_file=lambda layout, n, path, settings: FisherStats.load(layout, n, path),
            host_bytes=_fisher_bytes,
        ),
    )
)
register(
    MergeMethod(
        name="regmean",
        params=(EXAMPLES, ALPHA),
        merge=_merge_regmean,
        describe=lambda settings: f"RegMean (alpha {settings['alpha']})",
        summary="RegMean: linear layers solved from the Gram matrices of their inputs on dev data, the rest averaged",
        statistics=Statistics(
            estimate=lambda model, layout, load, n, evaluator, settings, progress=None: RegMean(
                layout,
                collect_grams(model, layout, load, n, evaluator, settings["examples"], progress=progress),
                settings["alpha"],
            ),
            save=lambda stats, path: save_grams(stats.raw_grams, path),
            load_file=lambda layout, n, path, settings: RegMean(layout, load_grams(path, n), settings["alpha"]),
            host_bytes=_regmean_bytes,
        ),
    )
)
