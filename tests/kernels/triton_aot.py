"""Compiles every Triton kernel launch that the public operators make, for real GPU targets, on a machine
without a GPU (tests/test_triton_compile.py runs it; run it by hand to check another Triton version).

The interpreter (TRITON_INTERPRET=1, what the CPU tests use) executes kernels as NumPy and accepts code that
the compiler rejects (loop-carried type changes, pointer casts, unsupported ops), and a GPU is lent only to
some sessions. So this drives the public operators over their modes, dtypes and argument ranges with the
launches intercepted: each launch's arguments give the signature, the specialisation (16-byte alignment and
divisibility, as the launcher would see them) and the constexprs, and every distinct one is compiled to a
cubin with triton.compile for each target architecture. Needs Triton's CUDA backend (ptxas ships with it),
not a GPU, not a driver.

    python tests/triton_aot.py --arch 90 --arch 80 [--json out.json]

Must run without TRITON_INTERPRET (the script refuses it): interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_aot.py: unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the shared helpers

import torch
import triton
from _util import resource_usage
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

import evolver_kernels as ek
from evolver_kernels.kernels import backends

SEEDS = (5, 2**64 - 1)  # key words below 2**31 and above: Triton types the two differently (i32, i64)
STREAMS = (3, 2**40 + 7)
OFFSETS = (0, 2**33 + 1)


def _launch_recorder(kernel, launches: list[dict[str, Any]]):
    """Replaces kernel.run (what kernel[grid](...) calls) with one that records the call and launches nothing."""

    def run(*args, grid, warmup, **kwargs):
        del grid, warmup
        bound = dict(zip(kernel.arg_names, args))
        options = {k: kwargs.pop(k) for k in list(kwargs) if k not in kernel.arg_names}
        bound.update(kwargs)
        signature, constexprs, attrs = {}, {}, {}
        for index, param in enumerate(kernel.params):
            value = bound[param.name]
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[param.name] = value
                continue
            kind, key = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize, True)
            signature[param.name] = kind
            if kind == "constexpr":  # Triton folds specialised arguments equal to 1 into the kernel
                constexprs[param.name] = value
                continue
            if key and "D" in key:
                attrs[(index,)] = BaseBackend.parse_attr(key)
        launches.append(
            {"kernel": kernel, "signature": signature, "constexprs": constexprs, "attrs": attrs, "options": options}
        )

    kernel.run = run


def record_launches() -> list[dict[str, Any]]:
    """The launches of every Triton kernel that the operators make over their modes and argument ranges."""
    tk = backends.triton_kernels()
    if tk is None:
        raise SystemExit(
            f"evolver_kernels.kernels.triton did not import: {backends._import('evolver_kernels.kernels.triton')[1]}"
        )
    launches: list[dict[str, Any]] = []
    from evolver_kernels.kernels.triton import de_kernels, merge_kernels

    for kernel in (
        de_kernels._de_kernel,
        de_kernels._mask_kernel,
        merge_kernels._merge_kernel,
        merge_kernels._nearswap_kernel,
        de_kernels._philox_test_kernel,
    ):
        _launch_recorder(kernel, launches)
    # The operators check their arguments as on a GPU, then hand CPU tensors to the (recording) launches.
    real_reason = backends.unavailable_reason
    backends.unavailable_reason = lambda b, d: None if b == "triton" else real_reason(b, d)
    try:
        n = 1000
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x, base, a, b = (torch.zeros(n, dtype=dtype) for _ in range(4))
            for seed, stream, offset in zip(SEEDS, STREAMS, OFFSETS):
                for CR in (0.3, 1.0):  # 1.0 selects every element: the take_all path
                    for strategy in ("evolver", "rand/1"):
                        second = (x, x) if strategy == "evolver" else (base, b)
                        ek.de_mutate_crossover(
                            x,
                            second[0],
                            a,
                            second[1],
                            F=0.5,
                            CR=CR,
                            seed=seed,
                            stream=stream,
                            offset=offset,
                            backend="triton",
                        )
                    ek.crossover_mask(n, CR=CR, seed=seed, stream=stream, offset=offset, backend="triton")
                models = [torch.zeros(n, dtype=dtype) for _ in range(3)]
                fisher = [torch.ones(n, dtype=torch.float32) for _ in range(3)]
                drops = torch.full((n,), 2**31, dtype=torch.int64)
                for kwargs in (
                    {},  # average
                    {"normalize": False},
                    {"fisher": fisher},
                    {"base": base, "normalize": False},  # task arithmetic
                    {"base": base, "trim": [0.1] * 3},  # TIES
                    {"base": base, "trim": [0.1] * 3, "normalize": False},
                    {"base": base, "drop_p": 0.9, "normalize": False},  # DARE-linear
                    {"base": base, "drop_p": 0.9, "trim": [0.0] * 3},  # DARE-TIES
                    {"base": base, "fisher": fisher, "drop_p": 0.5},
                    {"base": base, "trim": [0.1] * 3, "top": [0.5] * 3, "elect": False, "normalize": False},
                    {"base": base, "trim": [0.1] * 3, "top": [0.5] * 3, "normalize": False},  # breadcrumbs_ties
                    {"base": base, "select": 0.1, "elect": True, "elect_weights": [1.0] * 3, "min_den": 1e-6},  # sce
                    {
                        "base": base,
                        "drop_thresholds": [drops, None, drops],
                        "drop_rescales": [1.5, 1.0, 2.0],
                        "elect": True,
                    },  # della
                    {
                        "base": base,
                        "drop_thresholds": [drops, None, drops],
                        "drop_rescales": [1.5, 1.0, 2.0],
                        "elect": True,
                        "normalize": False,
                    },  # mergekit's dare_ties (della, epsilon 0)
                    {
                        "base": base,
                        "drop_thresholds": [drops, None, drops],
                        "drop_rescales": [1.5, 1.0, 2.0],
                        "normalize": False,
                    },  # della_linear, mergekit's dare_linear
                ):
                    ek.merge_tensors(models, seed=seed, stream=stream, offset=offset, backend="triton", **kwargs)
                ek.merge_tensors(models[:1], base=base, nearswap_t=0.5, backend="triton")
        for seed in SEEDS:
            tk.philox_block(torch.zeros(4, 4, dtype=torch.int64), seed & 0xFFFFFFFF, seed >> 32)
    finally:
        backends.unavailable_reason = real_reason
    return launches


def cubin_usage(cubin: bytes) -> dict[str, int]:
    """The resource report (_util.resource_usage) of a cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        [(_, usage)] = resource_usage(f.name)
    return usage


