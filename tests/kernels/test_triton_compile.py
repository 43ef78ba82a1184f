"""The Triton kernels compile for the GPUs we ship for (sm_90: H100/H200, sm_80: A100), checked here without a
GPU: the interpreter the other tests run accepts code that the compiler rejects. See tests/triton_aot.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("triton_aot.py")
ARCHS = (90, 80)


def test_every_triton_launch_compiles_for_gpu_targets(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from an earlier run's cache
    out = tmp_path / "compiled.json"
    args = [sys.executable, str(SCRIPT), "--json", str(out)] + [f"--arch={a}" for a in ARCHS]
    run = subprocess.run(args, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = report["rows"]

    # every kernel the module defines was launched by the public operators, and compiled for every target
    assert sorted({r["kernel"] for r in rows}) == report["kernels_defined"]
    assert set(report["kernels_defined"]) >= {"_de_kernel", "_mask_kernel", "_merge_kernel", "_nearswap_kernel"}
    for arch in ARCHS:
        compiled = {(r["kernel"], json.dumps(r["constexprs"], sort_keys=True)) for r in rows if r["arch"] == arch}
        de = {c for k, c in compiled if k == "_de_kernel"}
        merge = {c for k, c in compiled if k == "_merge_kernel"}
        assert len(de) == 6, de  # two strategies x three dtypes
        # the fifteen merge configurations of triton_aot.record_launches (average, Fisher, task arithmetic,
        # TIES, DARE-linear, DARE-TIES, breadcrumbs with and without TIES, sce, della with and without
        # normalize, della_linear, ...), each a different set of constexprs, x three dtypes
        assert len(merge) == 15 * 3, merge
        assert len({c for k, c in compiled if k == "_nearswap_kernel"}) == 3  # three dtypes
        # key words below and above 2**31 are typed i32 and i64: both signatures compiled
        assert {r["signature"]["k0"] for r in rows if r["arch"] == arch and r["kernel"] == "_de_kernel"} == {
            "i32",
            "i64",
        }

    # no register spills: a spilling streaming kernel would fall far short of the copy bandwidth (the usage comes
    # from the cuobjdump that ships with Triton's CUDA backend)
    assert all("local" in r and "reg" in r for r in rows), rows[0]
    spilling = [(r["kernel"], r["arch"], r["constexprs"], r["local"]) for r in rows if r["local"] != 0]
    assert not spilling, spilling
