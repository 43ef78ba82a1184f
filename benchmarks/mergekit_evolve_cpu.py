"""Run mergekit-evolve (mergekit 0.1.5, `mergekit.scripts.evolve:main`) on a machine without a GPU: its own click
command, in this process, with the few patches it needs to start there. Every argument is passed through to it:

    python benchmarks/mergekit_evolve_cpu.py GENOME.yml --storage-path DIR --max-fevals N --strategy serial \
        --task-search-path TASKDIR [--batch-size B] [--random-seed S] [--cma-seed C] [any mergekit-evolve option]

`--cma-seed C` is this launcher's only option of its own (see "Seeds"). It puts `--no-merge-cuda` in front of the
arguments (mergekit merges on CUDA by default; a `--merge-cuda` given later wins). `ray` and `cma` are
pip-installed into this interpreter when they do not import (RAY, CMA: mergekit's `evolve` extra).

What is patched, and why (nothing else is; with a real GPU and vLLM present, patches 1 to 3 step aside):
1. `lm_eval.models.vllm_causallms`: a stand-in module whose `VLLM` class refuses to be built, in this process and,
   through Ray's `runtime_env={"worker_process_setup_hook": ...}`, in every Ray worker. mergekit names
   `lm_eval.models.vllm_causallms.VLLM` in a class annotation of mergekit/evo/actors.py (evaluated at import) and
   calls `monkeypatch_lmeval_vllm()` (which sets `VLLM.AUTO_MODEL_CLASS`) before every evaluation even with
   `--no-vllm`; the real module imports vllm, which a CPU machine does not have. Only when vllm is missing.
2. `ray.init(num_gpus=1)`: one logical GPU is advertised. mergekit's Ray tasks and actors each ask for
   `num_gpus=1` and would wait forever on a CPU node ("No available node types can fulfill resource request
   {'CPU': 1.0, 'GPU': 1.0}"); with one, they run one at a time, which `--strategy serial` does anyway. Only when
   torch sees no CUDA device. The dashboard is not started (it is not needed and costs start-up time).
3. `lm_eval.simple_evaluate`: `device` defaults to "cpu". mergekit passes no device, and lm-eval's HF model then
   defaults to "cuda" whatever the machine has. In this process and every Ray worker (the hook of 1); only when
   torch sees no CUDA device.
4. `cma.fmin2`'s options: its data logs (`outcmaes/*.dat`, which cma writes into the working directory by
   default) go to <storage-path>/outcmaes/, and `--cma-seed` becomes cma's `seed`.
5. The environment, only where unset: `HF_DATASETS_CACHE` = <storage-path>/hf_datasets (lm-eval loads the local
   JSON tasks through `datasets`, which caches under ~/.cache otherwise) and `RAY_AUTH_TOKEN` = a new random token
   (Ray 2.60 turns token authentication on for a local cluster and would save a token in ~/.ray/auth_token), so
   that a run writes only under its storage path and /tmp (Ray's session files, /tmp/ray).
Not patched: Ray runs a task that asks for one CPU with OMP_NUM_THREADS=1, so torch in mergekit's workers uses
one thread unless OMP_NUM_THREADS is set for this command (Ray passes a value it finds on to its workers).

Seeds. mergekit-evolve's `--random-seed` (default 0) only reaches `MergeOptions.random_seed`, the seed of the
randomised merge methods (dare_*); it does not seed CMA-ES. mergekit passes cma no `seed`, and cma's default
is 'time': it seeds numpy from the clock, so two runs of the same command sample different genotypes. With
`--cma-seed C` (an integer >= 1: cma reads 0 as "from the clock" too) a run is reproducible: the start point is
fixed (all weights 1/n, density 1, unless the config sets `random_init`), lm-eval seeds itself (its defaults
0 and 1234), the serial strategy returns the scores in the order of the genotypes, and task_arithmetic is
deterministic. Checked on tiny Llamas: two serial runs with the same --cma-seed wrote the same best_config.yaml
and byte-identical final_model/model.safetensors.

Fitness evaluations. cma counts one per genotype scored. It asks for whole generations of `popsize`
(`--force-population-size`; default int(4 + 3 ln N) for N = layer groups x models x parameters per model), stops
at the end of the first generation after which `evaluations - 1 >= --max-fevals` (or earlier on one of its own
criteria, e.g. a flat fitness), and then scores the final mean once more (through the same parallel objective).
So g generations cost g x popsize + 1 evaluations, and `--max-fevals g x popsize - 1` runs exactly g: with
`--max-fevals 6` and popsize 9 a run scores 9 + 1 = 10. mergekit prints "Received <n> genotypes" for each batch
and cma ends with "... after <evaluations>/<the best's index> evaluations".

What it writes under --storage-path: input_models/<id>/ (each input model resharded into one bf16 safetensors
file, with its tokenizer), merged/ (each candidate merged to disk, deleted after its evaluation),
transformers_cache/, lora_merge_cache/, best_config.yaml (rewritten at every new best seen at a generation's
end; it names the resharded copies under input_models/), final_model/ (cma's best genotype merged again from the
original model paths, with tokenizer and mergekit_config.yml; `--no-save-final-model` skips it), and, from
patches 4 and 5, outcmaes/ and hf_datasets/. Merges are bfloat16 (the genome's merge config sets dtype bfloat16)
and lm-eval's HF model loads them in bfloat16 (mergekit's model_args), whatever the input models' dtype.

Strategies on a CPU: `--strategy serial` runs (each candidate merged to disk by one Ray task, loaded and scored
by lm-eval in another; one at a time; every task starts a fresh worker process, which imports torch,
transformers, lm-eval and mergekit again). `--strategy pool` on disk fails here: its actor calls
`torch.cpu.empty_cache()`, which torch does not have. `--in-memory` (pool only; serial and buffered refuse it)
fails in mergekit 0.1.5 itself, not because of the CPU: `MergePlanner.plan_in_memory` builds `ReturnTensor`s
that pydantic 2.14 refuses ("Can't instantiate abstract class Task[Tensor] with abstract methods arguments,
execute").
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import os
import secrets
import subprocess
import sys
import types

RAY = "ray==2.60.0"
CMA = "cma==4.5.0"
CPU_DEFAULTS = ["--no-merge-cuda"]  # before the user's arguments: click takes the last one given


def ensure_packages() -> None:
    """pip-installs ray and cma into this interpreter when they do not import (mergekit lists them in its
    `evolve` extra, not in its dependencies)."""
    missing = [spec for module, spec in (("ray", RAY), ("cma", CMA)) if importlib.util.find_spec(module) is None]
    if missing:
        print(f"[mergekit-evolve-cpu] installing {' '.join(missing)}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)
        importlib.invalidate_caches()


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def install_cpu_patches() -> None:
    """Patches 1 and 3 of the module docstring, in the calling process. Idempotent. Ray runs it in each worker
    before the worker unpickles its first task (which imports mergekit.evo.actors), so it must be self-contained:
    it is pickled by value from this script."""
    if importlib.util.find_spec("vllm") is None and "lm_eval.models.vllm_causallms" not in sys.modules:
        import lm_eval.models

        class VLLM:
            """Stand-in for lm-eval's vLLM model on a machine without vllm (mergekit only names it)."""

            def __init__(self, *args, **kwargs):
                raise RuntimeError("vllm is not installed (mergekit_evolve_cpu.py's stand-in): run with --no-vllm")

        stand_in = types.ModuleType("lm_eval.models.vllm_causallms")
        stand_in.VLLM = VLLM
        sys.modules[stand_in.__name__] = stand_in
        lm_eval.models.vllm_causallms = stand_in
    if _no_gpu():
        import lm_eval

        original = lm_eval.simple_evaluate  # lm_eval's lazy __getattr__; a plain attribute from here on
        if not getattr(original, "cpu_default", False):

            @functools.wraps(original)
            def simple_evaluate(*args, device=None, **kwargs):
                return original(*args, device=device or "cpu", **kwargs)

            simple_evaluate.cpu_default = True
            lm_eval.simple_evaluate = simple_evaluate


