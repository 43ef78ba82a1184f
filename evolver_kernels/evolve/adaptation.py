"""How each offspring's F and CR are chosen (`--adapt`): one record per scheme, from which the option's choices
and the run state's per-individual values are derived.

- none: every offspring uses --F and --CR (the Evolver paper's setting).
- jde: self-adaptive DE (Brest, Greiner, Boskovic, Mernik and Zumer, "Self-Adapting Control Parameters in
  Differential Evolution", IEEE Trans. Evol. Comput. 10(6), 2006). Individual i carries its own F_i and CR_i,
  both starting at --F and --CR. Its offspring in generation g uses F' = 0.1 + 0.9 u2 when u1 < 0.1 (else
  F_i) and CR' = u4 when u3 < 0.1 (else CR_i); when the offspring is accepted, F_i and CR_i become F' and CR'.
  u1 .. u4 are the four 32-bit words of Philox (rng.random_words) under derive_seed(seed, g, i,
  PURPOSE_ADAPT), divided by 2**32: deterministic from the run seed, and the values live in the run state, so
  a resumed run draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from evolver_kernels.errors import UserError
from evolver_kernels.kernels.rng import PURPOSE_ADAPT, derive_seed, random_words

JDE_TAU = 0.1  # probability of drawing a new F (and, independently, a new CR)
JDE_F_LOW, JDE_F_SPAN = 0.1, 0.9  # a new F is uniform in [0.1, 1.0)


def _uniforms(seed: int, generation: int, i: int) -> list[float]:
    words = random_words(4, seed=derive_seed(seed, generation, i, PURPOSE_ADAPT))
    return [int(w) / 4294967296.0 for w in words]


def _jde(seed: int, generation: int, i: int, F: float, CR: float) -> tuple[float, float]:
    u1, u2, u3, u4 = _uniforms(seed, generation, i)
    return (JDE_F_LOW + JDE_F_SPAN * u2 if u1 < JDE_TAU else F), (u4 if u3 < JDE_TAU else CR)


@dataclasses.dataclass(frozen=True)
class Adaptation:
    name: str
    summary: str
    # (run seed, generation, individual, its F_i, its CR_i) -> the offspring's (F, CR); None: --F and --CR always
    trial: Callable[[int, int, int, float, float], tuple[float, float]] | None


ADAPTATIONS: dict[str, Adaptation] = {
    a.name: a
    for a in (
        Adaptation("none", "every offspring uses --F and --CR", None),
        Adaptation(
            "jde",
            "jDE (Brest et al. 2006): per-individual F and CR, redrawn with probability 0.1 and kept "
            "when the offspring is accepted",
            _jde,
        ),
    )
}


def get(name: str) -> Adaptation:
    record = ADAPTATIONS.get(name)
    if record is None:
        raise UserError(f"unknown --adapt {name!r}; known: {', '.join(ADAPTATIONS)}")
    return record
