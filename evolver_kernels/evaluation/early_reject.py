"""Exact early rejection: a candidate is scored only on the dev examples that can still change the decision.

A candidate must beat a rival: its parent (individual fitness) or the current merged model (merged fitness),
whose per-example outcomes (right or wrong, and how sure it was) are kept as a record. The candidate is scored
first on the examples the rival gets wrong in every file, where it can only gain, then on those the rival gets
right, where it can only lose, least sure first (in up to ten groups by the rival's confidence: a candidate
close to its rival loses where the rival was nearly wrong); each group batched shortest first. After every
batch the best score it could still reach is bounded
by taking every unscored example as right: for accuracy, exact-match, macro-F1 and multi-label F1 that
maximises each file's score (a class's F1 rises with its true positives and falls with its false positives
and negatives), and the fitness is the mean of the file scores. Once the bound cannot beat the rival's score
under the acceptance rule, scoring stops: the candidate would be rejected by a full evaluation too.

Why the decisions are exactly those of full scoring, bit for bit:
- The bound is computed by the same functions as the score, each monotone in floating point as well: counts
  are integers, a per-class F1 is one correctly rounded division, per-class and per-file scores are summed in a
  fixed order (a class absent from the bound's predictions adds an exact 0.0 to the full score) and divided by
  their count. So the full score can never exceed the bound.
- A padded batch's logits can differ in the last bits from the same example's logits in another batch. So
  a candidate with a rival is batched in the rival's order whether or not early rejection is on
  (`early=False` scores every batch of the same order): the examples it scores get the same predictions
  either way, and a candidate that completes gets the same outcomes and score.
A candidate that may still win is scored to the end; its outcomes become the next record when accepted.

Losses (neg-loss) and user functions have no such bound: they are always scored in full.
"""

from __future__ import annotations

import collections
import dataclasses

import torch

from evolver_kernels.evaluation.base import DevFiles, Fitness, TaskEvaluator, file_key, mean_score

# A record holds one character per example: WRONG, or the decile (0: least sure) of the rival's confidence
# among the examples it gets right in that file.
WRONG = "x"
DECILES = "0123456789"
CACHED_ORDERS = 32  # batch orders kept (one per distinct rival record: up to one per individual)
MIN_GROUP_BATCHES = 2  # confidence groups of a file hold at least this many batches (else fewer groups)


@dataclasses.dataclass(frozen=True)
class Rival:
    """What a candidate must beat: a fully scored model's outcomes (per file key, a record: one character per
    example in example order, WRONG or a confidence decile), its score, and whether an equal score wins
    (--accept-ties)."""

    outcomes: dict[str, str]
    score: float
    ties_win: bool = False

    def beaten_by(self, score: float) -> bool:
        return score > self.score or (self.ties_win and score == self.score)


def record_of(right: torch.Tensor, confidence: torch.Tensor) -> str:
    """A file's record: WRONG where the prediction is wrong, else the decile of its confidence among the right
    ones (ties broken by position, so the record is a function of the predictions and their confidences)."""
    rows = [j for j in range(len(right)) if right[j]]
    rows.sort(key=lambda j: (float(confidence[j]), j))
    chars = [WRONG] * len(right)
    for rank, j in enumerate(rows):
        chars[j] = DECILES[rank * 10 // len(rows)]
    return "".join(chars)


class OutcomeScorer:
    """Scores models on fixed dev files through per-example predictions (a task with `exact_bound`): with a
    rival, in the rival's order and, when `early`, only until the rival cannot be beaten."""

    def __init__(self, task: TaskEvaluator, files: DevFiles, dev_paths: list[str], early: bool = True):
        self.task, self.files, self.early = task, files, early
        self.keys = [file_key(f.path, dev_paths) for f in files]
        self.gold = [task.gold(f) for f in files]
        self.total = sum(len(f.examples) for f in files)
        self._orders: collections.OrderedDict[tuple[str, ...], list[tuple[int, dict]]] = collections.OrderedDict()

    def order(self, rival: Rival | None) -> list[tuple[int, dict]]:
        """(file number, batch) in scoring order: each file's default batches without a rival; with one, the
        examples it gets wrong in every file, then those it gets right in up to ten groups of its confidence,
        least sure first (fewer groups where a file has fewer than MIN_GROUP_BATCHES batches per group), each
        file's part of a group batched shortest first."""
        if rival is None:
            return [(n, b) for n, f in enumerate(self.files) for b in f.batches]
        records = tuple(rival.outcomes.get(key, "") for key in self.keys)
        for key, record, f in zip(self.keys, records, self.files):
            if len(record) != len(f.examples) or set(record) - set(WRONG + DECILES):
                raise ValueError(
                    f"the rival's record of {key} has {len(record)} outcomes for {len(f.examples)} examples"
                )
        if records in self._orders:
            self._orders.move_to_end(records)
            return self._orders[records]
        order = []
        groups = []  # per file: phase number of each example (0: wrong; 1, 2, ...: right, least sure first)
        for record in records:
            n_right = sum(c != WRONG for c in record)
            g = max(1, min(10, n_right // (MIN_GROUP_BATCHES * self.task.batch_size)))
            groups.append([0 if c == WRONG else 1 + int(c) * g // 10 for c in record])
        for phase in range(1 + 10):
            for n, f in enumerate(self.files):
                rows = [j for j, p in enumerate(groups[n]) if p == phase]
                order.extend((n, b) for b in self.task.pad_batches(f.examples, f.enc, rows))
        self._orders[records] = order
        if len(self._orders) > CACHED_ORDERS:
            self._orders.popitem(last=False)
        return order

    def __call__(self, model: torch.nn.Module, rival: Rival | None = None) -> Fitness:
        """The model's fitness with its outcomes; with a rival and `early`, an incomplete Fitness (upper bounds,
        no outcomes) as soon as the rival cannot be beaten."""
        task = self.task
        model.eval()
        preds = [g.clone() for g in self.gold]  # unscored examples count as right: the bound
        confidence = [torch.zeros(len(g)) for g in self.gold]
        per_file = {key: task.file_metric(p, g) for key, p, g in zip(self.keys, preds, self.gold)}
        scored = 0
        with task.scoring_context():
            for n, batch in self.order(rival):
                preds[n][batch["index"]], sure = task.predict(model, batch)
                if sure is not None:
                    confidence[n][batch["index"]] = sure.float()
                scored += len(batch["index"])
                per_file[self.keys[n]] = task.file_metric(preds[n], self.gold[n])
                if (
                    self.early
                    and rival is not None
                    and scored < self.total
                    and not rival.beaten_by(mean_score(per_file))
                ):
                    return Fitness(mean_score(per_file), per_file, scored=scored, total=self.total)
        outcomes = {key: record_of(correct(p, g), c) for key, p, g, c in zip(self.keys, preds, self.gold, confidence)}
        return Fitness(mean_score(per_file), per_file, outcomes=outcomes, scored=scored, total=self.total)


def correct(preds: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Per example: the prediction is right (every label of a multi-label one)."""
    same = preds == gold
    return same.all(-1) if same.dim() > 1 else same
