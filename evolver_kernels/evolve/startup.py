"""A run's start-up, one way: check the options, claim --out (rank 0, before anything is written), read and check
every input (inspect: models, dev data, placement), check the checkpoint against --resume (the same options and
inputs, recorded by provenance.py; a state this run can be in), accept the memory plan (start -> Setup); then build the storage the generations work in (build_storage -> Storage). `dry_run`
goes through the same checks and stops before claiming anything."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import torch

from evolver_kernels.distributed import Ranks
from evolver_kernels.evolve.checkpoint import Checkpoint
from evolver_kernels.evolve.config import ConfigError, EvolveConfig, input_paths
from evolver_kernels.evolve.genome import Genome
from evolver_kernels.evolve.inputs import RunInputs, inspect, plan_of, weight_files
from evolver_kernels.evolve.memory_plan import host_available
from evolver_kernels.evolve.offspring import WeightPipeline
from evolver_kernels.evolve.provenance import record_inputs
from evolver_kernels.evolve.state import RunState
from evolver_kernels.evolve.validate import validate
from evolver_kernels.io import model_io, rundir
from evolver_kernels.storage import node_share
from evolver_kernels.storage.arena import Arena, num_layers
from evolver_kernels.storage.population import Population, make_population


def recipe_genome(cfg: EvolveConfig, inputs: RunInputs) -> Genome | None:
    """--search recipe's genome over the models' layers (refused in one line when --layer-groups cannot cut them);
    None for --search weights."""
    return Genome(cfg, num_layers(inputs.layout)) if cfg.search == "recipe" else None


def check_plan(
    cfg: EvolveConfig, inputs: RunInputs, log, ranks: Ranks | None = None, genome: Genome | None = None
) -> None:
    """Prints --search recipe's genome (when given) and the memory plan of this node; refuses a plan that cannot
    fit, with the numbers."""
    if genome is not None:
        log(
            f"{genome.describe()}; CMA-ES: {genome.candidates} candidates per generation, each merged into the "
            "evaluation model (no file per candidate)"
        )
    plan = plan_of(cfg, inputs, ranks)
    log(plan.text())
    for note in inputs.notes:
        log(note)
    problem = plan.refusal(host_available(), lambda d: torch.cuda.mem_get_info(torch.device(d))[0], rundir.disk_problem)
    if problem:
        raise ConfigError(problem)


def check_checkpoint(cfg: EvolveConfig) -> Checkpoint:
    """--out's checkpoint agrees with --resume: none without it, an unfinished one with it."""
    checkpoint = Checkpoint(cfg.out)
    checkpoint.check()
    if checkpoint.finished():
        raise ConfigError(f"--out {cfg.out} holds a finished run (its outputs are there): choose another --out")
    if checkpoint.exists() and not cfg.resume:
        raise ConfigError(
            f"--out {cfg.out} holds a checkpointed run: pass --resume to continue it, or choose another --out"
        )
    if cfg.resume and not checkpoint.exists():
        raise ConfigError(f"--resume: no checkpoint in {cfg.out}")
    return checkpoint


def dry_run(cfg: EvolveConfig, log=print) -> None:
    """--dry-run: every input checked and the plan printed; nothing is loaded or written (pickle weights are
    converted into a temporary directory, removed again)."""
    validate(cfg)
    ranks = Ranks()
    tmp = tempfile.mkdtemp(prefix="evolver-dry-run-")
    try:

        def files_of(option, model_dir):
            return weight_files(model_dir, option, cfg.allow_pickle, tmp, ranks)

        inputs = inspect(cfg, ranks, files_of)
        check_checkpoint(cfg)
        # under torchrun: the node's plan
        check_plan(cfg, inputs, log, Ranks.of_launcher(), recipe_genome(cfg, inputs))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclasses.dataclass
class Setup:
    """What start-up hands the run: this process's ranks, --out claimed (rank 0), the checked inputs, the checkpoint
    agreeing with --resume."""

    cfg: EvolveConfig
    ranks: Ranks
    out_dir: rundir.OutputDir | None
    inputs: RunInputs
    checkpoint: Checkpoint
    inputs_record: dict  # what the run reads, as it is now (provenance.py)
    resumed: RunState | None = None  # --resume: the checkpointed state, checked against this run
    genome: Genome | None = None  # --search recipe's

    def release(self, failed: bool = False) -> None:
        """Drops the lock on --out; a run that failed before writing anything removes the --out it created."""
        if self.out_dir is not None:
            self.out_dir.release(remove_if_unused=failed)


