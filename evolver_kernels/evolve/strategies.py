"""The DE strategy registry: one record per mutation strategy, from which `--strategy`'s choices, the population
check, the fitness-mode check and every offspring's partners and operator roles are derived.

An offspring of individual i is u = where(mask, base + F (a - b), x_i) (docs/ARCHITECTURE.md §1), built by the
fused operator de_mutate_crossover(x_i, base, a, b). A strategy says how many random partners it draws
(distinct, never i; with uses_best, never the best either, which comes first), and which of i and its picks
are (base, a, b). Where base and b are i itself (the evolver strategy) the operator receives x_i's tensor for
them and reads two tensors instead of four.

Adding a strategy is one `register(Strategy(...))`, in any module imported before the run starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from evolver_kernels.errors import UserError
from evolver_kernels.kernels.rng import MASK32, PURPOSE_OFFSPRING, derive_seed, random_order


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    partners: int  # random individuals drawn besides i (and besides the best, with uses_best)
    roles: Callable[[int, tuple[int, ...]], tuple[int, int, int]]  # (i, picks) -> (base, a, b) individuals
    uses_best: bool = False  # picks start with the best individual (needs individual fitness)

    @property
    def min_population(self) -> int:
        """i, its partners and, with uses_best, a best individual other than i."""
        return 1 + self.partners + self.uses_best

    @property
    def needs_individual_fitness(self) -> bool:
        return self.uses_best


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    if strategy.name in STRATEGIES:
        raise ValueError(f"strategy {strategy.name!r} is registered already")
    STRATEGIES[strategy.name] = strategy
    return strategy


def unregister(name: str) -> None:
    """Removes a strategy (tests that register their own)."""
    STRATEGIES.pop(name, None)


def get(name: str) -> Strategy:
    strategy = STRATEGIES.get(name)
    if strategy is None:
        raise UserError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return strategy


def names() -> list[str]:
    return list(STRATEGIES)


register(
    Strategy(
        name="evolver",
        partners=1,
        roles=lambda i, picks: (i, picks[0], i),
        summary="x_i + F (x_r - x_i): what the Evolver reference code runs (reads 2 tensors)",
    )
)
register(
    Strategy(
        name="rand/1",
        partners=3,
        roles=lambda i, picks: (picks[0], picks[1], picks[2]),
        summary="x_r1 + F (x_r2 - x_r3): classic DE",
    )
)
register(
    Strategy(
        name="best/1",
        partners=2,
        uses_best=True,
        roles=lambda i, picks: (picks[0], picks[1], picks[2]),
        summary="x_best + F (x_r1 - x_r2), r1 and r2 other than i and the best",
    )
)


@dataclasses.dataclass(frozen=True)
class OffspringSpec:
    """Everything that determines offspring i: u = where(mask(seed), base + F (a - b), x_i)."""

    i: int
    strategy: str
    picks: tuple[int, ...]  # the strategy's partners (the best individual first, with uses_best)
    F: float
    CR: float
    seed: int

    def roles(self) -> tuple[int, int, int]:
        """(base, a, b) individuals."""
        return get(self.strategy).roles(self.i, self.picks)


def best_index(fitness: list[float]) -> int:
    """The best individual: highest fitness, the lowest index among ties."""
    return max(range(len(fitness)), key=lambda k: (fitness[k], -k))


def offspring_spec(
    strategy: str, F: float, CR: float, run_seed: int, n: int, generation: int, i: int, fitness: list[float] | None
) -> OffspringSpec:
    """The offspring of individual i in `generation` (docs/ARCHITECTURE.md §2): partners are the first of
    random_order(run_seed, n, generation, i) other than i (and the best), the crossover seed is
    derive_seed(run_seed, generation, i, PURPOSE_OFFSPRING)."""
    record = get(strategy)
    exclude = {i}
    best = None
    if record.uses_best:
        best = best_index(fitness)
        exclude.add(best)
    candidates = [k for k in random_order(run_seed, n, generation, i) if k not in exclude]
    picks = tuple(candidates[: record.partners])
    if best is not None:
        picks = (best,) + picks
    seed = derive_seed(run_seed, generation, i, PURPOSE_OFFSPRING)
    return OffspringSpec(i=i, strategy=strategy, picks=picks, F=float(F), CR=float(CR), seed=seed)


def visiting_order(schedule: str, run_seed: int, n: int, generation: int) -> list[int]:
    """The order individuals are visited in: slot order (synchronous), else random_order(run_seed, n,
    generation, 0xFFFFFFFF)."""
    if schedule == "synchronous":
        return list(range(n))
    return random_order(run_seed, n, generation, MASK32)
