"""The Evolver algorithm and `python -m evolver_kernels.evolve` (shared/DESIGN.md sections 1 and 6).

Random choices, all derived from the run seed through Philox (evolver_kernels.rng), so a run is
reproducible from its config alone and a resumed run repeats exactly what an uninterrupted one does:
  visiting order of generation g (sequential)  random_order(seed, N, g, 0xFFFFFFFF)
  partners of individual i in generation g     random_order(seed, N, g, i), without i (and without the
                                               best individual for best/1), first 1 to 3
  crossover seed of that offspring             derive_seed(seed, g, i, PURPOSE_OFFSPRING), stream 0
  DARE seed of --merge-method dare_* and of    derive_seed(seed, 0, 0, PURPOSE_MERGE)
  --extra-individuals dare_*
Generation numbers start at 1; generation 0 in the history is the initial population.

The population is the models, then one individual per --extra-individuals merge of the models (built before
generation 0, deterministically, so a resumed run rebuilds them exactly). --merge-method fisher / regmean
estimate their statistics on the dev data once per individual before generation 0 and keep them with the
checkpoint (merge_stats.py).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time

import torch

from . import backends, merge_stats, model_io, rundir
from .arena import Arena, Layout, load_into, resolve_names, safetensors_files, tensor_index
from .checkpoint import Checkpoint
from .config import ConfigError, EvolveConfig, inputs, parse_config, validate
from .distributed import Ranks, leave, process_group_up
from .errors import UserError, describe_error
from .evaluate import Evaluator, Fitness, infer_task
from .merging import Merger
from .offspring import OffspringSpec, WeightPipeline
from .population import PopulationPrefix, make_population
from .report import plot_fitness, write_evolution_json, write_model_card
from .rng import MASK32, PURPOSE_MERGE, PURPOSE_OFFSPRING, derive_seed, random_order
from .rundir import format_bytes as _bytes

PARTNERS = {"evolver": 1, "rand/1": 3, "best/1": 2}


def _host_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def best_index(fitness: list[float]) -> int:
    """The best individual: highest fitness, the lowest index among ties."""
    return max(range(len(fitness)), key=lambda k: (fitness[k], -k))


def offspring_spec(cfg: EvolveConfig, n: int, generation: int, i: int, fitness: list[float] | None) -> OffspringSpec:
    """The offspring of individual i in `generation`: partners and crossover seed, from the run seed."""
    exclude = {i}
    best = None
    if cfg.strategy == "best/1":
        best = best_index(fitness)
        exclude.add(best)
    candidates = [k for k in random_order(cfg.seed, n, generation, i) if k not in exclude]
    picks = tuple(candidates[: PARTNERS[cfg.strategy]])
    if best is not None:
        picks = (best,) + picks
    seed = derive_seed(cfg.seed, generation, i, PURPOSE_OFFSPRING)
    return OffspringSpec(i=i, strategy=cfg.strategy, picks=picks, F=float(cfg.F), CR=float(cfg.CR), seed=seed)


def visiting_order(cfg: EvolveConfig, n: int, generation: int) -> list[int]:
    if cfg.schedule == "synchronous":
        return list(range(n))
    return random_order(cfg.seed, n, generation, MASK32)


class Run:
    """One evolution run: models, data, population, evaluation model, checkpoint; `run()` does the work."""

    def __init__(self, cfg: EvolveConfig, log=print):
        validate(cfg)
        self.cfg = cfg
        self.log = log
        self.out_dir: rundir.OutputDir | None = None
        self.scratch: rundir.Scratch | None = None
        self.pop = None
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: torch sees no CUDA GPU")
        self.ranks = Ranks.from_env(self.device.type)
        if self.ranks.enabled and cfg.schedule != "synchronous":
            raise ConfigError(
                f"{self.ranks.world} ranks need --schedule synchronous (the sequential schedule is serial by definition)"
            )
        self.device = self.ranks.device(self.device)
        self.dry_run = cfg.dry_run
        if not self.dry_run and self.ranks.is_main:
            # claimed before anything is written (pickle conversions, checkpoints, scratch): ours, locked
            self.out_dir = rundir.OutputDir.claim(cfg.out, "evolve", inputs(cfg))
        self.ranks.barrier()  # the other ranks write nothing before rank 0 holds --out
        try:
            self._setup()
        except BaseException:
            self.close(failed=True)
            raise

    def _setup(self) -> None:
        cfg = self.cfg
        configs = [model_io.load_config(m) for m in cfg.models]
        for m, c in zip(cfg.models[1:], configs[1:]):
            if c.model_type != configs[0].model_type or (c.architectures or [None])[0] != (configs[0].architectures or [None])[0]:
                raise ConfigError(
                    f"--models {m} is a {c.model_type} {c.architectures}, {cfg.models[0]} a {configs[0].model_type} "
                    f"{configs[0].architectures}: the models must share one architecture"
                )
        self.config = configs[0]
        self.task = cfg.task or infer_task(self.config)
        self.files = [self._weight_files(m) for m in cfg.models]
        self.model = model_io.empty_model(self.config, self.task)
        self.layout = Layout.of_model(self.model)
        for m, files in zip(cfg.models, self.files):
            resolve_names(self.layout, tensor_index(files), f"--models {m}")
        self.base_files = self._weight_files(cfg.base_model) if cfg.base_model else None
        if self.base_files:
            resolve_names(self.layout, tensor_index(self.base_files), f"--base-model {cfg.base_model}")
        self.device_map = self._device_map() if cfg.device_map else None
        if self.device_map is not None:
            if self.ranks.enabled:
                raise ConfigError("--device-map and several ranks cannot be combined (one evaluation model per run)")
            cuda = [d for d in self.device_map.values() if d.startswith("cuda")]
            self.device = torch.device(cuda[0] if cuda else "cpu")  # inputs, chunk buffers, the pipeline's device
        self._check_backend()

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.models[0], trust_remote_code=False)
        self.evaluator = Evaluator(
            self.task, self.tokenizer, cfg.dev, config=self.config, metric=cfg.metric, batch_size=cfg.batch_size,
            max_length=cfg.max_length, device=self.device, threshold=cfg.threshold, max_examples=cfg.max_dev_examples,
        )
        self.n_models = len(cfg.models)
        self.extras = list(cfg.extra_individuals or [])
        self.n = self.n_models + len(self.extras)
        self.checkpoint = Checkpoint(cfg.out)
        self.checkpoint.check()
        if self.checkpoint.finished():
            raise ConfigError(f"--out {cfg.out} holds a finished run (its outputs are there): choose another --out")
        if self.checkpoint.exists() and not cfg.resume:
            raise ConfigError(f"--out {cfg.out} holds a checkpointed run: pass --resume to continue it, or choose another --out")
        if cfg.resume and not self.checkpoint.exists():
            raise ConfigError(f"--resume: no checkpoint in {cfg.out}")
        plan, problem = self.memory_plan()
        self.log(plan)
        if problem:
            raise ConfigError(problem)
        if self.dry_run:
            return
        disk_dir = None
        if cfg.population_on == "disk":  # a fresh directory of ours, removed when the run ends
            self.scratch = rundir.Scratch(cfg.population_dir or cfg.out, "--population-dir" if cfg.population_dir else "--out")
            disk_dir = self.scratch.path
        self.pop = make_population(cfg.population_on, self.layout, self.files, list(cfg.models), self.device,
                                   disk_dir=disk_dir, extra=len(self.extras))
        self.arena = self._model_arena()
        if self.arena.is_placed:
            model_io.place_model(self.model, self.arena, self.files[0], self.device_map, self.device)
        else:
            model_io.attach_arena(self.model, self.arena, self.files[0], self.device)
        self.base = None
        if cfg.base_model:
            self.base = self._model_arena()
            load_into(self.base, self.base_files, f"--base-model {cfg.base_model}")
        self.weights_s = 0.0
        self.evaluation_s = 0.0
        self.non_finite = 0
        self.pipeline = WeightPipeline(self.pop, self.device, chunk=cfg.chunk_elements, backend=cfg.backend)
        for j, method in enumerate(self.extras):
            self.log(f"extra individual #{self.n_models + j}: {method} of the {self.n_models} models")
            self._timed(self._merger(method), PopulationPrefix(self.pop, self.n_models), self.arena, cfg.chunk_elements)
            self._timed(self.pipeline.write_from, self.n_models + j, self.arena)
        self.pipeline.merger = self._merger(cfg.merge_method, **self._merge_stats())

    def _check_backend(self) -> None:
        """--backend must run on every device the kernels will: the compute device and, with --device-map,
        each device that holds a part of the evaluation model. Checked before any heavy work."""
        if self.cfg.backend is None:
            return
        devices = {str(self.device)} | set(self.device_map.values() if self.device_map else ())
        for device in sorted(devices):
            reason = backends.unavailable_reason(self.cfg.backend, device)
            if reason is not None:
                where = " (--device-map places modules there)" if self.device_map and device in self.device_map.values() else ""
                raise ConfigError(f"--backend {self.cfg.backend} cannot run on {device}{where}: {reason}; "
                                  "leave --backend unset to use the fastest backend of each device")

    def _placed(self) -> bool:
        return self.device_map is not None and len(self.device_map) > 1

    def _model_arena(self) -> Arena:
        """An arena for a whole model on the compute side: on the compute device, or placed by --device-map."""
        if not self._placed():
            return Arena.empty(self.layout, self.device)

        def place(entry):
            key = model_io.device_for(entry.name, self.device_map)
            return key, torch.device(self.device_map[key])

        return Arena.placed(self.layout, place)

    def _device_bytes(self) -> dict[str, int]:
        """Bytes of one model copy per device: on the compute device, or as --device-map places it."""
        if not self._placed():
            return {"cpu" if self.device.type == "cpu" else str(self.device): self.layout.nbytes}
        per_device: dict[str, int] = {}
        for e in self.layout.entries:
            device = self.device_map[model_io.device_for(e.name, self.device_map)]
            per_device[device] = per_device.get(device, 0) + e.numel * self.layout.group_dtype(e.group).itemsize
        return per_device

    def _device_map(self) -> dict[str, str]:
        """--device-map as {module name: device}, checked: devices that exist, tied weights kept together."""
        spec = self.cfg.device_map
        if spec == "auto":
            from accelerate import infer_auto_device_map

            raw = infer_auto_device_map(self.model, no_split_module_classes=sorted(getattr(self.model, "_no_split_modules", None) or []))
        else:
            import json

            try:
                with open(spec) as f:
                    raw = json.load(f)
            except (OSError, json.JSONDecodeError) as err:
                raise ConfigError(f"--device-map {spec}: not a readable JSON object ({err})") from err
            if not isinstance(raw, dict) or not raw:
                raise ConfigError(f"--device-map {spec}: must be a non-empty JSON object {{module name: device}}")
        device_map = {}
        for key, device in raw.items():
            device = f"cuda:{device}" if isinstance(device, int) else str(device)
            if device == "cuda":
                device = "cuda:0"
            if device != "cpu" and not device.startswith("cuda:"):
                raise ConfigError(f"--device-map: {key!r} on {device!r}; devices are cpu, cuda:N or a GPU index "
                                  "(disk offload is not supported: use --population-on disk for the population)")
            if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
                raise ConfigError(f"--device-map: {key!r} on {device}, but torch sees {torch.cuda.device_count()} GPU(s)")
            if key:
                try:
                    self.model.get_submodule(key)
                except AttributeError as err:
                    raise ConfigError(f"--device-map: the model has no module {key!r}") from err
            device_map[key] = device
        for e in self.layout.entries:
            devices = {device_map[model_io.device_for(alias, device_map)] for alias in e.aliases}
            if len(devices) > 1:
                raise ConfigError(f"--device-map puts the tied weights {', '.join(e.aliases)} on {sorted(devices)}: "
                                  "tied weights must share a device")
        return device_map

    def _merger(self, method: str, **stats) -> Merger:
        cfg = self.cfg
        return Merger(method, self.base, scale=cfg.merge_scale, density=cfg.merge_density, drop_p=cfg.merge_drop_p,
                      seed=derive_seed(cfg.seed, 0, 0, PURPOSE_MERGE), backend=cfg.backend, **stats)

    def _merge_stats(self) -> dict:
        """Fisher information or Gram matrices of every individual (as the run starts), estimated once and kept
        in the checkpoint directory (written atomically), so that a resumed run merges with the same ones."""
        method = self.cfg.merge_method
        if method not in merge_stats.STATS_METHODS:
            return {}
        path = os.path.join(self.checkpoint.dir, f"{method}-stats.safetensors")
        if self.cfg.resume and os.path.isfile(path):
            self.log(f"{method}: statistics from {path}")
            return merge_stats.load_merger_statistics(method, self.layout, self.n, path, self.cfg.merge_alpha)
        start = time.perf_counter()

        def load(k: int) -> None:
            self.pipeline.copy_into(k, self.arena)

        def progress(k: int) -> None:
            self.log(f"{method}: statistics of individual {k + 1}/{self.n} ({time.perf_counter() - start:.1f} s)")

        os.makedirs(self.checkpoint.dir, exist_ok=True)
        result = merge_stats.merger_statistics(method, self.model, self.layout, load, self.n, self.evaluator,
                                               self.cfg.merge_examples, self.cfg.merge_alpha, save_to=path,
                                               progress=progress)
        self.evaluation_s += time.perf_counter() - start
        return result

    def _weight_files(self, model_dir: str) -> list[str]:
        try:
            return safetensors_files(model_dir)
        except ValueError:
            if not self.cfg.allow_pickle:
                raise
        if self.dry_run:  # converted into a temporary directory, removed when the run object closes
            if getattr(self, "_dry_converted", None) is None:
                self._dry_converted = tempfile.mkdtemp(prefix="evolver-dry-run-")
            root = self._dry_converted
        else:
            root = os.path.join(self.cfg.out, "converted")
        # one directory per source (its real path and its files' sizes and times): two models whose folders
        # share a name never share a conversion, and a changed source is converted again
        dest = os.path.join(root, model_io.conversion_key(model_dir))
        if self.ranks.is_main:
            model_io.convert_pickle_weights(model_dir, dest)
        self.ranks.barrier()
        return [os.path.join(dest, "model.safetensors")]

    def memory_plan(self) -> tuple[str, str | None]:
        """The plan printed before any heavy work, and a refusal (naming the numbers) when it cannot fit."""
        cfg = self.cfg
        copy = self.layout.nbytes
        # a merge's n input chunks, twice when staged (double buffering, staging.py), offspring chunks, fp32 work
        chunk = cfg.chunk_elements * 4 * (2 * self.n + 5)
        pop_bytes = self.n * copy
        copies = 2 if cfg.base_model else 1  # the evaluation arena, and the base model's for merges
        evaluation = {d: b * copies for d, b in self._device_bytes().items()}
        stats = self._stats_bytes()
        # causal-LM scoring: the logits of one forward and the copies cross-entropy makes (evaluate.py)
        logits = 4 * self.evaluator.logits_budget if self.task == "causal-lm" else 0
        host_need = chunk + stats + evaluation.get("cpu", 0) + (logits if self.device.type == "cpu" else 0)
        # the compute device holds the chunk buffers; with --device-map, other GPUs hold only their share
        others = {d: b for d, b in evaluation.items() if d not in ("cpu", str(self.device))}
        device_need = chunk + evaluation.get(str(self.device), 0) + logits if self.device.type == "cuda" else 0
        scratch_root = cfg.population_dir or cfg.out
        pop_disk = 0
        if cfg.population_on == "disk":
            pop_disk = pop_bytes + copy  # a replacement is written beside the file it replaces
        elif cfg.population_on == "gpu" and self.device.type == "cuda":
            device_need += pop_bytes
        else:
            host_need += pop_bytes
        # under --out: checkpointed individuals (each replaced one is written before its old file goes; the disk
        # tier hard-links its own files when they share a filesystem), the statistics, the output model
        linked = cfg.population_on == "disk" and rundir.same_filesystem(scratch_root, cfg.out)
        checkpoint = 0 if linked else (self.n + 1) * copy
        out_disk = checkpoint + stats + copy
        disk_need = pop_disk + out_disk
        lines = [
            f"memory plan: one model copy = {_bytes(copy)} ({self.layout.numel:,} evolved elements); "
            f"population: {self.n} copies on {cfg.population_on} ({_bytes(pop_bytes)}); "
            f"evaluation model: 1 copy on {self._placement()}" + ("; base model: 1 copy there" if cfg.base_model else "")
            + f"; chunk buffers <= {_bytes(chunk)}"
            + (f"; evaluation logits <= {_bytes(logits)}" if logits else "")
            + (f"; {cfg.merge_method} statistics (host): {_bytes(stats)}" if stats else ""),
            f"  needs: host {_bytes(host_need)}" + (f", {self.device} {_bytes(device_need)}" if device_need else "")
            + (f", disk {_bytes(disk_need)}" if disk_need else ""),
        ]
        problem = None
        host_free = _host_available()
        if host_free is not None and host_need > host_free:
            problem = f"the plan needs {_bytes(host_need)} of host memory, {_bytes(host_free)} is available"
        for device, need in [(str(self.device), device_need)] * bool(device_need) + list(others.items()):
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            if need > free:
                problem = f"the plan needs {_bytes(need)} on {device}, {_bytes(free)} is free"
        disk = rundir.disk_problem([("the population", scratch_root, pop_disk),
                                    ("checkpoint and output", cfg.out, out_disk)])
        if disk:
            problem = disk
        if problem:
            problem += " (try --population-on cpu or disk, fewer models, or another --device)"
        return "\n".join(lines), problem

    def _placement(self) -> str:
        if not self._placed():
            return str(self.device)
        return "several devices (--device-map: " + ", ".join(f"{d} {_bytes(b)}" for d, b in self._device_bytes().items()) + ")"

    def _stats_bytes(self) -> int:
        """Host bytes of the Fisher / RegMean statistics: n fp32 model copies (Fisher); n Gram matrices per
        linear layer plus n fp32 copies of the linear weights (RegMean)."""
        if self.cfg.merge_method == "fisher":
            return self.n * 4 * self.layout.numel
        if self.cfg.merge_method == "regmean":
            layers = merge_stats.linear_entries(self.model, self.layout).values()
            return self.n * 4 * sum(e.shape[1] ** 2 + e.numel for e in layers)
        return 0

    # -- the pieces of a step --------------------------------------------------------------------------------
    def evaluate(self, what: str = "a candidate") -> Fitness:
        """Scores the evaluation model. A NaN (or infinite) fitness is ranked last: -inf, with a warning, so
        that it is never chosen as best and never blocks an improvement."""
        start = time.perf_counter()
        fit = self.evaluator(self.model)
        self.evaluation_s += time.perf_counter() - start
        if not math.isfinite(fit.score):
            self.non_finite += 1
            self.log(f"warning: {what} has fitness {fit.score} ({', '.join(f'{k} {v}' for k, v in fit.per_file.items())}): "
                     "ranked last (-inf); NaN weights or a user function returning NaN are the usual causes")
            fit = Fitness(-math.inf, {k: (v if math.isfinite(v) else -math.inf) for k, v in fit.per_file.items()})
        return fit

    def _timed(self, fn, *args, **kw):
        start = time.perf_counter()
        fn(*args, **kw)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.weights_s += time.perf_counter() - start

    def better(self, new: float, old: float) -> bool:
        return new > old or (self.cfg.accept_ties and new == old)

    def candidate_fitness(self, spec: OffspringSpec) -> Fitness:
        if self.cfg.fitness == "individual":
            self._timed(self.pipeline.offspring_into, spec, self.arena)
        else:
            self._timed(self.pipeline.merged_into, self.arena, replace=[spec])
        return self.evaluate(f"the offspring of individual {spec.i}")

    def accept(self, state: dict, specs: list[OffspringSpec], scores: dict[int, float]) -> None:
        """Replaces each spec's parent by its offspring (already in the arena for a lone individual-mode one)."""
        if self.cfg.fitness == "individual" and len(specs) == 1 and self.cfg.schedule == "sequential":
            self._timed(self.pipeline.write_from, specs[0].i, self.arena)
        else:
            self._timed(self.pipeline.apply, specs)
        for spec in specs:
            if state["fitness"] is not None:
                state["fitness"][spec.i] = scores[spec.i]

    # -- the run ---------------------------------------------------------------------------------------------
    def run_config(self) -> dict:
        """The options that define the run's result (what --resume must match)."""
        config = self.cfg.to_dict()
        for transient in ("resume", "dry_run"):
            config.pop(transient)
        return config

    def fresh_state(self) -> dict:
        config = self.run_config()
        return {
            "config": config, "generation": 0, "position": 0, "fitness": None, "merged_fitness": None,
            "pending": {}, "pending_per_file": {}, "per_file": {}, "accepted_now": [], "history": [], "evaluations": 0,
        }

    def load_state(self) -> dict:
        state = self.checkpoint.load_state()
        config = self.run_config()
        differing = sorted(k for k in set(config) | set(state["config"]) if config.get(k) != state["config"].get(k))
        if differing:
            raise ConfigError(
                "--resume with a different configuration: "
                + ", ".join(f"{k} (checkpoint {state['config'].get(k)!r}, now {config.get(k)!r})" for k in differing)
            )
        self.checkpoint.restore(state, self.pop)
        return state

    def population_fitness(self, state: dict):
        return list(state["fitness"]) if self.cfg.fitness == "individual" else state["merged_fitness"]

    def close(self, failed: bool = False) -> None:
        """Unmaps the population, removes the scratch directory and drops the lock on --out (every exit path).
        A run that failed before writing anything removes the --out directory it created."""
        if getattr(self, "_bar", None) is not None:
            self._bar.close()
        if self.pop is not None and hasattr(self.pop, "close"):
            self.pop.close()
        if self.scratch is not None:
            self.scratch.remove()
        if getattr(self, "_dry_converted", None):
            shutil.rmtree(self._dry_converted, ignore_errors=True)
            self._dry_converted = None
        if self.out_dir is not None:
            self.out_dir.release(remove_if_unused=failed)

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.dry_run:
            return {"dry_run": True}
        state = self.load_state() if cfg.resume else self.fresh_state()
        extra_merged = 1 if (cfg.fitness == "merged" and cfg.schedule == "synchronous") else 0
        total = (self.n if cfg.fitness == "individual" else 1) + cfg.generations * (self.n + extra_merged)
        ranks = self.ranks
        bar = tqdm(total=total, initial=min(state["evaluations"], total), desc="evolve", unit="eval", file=sys.stderr,
                   disable=os.environ.get("EVOLVER_PROGRESS", "1") == "0" or not ranks.is_main)
        self._bar = bar  # closed by close() on every exit path, so an error message starts on its own line

        if state["generation"] == 0:  # the initial population's fitness
            if cfg.fitness == "individual":
                fits = {}
                for i in range(self.n):
                    if ranks.mine(i):
                        self._timed(self.pipeline.copy_into, i, self.arena)
                        fits[str(i)] = self.evaluate(f"individual {i}").as_dict()
                    bar.update(1)
                fits = ranks.gather(fits)
                state["fitness"] = [fits[str(i)]["score"] for i in range(self.n)]
                state["per_file"] = {k: v["per_file"] for k, v in fits.items()}
            else:
                if ranks.is_main:
                    self._timed(self.pipeline.merged_into, self.arena)
                fit = ranks.broadcast(self.evaluate("the merged population").as_dict() if ranks.is_main else None)
                state["merged_fitness"] = fit["score"]
                state["per_file"] = {"merged": fit["per_file"]}
                bar.update(1)
            state["evaluations"] = bar.n
            state["history"].append(self._history_entry(state, 0, []))
            state["generation"] = 1
            self._save(state, [])

        while state["generation"] <= cfg.generations:
            g = state["generation"]
            order = visiting_order(cfg, self.n, g)
            while state["position"] < self.n:
                i = order[state["position"]]
                bar.update(1)
                state["evaluations"] += 1
                state["position"] += 1
                if not ranks.mine(i):
                    continue  # another rank scores this offspring; its score arrives with the gather below
                spec = offspring_spec(cfg, self.n, g, i, state["fitness"])
                fit = self.candidate_fitness(spec)
                score = fit.score
                changed = []
                if cfg.schedule == "synchronous":
                    state["pending"][str(i)] = score
                    state["pending_per_file"][str(i)] = fit.per_file
                else:
                    parent = state["fitness"][i] if cfg.fitness == "individual" else state["merged_fitness"]
                    if self.better(score, parent):
                        self.accept(state, [spec], {i: score})
                        if cfg.fitness == "merged":
                            state["merged_fitness"] = score
                            state["per_file"]["merged"] = fit.per_file
                        else:
                            state["per_file"][str(i)] = fit.per_file
                        state["accepted_now"].append(i)
                        changed = [i]
                if not ranks.enabled:  # ranks checkpoint at generation ends: their pending scores are split
                    self._save(state, changed)  # after every evaluation; individuals when accepted
                bar.set_postfix(gen=g, best=f"{self._best(state):.4f}")
            changed = []
            if cfg.schedule == "synchronous":
                state["pending"] = ranks.gather(state["pending"])
                state["pending_per_file"] = ranks.gather(state["pending_per_file"])
                changed = self._end_synchronous_generation(state, g, bar)
            entry = self._history_entry(state, g, sorted(state["accepted_now"]))
            state["history"].append(entry)
            per_file = ", ".join(f"{name} {score:.4f}" for name, score in entry["per_file"].items())
            self.log(f"generation {g}: fitness {self._describe(state)}, accepted {entry['accepted']}; "
                     f"{'merged' if cfg.fitness == 'merged' else 'best'} model per dev file: {per_file}")
            state.update(generation=g + 1, position=0, pending={}, pending_per_file={}, accepted_now=[])
            self._save(state, changed)
        bar.close()
        if not ranks.is_main:
            return {"rank": ranks.rank, "final_fitness": None}
        return self.finish(state)

    def _save(self, state: dict, changed: list[int]) -> None:
        if self.ranks.is_main:
            self.checkpoint.save(state, self.pop, changed)

    def _end_synchronous_generation(self, state: dict, g: int, bar) -> list[int]:
        cfg = self.cfg
        accepted = []
        for i in range(self.n):
            parent = state["fitness"][i] if cfg.fitness == "individual" else state["merged_fitness"]
            if self.better(state["pending"][str(i)], parent):
                accepted.append(i)
        scores = {i: state["pending"][str(i)] for i in accepted}
        if cfg.fitness == "merged" and len(accepted) > 1:
            # Each offspring improved the merged model alone; together they may not. Score them together
            # and keep the better of the combination and the best single offspring, so the merged fitness
            # never decreases.
            specs = [offspring_spec(cfg, self.n, g, i, state["fitness"]) for i in accepted]
            if self.ranks.is_main:
                self._timed(self.pipeline.merged_into, self.arena, replace=specs)
            combined = self.ranks.broadcast(self.evaluate("the accepted offspring together").as_dict() if self.ranks.is_main else None)
            bar.update(1)
            state["evaluations"] += 1
            best = max(accepted, key=lambda i: (scores[i], -i))
            if combined["score"] < scores[best]:
                accepted = [best]
                state["merged_fitness"] = scores[best]
                state["per_file"]["merged"] = state["pending_per_file"][str(best)]
            else:
                state["merged_fitness"] = combined["score"]
                state["per_file"]["merged"] = combined["per_file"]
        elif cfg.fitness == "merged" and accepted:
            state["merged_fitness"] = scores[accepted[0]]
            state["per_file"]["merged"] = state["pending_per_file"][str(accepted[0])]
        elif cfg.fitness == "individual":
            for i in accepted:
                state["per_file"][str(i)] = state["pending_per_file"][str(i)]
        specs = [offspring_spec(cfg, self.n, g, i, state["fitness"]) for i in accepted]
        self.accept(state, specs, scores)
        state["accepted_now"] = accepted
        return accepted

    def _history_entry(self, state: dict, generation: int, accepted: list[int]) -> dict:
        """Pinned keys (generation, population_fitness, accepted) plus the per-file scores of the best
        individual (fitness individual) or of the merged model (fitness merged)."""
        if self.cfg.fitness == "individual":
            best = best_index(state["fitness"])
            per_file = state["per_file"][str(best)]
        else:
            per_file = state["per_file"]["merged"]
        return {"generation": generation, "population_fitness": self.population_fitness(state), "accepted": accepted,
                "per_file": per_file}

    def _best(self, state: dict) -> float:
        return max(state["fitness"]) if self.cfg.fitness == "individual" else state["merged_fitness"]

    def _describe(self, state: dict) -> str:
        if self.cfg.fitness == "individual":
            return "[" + ", ".join(f"{f:.4f}" for f in state["fitness"]) + "]"
        return f"{state['merged_fitness']:.4f} (merged)"

    def finish(self, state: dict) -> dict:
        cfg = self.cfg
        if cfg.fitness == "individual":
            best = best_index(state["fitness"])
            self._timed(self.pipeline.copy_into, best, self.arena)
            source = cfg.models[best] if best < self.n_models else f"the {self.extras[best - self.n_models]} extra individual"
            kind = f"the best individual (#{best}, from {source})"
        else:
            self._timed(self.pipeline.merged_into, self.arena)
            kind = f"the merge ({self.pipeline.merger.describe()}) of the evolved population"
        final = self.evaluate("the output model")
        written = model_io.save_model(self.arena, cfg.models[0], self.files[0], cfg.out)
        config = dict(state["config"])
        extra = {
            "task": self.task,
            "metric": self.evaluator.metric,
            "output": kind,
            "evaluations": state["evaluations"],
            "timing_s": {"weights": round(self.weights_s, 3), "evaluation": round(self.evaluation_s, 3)},
            "non_finite_evaluations": self.non_finite,
        }
        written += [write_evolution_json(cfg.out, config, state["history"], final.as_dict(), extra),
                    plot_fitness(cfg.out, state["history"], self.evaluator.metric),
                    write_model_card(cfg.out, config, state["history"], final.as_dict(), self.evaluator.metric, kind)]
        self.out_dir.record(written)
        self.checkpoint.mark_finished(state)
        self.log(f"final fitness {final.score:.4f} ({self.evaluator.metric}); wrote {cfg.out}")
        return {"final_fitness": final.score, "per_file": final.per_file, "history": state["history"], **extra}


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        run = Run(cfg, log=lambda msg: print(msg, file=sys.stderr))
        result = run.run()
    except (ConfigError, FileNotFoundError, ValueError, NotImplementedError, OSError) as err:
        print(f"error: {describe_error(err, resumable=True)}", file=sys.stderr)
        if process_group_up():
            # a rank refusing its inputs: leave with the error's code, not through the teardown that can
            # abort with gloo's threads running (Ranks.exit); no barrier, the other ranks may not get there
            leave(2)
        return 2
    if result.get("dry_run"):
        print("dry run: inputs checked, nothing evolved")
    elif result.get("final_fitness") is not None:  # rank 0 reports for every rank
        print(f"final_fitness {result['final_fitness']:.6f}")
    if run.ranks.enabled:
        run.ranks.exit(0)  # every rank, after rank 0 has written the outputs; does not return
    return 0


if __name__ == "__main__":
    sys.exit(main())
