"""The end of a run: the output chosen (the fitness mode's result, or held-out selection among the run's result,
the input models and the --extra-individuals merges: heldout.py), scored, and written with evolution.json, the
fitness plot and the model card (report.py)."""

from __future__ import annotations

from evolver_kernels.evolve.heldout import Candidate, choose, describe_data
from evolver_kernels.evolve.report import write_outputs
from evolver_kernels.evolve.state import RunState
from evolver_kernels.kernels.backends import device_backends
from evolver_kernels.storage.arena import load_into
from evolver_kernels.storage.population import MappedModels


def early_reject(run) -> str:
    """How candidates were scored, for evolution.json."""
    if not run.inputs.evaluator.exact_bound:
        return f"not applicable ({run.inputs.evaluator.metric} has no exact bound: every example scored)"
    return run.cfg.early_reject


def write_run_outputs(run, state: RunState, search: dict | None = None, more=None) -> dict:
    """Chooses the output (the search's result, or held-out selection's among the candidates), scores it, writes
    the model, evolution.json (with the search's own record `search` under its name), the plot and the card into
    --out, then more() (the search's own files: the paths it wrote), and marks the checkpoint finished."""
    selection = None
    if run.inputs.selection is None:
        kind = run.build_output(state)
    else:
        choice = choose(selection_candidates(run, state), lambda what: run.evaluate(what, selection=True), run.log)
        kind = choice.phrase
        selection = choice.record(describe_data(run.cfg.select, run.cfg.select_fraction))
    final = run.evaluate("the output model")
    extra = {
        "task": run.inputs.task,
        "metric": run.inputs.evaluator.metric,
        "output": kind,
        "evaluations": state.evaluations,
        "timing_s": {"weights": round(run.weights_s, 3), "evaluation": round(run.evaluation_s, 3)},
        "non_finite_evaluations": run.non_finite,
        "early_reject": early_reject(run),
        "backends": device_backends(run.inputs.placement.devices(), run.cfg.backend),
        "resolved_models": {ref: path for ref, path in run.cfg.resolved.items() if ref != path},
    }
    if selection is not None:
        extra["selection"] = selection
    if search is not None:
        extra.update(search)
    written = write_outputs(
        run.cfg.out,
        run.arena,
        run.cfg.local(run.cfg.models[0]),
        run.inputs.files[0],
        dict(state.config),
        state.history,
        final.as_dict(),
        extra,
        run.inputs.evaluator.metric,
        kind,
    )
    if more is not None:
        written += more()
    run.setup.out_dir.record(written)
    run.checkpoint.mark_finished(state)
    run.log(f"final fitness {final.score:.4f} ({run.inputs.evaluator.metric}); wrote {run.cfg.out}")
    return {"final_fitness": final.score, "per_file": final.per_file, "history": state.history, **extra}


def selection_candidates(run, state: RunState) -> list[Candidate]:
    """The run's result, every input model, every --extra-individuals merge of the input models."""
    cfg = run.cfg
    candidates = [Candidate("the run's result", lambda: run.build_output(state))]
    for k, ref in enumerate(cfg.models):

        def load(k=k, ref=ref) -> str:
            run.timed(load_into, run.arena, run.inputs.files[k], f"--models {ref}")
            return f"the input model {ref}, chosen on the selection data"

        candidates.append(Candidate(f"input model {ref}", load))
    for method in cfg.extra_individuals or []:

        def merge(method=method) -> str:
            models = MappedModels(run.inputs.layout, run.inputs.files, list(cfg.models))
            try:
                run.timed(run.merger(method), models, run.arena, cfg.chunk_elements)
            finally:
                models.close()
            return f"the {method} merge of the input models, chosen on the selection data"

        candidates.append(Candidate(f"{method} merge of the input models", merge))
    return candidates