def _variant_key(launch: dict[str, Any]) -> str:
    return json.dumps(
        [
            launch["kernel"].__name__,
            launch["signature"],
            launch["constexprs"],
            sorted(map(str, launch["attrs"])),
            launch["options"],
        ],
        sort_keys=True,
        default=str,
    )


def compile_all(archs: list[int]) -> list[dict[str, Any]]:
    """Compiles each distinct launch for each architecture; returns one row per compile (raises on failure)."""
    variants = {_variant_key(launch): launch for launch in record_launches()}
    rows = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for launch in variants.values():
            kernel = launch["kernel"]
            start = time.perf_counter()
            try:
                compiled = triton.compile(
                    ASTSource(kernel, launch["signature"], launch["constexprs"], launch["attrs"]),
                    target=target,
                    options=launch["options"],
                )
            except Exception as err:
                raise SystemExit(
                    f"{kernel.__name__} failed to compile for sm_{arch} with constexprs "
                    f"{launch['constexprs']}, signature {launch['signature']}:\n{err}"
                ) from err
            rows.append(
                dict(
                    kernel=kernel.__name__,
                    arch=arch,
                    constexprs=launch["constexprs"],
                    signature={k: v for k, v in launch["signature"].items() if v != "constexpr"},
                    cubin_bytes=len(compiled.asm["cubin"]),
                    seconds=time.perf_counter() - start,
                    **cubin_usage(compiled.asm["cubin"]),
                )
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", type=int, action="append", help="compute capability times ten (repeatable); default 90"
    )
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    archs = args.arch or [90]
    rows = compile_all(archs)
    for row in rows:
        flags = ",".join(f"{k}={v}" for k, v in row["constexprs"].items() if k != "GROUPS")
        usage = f"{row.get('reg', '?'):>3} registers, {row.get('local', '?')} B local"
        print(f"sm_{row['arch']} {row['kernel']:<20} {flags:<70} {usage}  {row['seconds']:.2f} s")
    print(
        f"compiled {len(rows)} kernel variants for sm_{', sm_'.join(map(str, archs))} with triton {triton.__version__}"
    )
    if args.json:
        from evolver_kernels.kernels.triton import de_kernels, merge_kernels

        defined = sorted(
            name
            for module in (de_kernels, merge_kernels)
            for name, obj in vars(module).items()
            if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")
        )
        with open(args.json, "w") as f:
            json.dump(
                {"triton": triton.__version__, "torch": torch.__version__, "kernels_defined": defined, "rows": rows},
                f,
                indent=1,
                default=str,
            )


if __name__ == "__main__":
    main()