def start(cfg: EvolveConfig, log) -> Setup:
    """Checks everything a run can check before it loads weights, in order; raises a one-line UserError naming
    the option or file at fault (and leaves no --out it created behind)."""
    validate(cfg)
    cuda = cfg.device.startswith("cuda") if cfg.device else torch.cuda.is_available()
    ranks = Ranks.from_env("cuda" if cuda else "cpu")
    if ranks.enabled and cfg.schedule != "synchronous" and cfg.search == "weights":
        raise ConfigError(
            f"{ranks.world} ranks need --schedule synchronous (the sequential schedule is serial by definition)"
        )
    out_dir = None
    if ranks.is_main:  # claimed before anything is written (conversions, checkpoints, scratch)
        out_dir = rundir.OutputDir.claim(cfg.out, "evolve", input_paths(cfg))
    ranks.barrier()  # the other ranks write nothing before rank 0 holds --out
    try:
        convert_root = os.path.join(cfg.out, "converted")
        inputs = inspect(cfg, ranks, lambda option, d: weight_files(d, option, cfg.allow_pickle, convert_root, ranks))
        checkpoint = check_checkpoint(cfg)
        record = record_inputs(cfg)
        resumed = None
        genome = recipe_genome(cfg, inputs)
        if cfg.resume:  # before any heavy work: the same options and inputs, a state this run can be in
            # positions in a generation: the individuals, or --search recipe's candidates per generation
            positions = inputs.n if genome is None else genome.candidates
            resumed = checkpoint.resume(cfg.result_options(), record, positions, cfg.generations)
        check_plan(cfg, inputs, log, ranks, genome)
    except BaseException:
        if out_dir is not None:
            out_dir.release(remove_if_unused=True)
        raise
    return Setup(cfg, ranks, out_dir, inputs, checkpoint, record, resumed, genome)


@dataclasses.dataclass
class Storage:
    """Where the run's weights live: the population (held once per node with `node`, in `scratch` on the disk
    tier), the evaluation model's arena, the base model's, and the pipeline that builds offspring from them."""

    pop: Population
    arena: Arena
    base: Arena | None
    pipeline: WeightPipeline
    node: node_share.NodePopulation | None = None
    scratch: rundir.Scratch | None = None

    def close(self) -> None:
        """Unmaps the population and removes the run's scratch and shared memory (every exit path)."""
        _release(self.pop, self.scratch, self.node)


def _release(pop: Population | None, scratch: rundir.Scratch | None, node: node_share.NodePopulation | None) -> None:
    if pop is not None:
        pop.close()
    if scratch is not None:
        scratch.remove()
    if node is not None:
        node.remove()


def build_storage(setup: Setup) -> Storage:
    """The population of the setup's models on --population-on (empty slots for the extra individuals), the
    evaluation model bound to its arena, the base model loaded; removes what it made if it fails."""
    cfg, ranks, inputs = setup.cfg, setup.ranks, setup.inputs
    device, n_models = inputs.placement.device, len(cfg.models)
    on_disk = cfg.population_on == "disk"
    # the disk tier's files go into a fresh directory of ours, removed when the run ends
    disk_parent = (cfg.population_dir or cfg.out, "--population-dir" if cfg.population_dir else "--out")
    node = scratch = pop = None

    def make(root: str | None, writes: bool = True):
        return make_population(
            cfg.population_on,
            inputs.layout,
            inputs.files,
            list(cfg.models),
            device,
            disk_dir=root if on_disk else None,
            extra=inputs.n - n_models,
            shared_dir=root if node is not None and not on_disk else None,
            writes=writes,
        )

    try:
        if ranks.node_writer:  # shared-memory populations of killed runs (no live writer holds their lock)
            rundir.remove_stale_scratch(node_share.shm_root())
        if node_share.shared(cfg.population_on, device, ranks):  # once per node (node_share.py)
            node = node_share.NodePopulation(ranks)
            pop = node.create(make, *(disk_parent if on_disk else (node_share.shm_root(), "EVOLVER_SHM_DIR")))
        else:
            if on_disk:
                scratch = rundir.Scratch(*disk_parent)
            pop = make(scratch.path if scratch else None)
        arena = inputs.placement.arena()
        inputs.placement.bind(inputs.model, arena, inputs.files[0])
        base = None
        if cfg.base_model:
            base = model_io.load_model_arena(
                inputs.layout, inputs.base_files, f"--base-model {cfg.base_model}", inputs.placement.arena()
            )
        pipeline = WeightPipeline(pop, device, chunk=cfg.chunk_elements, backend=cfg.backend)
    except BaseException:
        _release(pop, scratch, node)
        raise
    return Storage(pop, arena, base, pipeline, node, scratch)