def _patch_cma(log_dir: str, seed: int | None) -> None:
    """Patch 4: cma's logs under the storage path, and its seed."""
    import cma

    original = cma.fmin2

    @functools.wraps(original)
    def fmin2(*args, options=None, **kwargs):
        options = {"verb_filenameprefix": log_dir + os.sep, **(options or {})}
        if seed is not None:
            options["seed"] = seed
        return original(*args, options=options, **kwargs)

    cma.fmin2 = fmin2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--cma-seed", type=int)
    own.add_argument("--storage-path")
    known, rest = own.parse_known_args(argv)
    if known.cma_seed is not None and known.cma_seed < 1:
        sys.exit("--cma-seed must be >= 1 (cma takes 0 as 'seed from the clock')")
    if known.storage_path is not None:
        known.storage_path = os.path.abspath(known.storage_path)
        rest += ["--storage-path", known.storage_path]
        os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(known.storage_path, "hf_datasets"))
    if not any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        # Ray's processes inherit it: token authentication stays on and no ~/.ray/auth_token is written
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

    ensure_packages()
    install_cpu_patches()
    if "-h" in rest or "--help" in rest:
        from mergekit.scripts.evolve import main as evolve

        print("mergekit-evolve on a CPU (benchmarks/mergekit_evolve_cpu.py: its docstring says what it patches)")
        print("--cma-seed C: cma's seed, an integer >= 1 (by default cma seeds itself from the clock)\n")
        evolve.main(args=["--help"], prog_name="mergekit-evolve", standalone_mode=False)
        return 0
    import ray

    env_vars = {k: os.environ[k] for k in ("HF_DATASETS_CACHE",) if k in os.environ}
    ray.init(
        num_gpus=1 if _no_gpu() else None,
        include_dashboard=False,
        runtime_env={"worker_process_setup_hook": install_cpu_patches, "env_vars": env_vars},
    )
    if known.storage_path is not None:
        _patch_cma(os.path.join(known.storage_path, "outcmaes"), known.cma_seed)

    from mergekit.scripts.evolve import main as evolve

    try:
        # standalone_mode=False: errors propagate (exit 1) and --help returns instead of exiting
        evolve.main(args=CPU_DEFAULTS + rest, prog_name="mergekit-evolve", standalone_mode=False)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
