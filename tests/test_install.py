"""Installing as users type it: whatever way the package was installed, the kernels match the torch that imports
them (built at install time, or compiled just in time), a slower fallback says why once, and
`python -m evolver_kernels.env` reports every backend with its reason."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A _C that fails to import as one built against another torch does (an undefined symbol), without touching files.
BROKEN_C = textwrap.dedent("""
    import importlib.abc, os, sys
    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "evolver_kernels._C":
                raise ImportError("_C.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")
    sys.meta_path.insert(0, Broken())
""")


def _python(code: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_a_failed_extension_import_warns_once_and_env_says_why():
    code = BROKEN_C + textwrap.dedent("""
        import json, warnings
        import torch
        import evolver_kernels as ek
        from evolver_kernels.env import report
        x = torch.randn(1000)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                ek.de_mutate_crossover(x, x, x.flip(0), x, F=0.5, CR=0.5, seed=1)
        print(json.dumps({"warnings": [str(w.message) for w in caught if w.category.__name__ == "SlowBackendWarning"],
                          "cpu": report()["devices"]["cpu"], "_C": report()["extensions"]["_C"]}))
    """)
    out = _python(code, env={"EVOLVER_KERNELS_JIT": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(doc["warnings"]) == 1, doc["warnings"]  # once per process, not once per call
    message = doc["warnings"][0]
    for part in (
        "cpu backend is unavailable",
        "undefined symbol",
        "reference backend instead",
        "about 500x slower",
        "pip install --no-build-isolation",
        "python -m evolver_kernels.env",
    ):
        assert part in message, (part, message)
    assert doc["cpu"]["runs"] == "reference" and doc["cpu"]["fastest"] == "cpu"
    assert (
        "undefined symbol" in doc["cpu"]["backends"]["cpu"] and "EVOLVER_KERNELS_JIT=0" in doc["cpu"]["backends"]["cpu"]
    )
    assert doc["_C"]["available"] is False


def test_a_build_record_of_another_torch_is_not_trusted(tmp_path, monkeypatch):
    """The stale-build check reads the record the binary carries (csrc/module.h), without loading it."""
    import torch

    from evolver_kernels.kernels import jit

    binary = tmp_path / "_C.so"
    monkeypatch.setattr(jit, "module_file", lambda name: binary if binary.exists() else None)
    assert jit.stale_reason("_C") == "it was not built when the package was installed"
    binary.write_bytes(b"\x7fELF no record here")
    assert "carries no build record" in jit.stale_reason("_C")

    def carrying(record: dict) -> None:
        binary.write_bytes(b"\x7fELF\0" + jit.MARKER + json.dumps(record).encode() + b"\0more")

    carrying({**jit.record_of("_C"), "torch": "2.0.0"})
    assert jit.stale_reason("_C") == f"it was built against torch 2.0.0, this is torch {torch.__version__}"
    carrying({**jit.record_of("_C"), "sources": "0000"})
    assert "built from other sources" in jit.stale_reason("_C")
    carrying(jit.record_of("_C"))
    assert jit.stale_reason("_C") is None and jit.embedded_record(binary) == jit.record_of("_C")
    monkeypatch.setenv("EVOLVER_KERNELS_CACHE", str(tmp_path / "cache"))
    plain = jit.cache_dir("_C")
    assert str(plain).startswith(str(tmp_path / "cache"))
    monkeypatch.setenv("EVOLVER_KERNELS_PORTABLE", "1")  # other flags: another cache entry
    assert jit.cache_dir("_C") != plain


def test_the_installed_module_says_what_it_was_built_with():
    from evolver_kernels.kernels import backends, jit

    module = backends.cpu_extension()
    record = jit.module_record(module)
    assert record == {
        **jit.embedded_record(jit.module_file("_C")),
        "openmp": module.openmp,
        "compiler": module.compiler,
    }
    assert record["torch"] == __import__("torch").__version__ and record["sources"] == jit.sources_hash()
    assert record["openmp"] > 0 and "-fopenmp" in record["flags"]["cxx"]


@pytest.mark.parametrize(
    "value,on", [("0", False), ("false", False), ("OFF", False), ("no", False), ("1", True), ("true", True), ("", True)]
)
def test_the_jit_switch_reads_every_spelling(monkeypatch, value, on):
    from evolver_kernels.kernels import jit

    monkeypatch.setenv("EVOLVER_KERNELS_JIT", value)
    assert jit.flag("EVOLVER_KERNELS_JIT", default=True) is on
    assert (jit.jit_problem("_C") or "").startswith("just-in-time builds are off") is not on


def test_a_switch_with_another_value_is_refused_naming_it(monkeypatch):
    from evolver_kernels.kernels import jit

    monkeypatch.setenv("EVOLVER_KERNELS_JIT", "sometimes")
    with pytest.raises(ValueError, match="EVOLVER_KERNELS_JIT='sometimes': give 1/true/yes/on or 0/false/no/off"):
        jit.jit_problem("_C")


def test_env_command_reports_every_backend(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "evolver_kernels.env", "--json", "--no-build"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    assert doc["torch"]["version"] and doc["devices"]["cpu"]["runs"] == "cpu"
    assert set(doc["devices"]["cpu"]["backends"]) == {"reference", "cpu", "triton", "cuda"}
    assert doc["devices"]["cpu"]["backends"]["cuda"].startswith("the cuda backend runs on CUDA tensors")
    assert doc["extensions"]["_C"]["status"] == "built at install time"
    text = subprocess.run(
        [sys.executable, "-m", "evolver_kernels.env", "--no-build"], capture_output=True, text=True, timeout=300
    ).stdout
    assert "cpu: runs the cpu backend" in text and "just-in-time cache:" in text


def test_plans_and_records_name_each_devices_backend(bert_pop, tmp_path, capsys):
    from evolver_kernels.evolve import main as evolve_main
    from evolver_kernels.merge import main as merge_main

    args = ["--models", *bert_pop.models[:2], "--dev", bert_pop.dev[0], "--generations", "0"]
    assert evolve_main([*args, "--out", str(tmp_path / "e")]) == 0
    assert "backends: cpu runs cpu" in capsys.readouterr().err
    assert json.loads((tmp_path / "e" / "evolution.json").read_text())["backends"] == {"cpu": "cpu"}
    assert merge_main(["--models", *bert_pop.models[:2], "--out", str(tmp_path / "m")]) == 0
    assert "backends: cpu runs cpu" in capsys.readouterr().err
    assert json.loads((tmp_path / "m" / "merge.json").read_text())["backends"] == {"cpu": "cpu"}


@pytest.mark.slow
def test_pip_install_with_build_isolation_compiles_just_in_time(tmp_path):
    """`pip wheel .` as typed (build isolation: no torch in the build environment) gives a wheel with the kernel
    sources and no compiled kernels; installed elsewhere, the first use compiles them against the running torch
    into the cache, once, and they give the reference's bits."""
    dist = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items() if k != "PIP_NO_BUILD_ISOLATION"}
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), ROOT],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = [p for p in os.listdir(dist) if p.endswith(".whl")]
    assert wheel.endswith("py3-none-any.whl"), wheel  # nothing compiled: torch is not in the isolated build
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(dist / wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert (site / "evolver_kernels" / "csrc" / "ops.cpp").is_file()
    assert not list((site / "evolver_kernels").glob("_C*.so")) and not list((site / "evolver_kernels").glob("_cuda*"))
    code = textwrap.dedent("""
        import json, torch, evolver_kernels as ek
        from evolver_kernels.kernels import backends
        from evolver_kernels.kernels.reference import de_mutate_crossover_reference
        gen = torch.Generator().manual_seed(0)
        x, a, b = (torch.randn(100_003, generator=gen) for _ in range(3))
        got = ek.de_mutate_crossover(x, x, a, b, F=0.7, CR=0.3, seed=5, offset=17, backend="cpu")
        want = de_mutate_crossover_reference(x, x, a, b, F=0.7, CR=0.3, seed=5, offset=17)
        from evolver_kernels.kernels import jit
        print(json.dumps({"file": ek.__file__, "status": backends.extension_status("_C")[1],
                          "record": jit.module_record(backends.cpu_extension()), "want": jit.record_of("_C"),
                          "same": bool(torch.equal(got.view(torch.int32), want.view(torch.int32)))}))
    """)
    run_env = {"PYTHONPATH": str(site), "EVOLVER_KERNELS_CACHE": str(tmp_path / "cache"), "MAX_JOBS": "2"}
    first = _python(code, env=run_env, cwd=str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    doc = json.loads(first.stdout.strip().splitlines()[-1])
    assert doc["file"].startswith(str(site)), doc
    assert doc["status"].startswith("compiled just in time") and doc["same"], doc
    assert {k: doc["record"][k] for k in doc["want"]} == doc["want"], doc  # the compiled module's own record
    assert "compiling the _C kernels" in first.stderr
    again = _python(code, env=run_env, cwd=str(tmp_path))  # cached: no second compilation
    assert again.returncode == 0 and "compiling" not in again.stderr, again.stderr[-2000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["same"]
