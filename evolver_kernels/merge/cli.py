"""One-shot merges of Hugging Face model directories: `python -m evolver_kernels.merge`.

    python -m evolver_kernels.merge --config merge.yaml --out merged
    python -m evolver_kernels.merge --method ties --base base_dir --models a b c --density 0.5 --out merged

Methods, their parameters, defaults and ranges come from the registry (evolver_kernels/methods/): each method
parameter is a flag `--<param>` (per-model ones take one value or one per model) and a key of the YAML's
`parameters:`. The YAML follows mergekit's conventions and is read strictly (every key honoured or refused):

    merge_method: ties            # or linear (mergekit's name for average), task_arithmetic, dare_ties, slerp, ...
    base_model: path/to/base      # needed by the task-vector methods; as in mergekit, slerp's first model
                                  # (t = 0) and for karcher one more model merged
    models:
      - model: path/to/a
        parameters: {weight: 1.0, density: 0.3}   # per model: weight, and the method's per-model parameters
      - model: path/to/b
    parameters: {density: 0.5, lambda: 1.0, seed: 0}  # global: the method's parameters (a model's own win),
                                                      # weight (default per model), seed, task
    # or slices: [{sources: [{model, layer_range: [first, end], parameters}], parameters}]: layer stacking
    # (passthrough) or layer ranges merged layer by layer; a parameter value may be a gradient over layers
    # ([0, 0.5, 1]) or conditionals ([{filter: mlp, value: 0.3}, {value: 0.5}]), resolved per tensor
    dtype: bfloat16               # inputs cast to it before merging (we compute in fp32 and round once)
    out_dtype: float32            # the output's dtype (default: dtype)
    tokenizer_source: base        # the base model's tokenizer (default: the first model's)
    dev: [dev_a.jsonl, dev_b.jsonl]   # methods with statistics (fisher, regmean): the data they are estimated on

Weights are streamed (docs/ARCHITECTURE.md §5): never a stack of the models; the population lives on
`--population-on` (mapped, the default: the models' own safetensors files, base model included, read through
read-only memory maps, no copy; cpu: loaded into host memory; disk: copied into memory-mapped files in a
scratch directory under --out). Slices and a `dtype` other than the models' need the models re-laid out: mapped
then writes them into files of that scratch directory and maps them. The merged tensors are computed into a
file there too, mapped MAP_SHARED (the kernel writes its pages back and evicts them under memory pressure, so a
merge's anonymous memory is its chunk buffers, whatever the model's size), then written out as safetensors
shards one tensor at a time, each tensor's blocks punched out of the scratch file once written (Arena.discard);
the scratch directory is removed at the end, also on failure. Disk: about the output's size while the merge runs
and is written out (plus the re-laid-out models and base for slices and dtypes).
"""

from __future__ import annotations

import argparse
import sys

from evolver_kernels import methods
from evolver_kernels.errors import describe_error
from evolver_kernels.merge.config import (
    DTYPES,
    POPULATION_ON,
    MergeConfigError,
    MergeSpec,
    flag,
    read_yaml,
)
from evolver_kernels.merge.run import run

# the library's argument names (errors.ArgumentError) as this command's flags
FLAGS = {"model_dir": "--models", "path": "--dev", "task": "--task", "metric": "--metric"}


def build_parser() -> argparse.ArgumentParser:
    """The flags, built now from the registry (methods registered after import are included)."""
    parser = argparse.ArgumentParser(
        prog="python -m evolver_kernels.merge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="mergekit-style YAML (flags below override it)")
    names = [name for m in methods.METHODS.values() for name in (m.name, *m.aliases)]
    parser.add_argument("--method", choices=names, help="merge method (default: average)")
    parser.add_argument("--models", nargs="+", help="model directories to merge")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per model (default: 1 each)")
    parser.add_argument("--base", help="base model directory (the common ancestor)")
    parser.add_argument("--seed", type=int, help="seed of methods that draw random numbers (DARE; default 0)")
    parser.add_argument("--dev", nargs="+", help="methods with statistics: dev data files (JSONL, CSV/TSV)")
    parser.add_argument("--task", help="methods with statistics: task of the dev data (default: from the architecture)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="dtype of the output's tensors (default: the models')")
    parser.add_argument(
        "--population-on",
        choices=POPULATION_ON,
        default="mapped",
        help="mapped (default): read the models' files in place through read-only memory maps; "
        "cpu: load them into host memory; disk: copy them into a scratch directory under --out "
        "(the merged tensors are held in a file there with every choice)",
    )
    parser.add_argument("--out", required=True, help="output model directory (new, empty, or an earlier merge's)")
    group = parser.add_argument_group("method parameters (evolver_kernels/methods/)")
    for name, p in methods.all_params().items():
        users = ", ".join(m.name for m in methods.METHODS.values() if m.param(name) is not None)
        group.add_argument(
            flag(name),
            dest=f"param:{name}",
            type=p.type,
            nargs="+" if p.per_model else None,
            metavar=name.upper(),
            help=f"{p.help}; used by {users}; values: {p.range_text()}"
            f"{' (one, or one per model)' if p.per_model else ''} (default {p.default})",
        )
    return parser


def parse_args(argv: list[str] | None = None) -> MergeSpec:
    args = vars(build_parser().parse_args(argv))
    spec = read_yaml(args["config"], args["method"]) if args["config"] else MergeSpec(out="")
    if args["models"] is not None and (spec.model_settings or spec.slices):
        raise MergeConfigError(f"--models: {spec.where} gives the models already (with their parameters)")
    if args["method"]:
        spec.method = methods.get(args["method"]).name
    for key in ("models", "weights", "base", "seed", "dev", "task", "dtype"):
        if args[key] is not None:
            setattr(spec, key, args[key])
    for key, value in args.items():
        if key.startswith("param:") and value is not None:
            name = key.removeprefix("param:")
            spec.params[name] = value[0] if isinstance(value, list) and len(value) == 1 else value
    spec.out, spec.population_on = args["out"], args["population_on"]
    return spec


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv), log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {describe_error(err, flags=FLAGS)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: run the command again (it replaces only the files a merge writes in --out)", file=sys.stderr
        )
        return 130
    return 0
