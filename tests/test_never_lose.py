"""Nothing a user owns is overwritten or deleted, and every misuse ends in one line naming the culprit, before
any heavy work. Each test is a case that lost data, returned a wrong result with exit code 0, or ended in a
traceback before the output directory rules (evolver_kernels.io.rundir) and the input checks existed."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from evolver_kernels.evolve import main
from evolver_kernels.evolve.config import parse_config
from evolver_kernels.io import rundir
from evolver_kernels.merge import cli as merge_cli


@pytest.fixture()
def pop(bert_pop):
    return bert_pop.root, bert_pop.models[:3], bert_pop.dev[0]


def _args(models, dev, out, *extra):
    return ["--models", *models, "--dev", dev, "--out", str(out), "--generations", "1", *extra]


def _tree(path) -> dict[str, str]:
    """Every file under `path` (links not followed) with a hash of its bytes: what a user owns there."""
    found = {}
    for top, dirs, files in os.walk(path):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            p = os.path.join(top, name)
            if os.path.islink(p):
                found[os.path.relpath(p, path)] = "link:" + os.readlink(p)
                continue
            with open(p, "rb") as f:
                found[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
    return found


def _one_line_error(capsys, code: int, fragment: str) -> str:
    """The run ended with code 2 and exactly one `error:` line that holds `fragment`, no traceback."""
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], err[-2000:]
    assert "Traceback" not in err
    return lines[0]


# -- --out is never an input, never someone else's directory -------------------------------------------------
@pytest.mark.parametrize("which", [0, 1])
def test_evolve_out_is_one_of_the_models(pop, capsys, which):
    _, models, dev = pop
    before = _tree(models[which])
    _one_line_error(capsys, main(_args(models, dev, models[which])), f"--out {models[which]} is the --models input")
    assert _tree(models[which]) == before


def test_evolve_out_inside_a_model_or_containing_one(pop, tmp_path, capsys):
    root, models, dev = pop
    _one_line_error(capsys, main(_args(models, dev, os.path.join(models[0], "sub"))), "is inside the --models input")
    assert not os.path.exists(os.path.join(models[0], "sub"))
    _one_line_error(capsys, main(_args(models, dev, root)), "contains the --models input")


def test_merge_out_is_an_input(pop, capsys):
    _, models, _ = pop
    before = _tree(models[1])
    _one_line_error(capsys, merge_cli.main(["--models", *models[:2], "--out", models[1]]), "is the --models input")
    assert _tree(models[1]) == before


def test_merge_disk_tier_leaves_an_existing_population_folder_alone(pop, tmp_path, capsys):
    _, models, _ = pop
    out = tmp_path / "merged"
    (out / "population").mkdir(parents=True)
    (out / "population" / "mine.txt").write_text("precious")
    before = _tree(out)
    _one_line_error(
        capsys,
        merge_cli.main(["--models", *models[:2], "--out", str(out), "--population-on", "disk"]),
        "is not empty and was not written by evolver-kernels",
    )
    assert _tree(out) == before
    # into a directory of ours that a user added a folder to: the merge runs, the folder is untouched
    ours = tmp_path / "ours"
    assert merge_cli.main(["--models", *models[:2], "--out", str(ours), "--population-on", "disk"]) == 0
    (ours / "population").mkdir()
    (ours / "population" / "mine.txt").write_text("precious")
    assert merge_cli.main(["--models", *models[:2], "--out", str(ours), "--population-on", "disk"]) == 0
    assert (ours / "population" / "mine.txt").read_text() == "precious"
    assert not [n for n in os.listdir(ours) if n.startswith(rundir.SCRATCH_PREFIX)]


def test_checkpoint_folder_that_is_a_symlink_is_never_emptied(pop, tmp_path, capsys):
    _, models, dev = pop
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_bytes(b"x" * 100)
    (elsewhere / "ind0-v1.safetensors").write_bytes(b"not ours")
    out = tmp_path / "o"
    (out / "checkpoint").mkdir(parents=True)
    os.symlink(elsewhere, out / "checkpoint" / "individuals")
    before = _tree(elsewhere)
    _one_line_error(capsys, main(_args(models, dev, out)), "not empty and was not written by evolver-kernels")
    # even in a directory of ours, a symlinked checkpoint folder is refused, not followed
    (out / rundir.MARKER).write_text(json.dumps({"tool": "evolve", "files": []}))
    _one_line_error(capsys, main(_args(models, dev, out)), "is not a directory of ours (a symlink or a file)")
    assert _tree(elsewhere) == before


def test_non_empty_out_is_refused_and_untouched(pop, tmp_path, capsys):
    _, models, dev = pop
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "config.json").write_text("{}")
    before = _tree(out)
    _one_line_error(capsys, main(_args(models, dev, out)), f"--out {out} is not empty and was not written by")
    _one_line_error(capsys, merge_cli.main(["--models", *models[:2], "--out", str(out)]), "is not empty")
    assert _tree(out) == before
    # an empty directory is fine, and becomes ours
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_args(models, dev, empty)) == 0
    assert rundir.owner(str(empty)) == "evolve"


def test_a_finished_merge_output_is_rewritten_without_stale_files(pop, tmp_path):
    _, models, _ = pop
    out = tmp_path / "m"
    assert merge_cli.main(["--models", *models[:2], "--out", str(out)]) == 0
    recorded = json.loads((out / rundir.MARKER).read_text())["files"]
    assert "model.safetensors" in recorded and "merge.json" in recorded
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")  # a file of a user's: not recorded, kept
    assert merge_cli.main(["--models", *models[:3], "--out", str(out), "--dtype", "float16"]) == 0
    assert (out / "model-00001-of-00002.safetensors").read_bytes() == b"stale"
    assert all(t.dtype == torch.float16 for t in load_file(str(out / "model.safetensors")).values())


def _fine_tune(path) -> None:
    """What a user saves over a merge's output: the same tensors changed (the same size: only the time tells)."""
    weights = load_file(str(path))
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, str(path))


def test_a_merge_rerun_never_replaces_a_file_changed_since_it_wrote_it(pop, tmp_path, capsys):
    """The marker records each output's size and modification time: a rerun into the merge's directory after a
    user saved a fine-tune over its model.safetensors is refused before any work, naming the file, and nothing
    there changes; moved away, the rerun writes its own again. A marker from before (names only) reads as ours."""
    _, models, _ = pop
    out = tmp_path / "m"
    argv = ["--models", *models[:2], "--out", str(out)]
    assert merge_cli.main(argv) == 0
    capsys.readouterr()
    written = json.loads((out / rundir.MARKER).read_text())["written"]
    assert {"model.safetensors", "merge.json", "config.json"} <= set(written)
    assert written["model.safetensors"]["size"] == (out / "model.safetensors").stat().st_size
    _fine_tune(out / "model.safetensors")
    before = _tree(out)
    line = _one_line_error(capsys, merge_cli.main(argv), f"--out {out}: model.safetensors changed since the merge")
    assert "move it away or choose another --out" in line
    assert _tree(out) == before
    os.rename(out / "model.safetensors", tmp_path / "fine-tuned.safetensors")
    assert merge_cli.main(argv) == 0
    assert (out / "model.safetensors").read_bytes() != (tmp_path / "fine-tuned.safetensors").read_bytes()
    # an older marker: the names only, each ours (replaced by the rerun), and recorded with its size and time now
    marker = json.loads((out / rundir.MARKER).read_text())
    (out / rundir.MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "written"}))
    _fine_tune(out / "model.safetensors")
    assert merge_cli.main(argv) == 0
    assert "model.safetensors" in json.loads((out / rundir.MARKER).read_text())["written"]
    assert (out / "model.safetensors").read_bytes() != (tmp_path / "fine-tuned.safetensors").read_bytes()


def test_a_recorded_file_changed_while_the_merge_runs_is_kept(pop, tmp_path, capsys, monkeypatch):
    """A file changed after the claim (the merge computing): removing the earlier outputs is refused, nothing
    removed."""
    import evolver_kernels.merge.run as merge_run

    _, models, _ = pop
    out = tmp_path / "m"
    argv = ["--models", *models[:2], "--out", str(out)]
    assert merge_cli.main(argv) == 0
    real = merge_run.OutputDir.clear_recorded
    saved = {}

    def user_saves_first(self):
        _fine_tune(out / "model.safetensors")
        saved.update(_tree(out))
        return real(self)

    monkeypatch.setattr(merge_run.OutputDir, "clear_recorded", user_saves_first)
    capsys.readouterr()
    _one_line_error(capsys, merge_cli.main(argv), "model.safetensors changed since the merge wrote it")
    assert _tree(out) == {k: v for k, v in saved.items() if not k.startswith(rundir.SCRATCH_PREFIX)}


def test_an_evolve_rerun_never_replaces_a_file_changed_since_it_wrote_it(pop, tmp_path, capsys):
    _, models, dev = pop
    out = tmp_path / "o"
    assert main(_args(models, dev, out, "--generations", "0")) == 0
    assert "model.safetensors" in json.loads((out / rundir.MARKER).read_text())["written"]
    _fine_tune(out / "model.safetensors")
    before = _tree(out)
    for extra in ([], ["--resume"]):
        _one_line_error(
            capsys,
            main(_args(models, dev, out, "--generations", "0", *extra)),
            f"--out {out}: model.safetensors changed since the evolve run wrote it",
        )
    assert _tree(out) == before


def test_allow_pickle_keeps_two_models_with_the_same_folder_name_apart(pop, tmp_path):
    _, models, dev = pop
    dirs = []
    for k, parent in enumerate(("a", "b")):
        d = tmp_path / parent / "model"
        shutil.copytree(models[k], d)
        torch.save(load_file(str(d / "model.safetensors")), str(d / "pytorch_model.bin"))
        os.remove(d / "model.safetensors")
        dirs.append(str(d))
    out = tmp_path / "o"
    assert (
        main(_args([*dirs, models[2]], dev, out, "--allow-pickle", "--generations", "0", "--fitness", "individual"))
        == 0
    )
    from evolver_kernels.io.model_io import conversion_key

    assert len(os.listdir(out / "converted")) == 2
    for d in dirs:
        want = torch.load(os.path.join(d, "pytorch_model.bin"), weights_only=True)
        got = load_file(str(out / "converted" / conversion_key(d) / "model.safetensors"))
        assert all(torch.equal(got[k], want[k]) for k in got)
    a, b = (load_file(str(out / "converted" / conversion_key(d) / "model.safetensors")) for d in dirs)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # two different models, kept apart


def test_malicious_pickle_is_one_line_and_runs_nothing(pop, tmp_path, capsys):
    _, models, dev = pop
    evil = tmp_path / "evil"
    shutil.copytree(models[1], evil)
    os.remove(evil / "model.safetensors")
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Boom()}, str(evil / "pytorch_model.bin"))
    _one_line_error(
        capsys,
        main(_args([models[0], str(evil)], dev, tmp_path / "o", "--allow-pickle")),
        f"--models {evil}: pytorch_model.bin is not a plain tensor checkpoint",
    )
    assert not marker.exists()


# -- NaN fitness is ranked last ----------------------------------------------------------------------------
USER_FN = """
import math, torch
calls = [0]
def nan_first(model, tokenizer, dev_paths, device):
    calls[0] += 1
    if calls[0] == 1:
        return float("nan")
    return float(-model.classifier.weight.float().abs().sum())
def nan_if_nan_weights(model, tokenizer, dev_paths, device):
    if any(torch.isnan(p).any() for p in model.parameters()):
        return float("nan")
    return float(-model.classifier.weight.float().abs().sum())
def returns_none(model, tokenizer, dev_paths, device):
    return None
"""


@pytest.fixture()
def user_fn(tmp_path, monkeypatch):
    (tmp_path / "nanfit.py").write_text(USER_FN)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("nanfit", None)
    yield "nanfit"
    sys.modules.pop("nanfit", None)


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path}: non-JSON constant {constant}")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_nan_merged_fitness_does_not_block_every_improvement(pop, tmp_path, user_fn, capsys):
    _, models, dev = pop
    out = tmp_path / "o"
    assert main(_args(models, dev, out, "--task", f"{user_fn}:nan_first", "--generations", "2")) == 0
    doc = _strict_json(out / "evolution.json")
    assert doc["generations"][0]["population_fitness"] is None  # the NaN, ranked last
    assert doc["generations"][1]["accepted"], "a finite offspring must beat a NaN merged fitness"
    assert doc["non_finite_evaluations"] == 1
    assert "ranked last" in capsys.readouterr().err


def test_nan_individual_is_never_the_best(pop, tmp_path, user_fn):
    _, models, dev = pop
    bad = tmp_path / "nanmodel"
    shutil.copytree(models[1], bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["classifier.bias"][0] = float("nan")
    # the largest fitness of the three if NaN were ignored: a classifier of zeros
    weights["classifier.weight"].zero_()
    save_file(weights, str(bad / "model.safetensors"))
    out = tmp_path / "o"
    assert (
        main(
            _args(
                [models[0], str(bad), models[2]],
                dev,
                out,
                "--task",
                f"{user_fn}:nan_if_nan_weights",
                "--fitness",
                "individual",
                "--generations",
                "1",
            )
        )
        == 0
    )
    doc = _strict_json(out / "evolution.json")
    assert doc["generations"][0]["population_fitness"][1] is None
    assert "#1" not in doc["output"] and doc["final_fitness"] is not None
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "model.safetensors")).values())


def test_user_function_returning_none(pop, tmp_path, user_fn, capsys):
    _, models, dev = pop
    _one_line_error(
        capsys,
        main(_args(models, dev, tmp_path / "o", "--task", f"{user_fn}:returns_none")),
        f"--task {user_fn}:returns_none: the function returned None; it must return a number",
    )


# -- YAML goes through the flags' parser -------------------------------------------------------------------
@pytest.mark.parametrize(
    "line,message",
    [
        ('dry_run: "false"', "dry_run must be true or false, got 'false'"),
        ('allow_pickle: "false"', "allow_pickle must be true or false, got 'false'"),
        ('resume: "no"', "resume must be true or false, got 'no'"),
        ("fitness: bogus", "fitness must be one of individual, merged, got 'bogus'"),
        ("strategy: bogus", "strategy must be one of evolver, rand/1, best/1, got 'bogus'"),
        ("generations: true", "generations must be a number, got True"),
        ("generations: 2.5", "generations must be an integer, got 2.5"),
        ("seed: [1, 2]", "seed takes one value, got a list"),
        ("models: {a: 1}", "models must be a string, got {'a': 1}"),
        ("F: !!python/object/apply:os.system ['true']", "not valid YAML"),
        ("F: [unclosed", "not valid YAML"),
    ],
)
def test_yaml_values_are_checked_like_flags(tmp_path, capsys, line, message):
    (tmp_path / "c.yaml").write_text(line + "\n")
    _one_line_error(capsys, main(["--config", str(tmp_path / "c.yaml")]), message)


DUPLICATE_KEY = "models:\n  - model: a\n  - model: b\nout: o\nmodels: [c]\n"


def test_evolve_yaml_with_a_key_given_twice_is_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(DUPLICATE_KEY)
    line = _one_line_error(capsys, main(["--config", str(tmp_path / "c.yaml")]), f"--config {tmp_path / 'c.yaml'}")
    assert "'models' is given twice (lines 1 and 5)" in line
    assert not (tmp_path / "o").exists()


def test_merge_yaml_with_a_key_given_twice_is_refused(pop, tmp_path, capsys):
    _, models, _ = pop
    text = f"merge_method: linear\nmodels:\n  - model: {models[0]}\n  - model: {models[1]}\nmerge_method: ties\n"
    (tmp_path / "m.yaml").write_text(text)
    line = _one_line_error(
        capsys,
        merge_cli.main(["--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "o")]),
        f"--config {tmp_path / 'm.yaml'}",
    )
    assert "'merge_method' is given twice (lines 1 and 5)" in line
    assert not (tmp_path / "o").exists()


def test_yaml_numbers_parse_as_the_flags_do(tmp_path):
    (tmp_path / "c.yaml").write_text("F: 1e-1\nCR: 5e-1\ngenerations: 3\nmodels: a\n")
    cfg = parse_config(["--config", str(tmp_path / "c.yaml")])
    assert (cfg.F, cfg.CR, cfg.generations, cfg.models) == (0.1, 0.5, 3, ["a"])


def test_yaml_booleans_work(pop, tmp_path, capsys):
    _, models, dev = pop
    (tmp_path / "c.yaml").write_text(
        json.dumps({"models": models, "dev": [dev], "out": str(tmp_path / "o"), "dry_run": True})
    )
    assert main(["--config", str(tmp_path / "c.yaml")]) == 0
    assert "dry run" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


# -- one run at a time per --out ------------------------------------------------------------------------------
def test_second_run_into_a_locked_out_stops_at_once(pop, tmp_path, capsys):
    _, models, dev = pop
    out = tmp_path / "o"
    holder = rundir.OutputDir.claim(str(out), "evolve", [])
    try:
        _one_line_error(
            capsys, main(_args(models, dev, out)), f"--out {out} is in use by another run (pid {os.getpid()}"
        )
        assert sorted(os.listdir(out)) == sorted([rundir.MARKER, rundir.LOCK])
    finally:
        holder.release()
    assert main(_args(models, dev, out)) == 0


@pytest.mark.slow
def test_two_concurrent_runs_one_wins_one_refused(pop, tmp_path):
    _, models, dev = pop
    out = tmp_path / "o"
    argv = [sys.executable, "-m", "evolver_kernels.evolve", *_args(models, dev, out, "--generations", "2")]
    env = {**os.environ, "EVOLVER_PROGRESS": "0"}
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 2], [0, 0]), results  # [0, 0]: the second started after the first had finished
    if codes == [0, 2]:
        refused = next(err for code, err in results if code == 2)
        assert "in use by another run" in refused or "holds a finished run" in refused, refused
    assert _strict_json(out / "evolution.json")["final_fitness"] is not None
    load_file(str(out / "model.safetensors"))


# -- options and files checked before any heavy work ---------------------------------------------------------
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--max-dev-examples", "-5"], "--max-dev-examples must be a positive integer, got -5"),
        (["--max-dev-examples", "0"], "--max-dev-examples must be a positive integer, got 0"),
        (["--device", "tpu"], "--device tpu: must be cpu, cuda or cuda:N"),
        (["--device", "nonsense:x"], "--device nonsense:x: must be cpu, cuda or cuda:N"),
    ],
)
def test_bad_values_are_one_line(pop, tmp_path, capsys, extra, message):
    _, models, dev = pop
    _one_line_error(capsys, main(_args(models, dev, tmp_path / "o", *extra)), message)
    assert not (tmp_path / "o").exists()


def _no_population(monkeypatch):
    import evolver_kernels.evolve.startup as ev

    def refuse(*a, **k):
        raise AssertionError("the population was loaded before the error")

    monkeypatch.setattr(ev, "make_population", refuse)


def test_unwritable_out_and_population_dir_found_before_any_work(pop, tmp_path, capsys, monkeypatch):
    _, models, dev = pop
    _no_population(monkeypatch)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _one_line_error(capsys, main(_args(models, dev, a_file / "o")), f"--out {a_file / 'o'}: cannot create it")
    _one_line_error(capsys, main(_args(models, dev, a_file)), f"--out {a_file} exists and is not a directory")
    _one_line_error(
        capsys,
        main(_args(models, dev, tmp_path / "o", "--population-on", "disk", "--population-dir", str(a_file / "p"))),
        "--population-dir",
    )
    _one_line_error(
        capsys,
        main(_args(models, dev, tmp_path / "o2", "--population-on", "disk", "--population-dir", models[0])),
        "--population-dir",
    )
    if os.path.isdir("/sys") and not os.access("/sys", os.W_OK) or _cannot_mkdir("/sys/evolver-test"):
        _one_line_error(capsys, main(_args(models, dev, "/sys/evolver-test")), "--out /sys/evolver-test")


def _cannot_mkdir(path: str) -> bool:
    try:
        os.makedirs(path)
    except OSError:
        return True
    os.rmdir(path)
    return False


def test_disk_tier_scratch_is_fresh_and_removed(pop, tmp_path):
    _, models, dev = pop
    scratch_root = tmp_path / "scratch"
    scratch_root.mkdir()
    (scratch_root / "ind0.safetensors").write_bytes(b"a user's file with our name")
    stale = scratch_root / (rundir.SCRATCH_PREFIX + "old")
    stale.mkdir()
    (stale / rundir.SCRATCH_MARKER).write_text("")  # a killed run's leftover: ours, unlocked
    foreign = scratch_root / (rundir.SCRATCH_PREFIX + "notours")
    foreign.mkdir()  # our prefix but no marker: not ours, kept
    assert (
        main(_args(models, dev, tmp_path / "o", "--population-on", "disk", "--population-dir", str(scratch_root))) == 0
    )
    assert sorted(os.listdir(scratch_root)) == sorted(["ind0.safetensors", foreign.name])
    assert (scratch_root / "ind0.safetensors").read_bytes() == b"a user's file with our name"


def test_full_disk_is_one_line(pop, tmp_path, capsys, monkeypatch):
    import errno

    import evolver_kernels.io.shards as shards

    _, models, dev = pop

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "o" / "model.safetensors.tmp"))

    monkeypatch.setattr(shards, "write_safetensors", full)
    line = _one_line_error(capsys, main(_args(models, dev, tmp_path / "o")), "No space left on device")
    assert "--resume" in line
    assert not (tmp_path / "o" / "model.safetensors.tmp").exists()


def test_plan_counts_the_checkpoint_and_output_on_disk(pop, tmp_path, capsys, monkeypatch):
    _, models, dev = pop
    _no_population(monkeypatch)
    real = shutil.disk_usage

    def small(path):
        return real(path)._replace(free=1000)

    monkeypatch.setattr(rundir.shutil, "disk_usage", small)
    line = _one_line_error(
        capsys, main(_args(models, dev, tmp_path / "o", "--population-on", "cpu")), "checkpoint and output under"
    )
    assert "1000 B free" in line


def test_merge_checks_the_space_of_its_scratch_files_first(pop, tmp_path, capsys, monkeypatch):
    """The merged tensors live in a scratch file under --out until they are written out: a filesystem without
    room for them is refused before any work, --out left as it was (nothing but what the claim removes)."""
    _, models, _ = pop
    real = shutil.disk_usage
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    line = _one_line_error(
        capsys, merge_cli.main(["--models", *models[:2], "--out", str(tmp_path / "o")]), "the merged tensors under"
    )
    assert "1000 B free" in line and "scratch files" in line
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_truncated_safetensors_names_the_file(pop, tmp_path, capsys):
    _, models, dev = pop
    bad = tmp_path / "trunc"
    shutil.copytree(models[1], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _one_line_error(
        capsys,
        main(_args([models[0], str(bad)], dev, tmp_path / "o")),
        f"{bad / 'model.safetensors'}: not a readable safetensors file",
    )
    _one_line_error(
        capsys,
        merge_cli.main(["--models", models[0], str(bad), "--out", str(tmp_path / "m")]),
        f"{bad / 'model.safetensors'}: not a readable safetensors file",
    )


def test_truncated_checkpoint_is_one_line(pop, tmp_path, capsys):
    import evolver_kernels.evolve.run as ev

    _, models, dev = pop
    out = tmp_path / "o"
    calls = []
    original = ev.Run.evaluate

    def crash(self, *args):
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return original(self, *args)

    ev.Run.evaluate = crash
    try:
        assert (
            main(_args(models, dev, out, "--generations", "3", "--fitness", "individual", "--population-on", "cpu"))
            == 130
        )
    finally:
        ev.Run.evaluate = original
    state = out / "checkpoint" / "state.json"
    state.write_text(state.read_text()[:40])
    _one_line_error(
        capsys,
        main(
            _args(
                models, dev, out, "--generations", "3", "--fitness", "individual", "--population-on", "cpu", "--resume"
            )
        ),
        f"{state}: not a readable checkpoint",
    )


def test_non_utf8_dev_file_is_named(pop, tmp_path, capsys):
    _, models, _ = pop
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"text": "caf\xe9", "label": 1}\n'.encode("latin-1"))
    _one_line_error(capsys, main(_args(models, str(bad), tmp_path / "o")), f"--dev {bad}: not UTF-8 text")


def test_csv_with_a_byte_order_mark(pop, tmp_path):
    _, models, _ = pop
    csv = tmp_path / "bom.csv"
    csv.write_bytes("\ufefftext,label\ngood day,2\nbad day,0\n".encode("utf-8"))
    assert main(_args(models, str(csv), tmp_path / "o")) == 0


# -- merge YAML: every key honoured or refused -------------------------------------------------------------
@pytest.mark.parametrize(
    "config,message",
    [
        ({"merge_method": "ties", "models": "{m1}"}, "models must be a list of entries"),
        (
            {"merge_method": "ties", "models": [{"parameters": {"weight": 1}}, {"model": "{m2}"}]},
            "models entry 1: needs `model: PATH`",
        ),
        ({"merge_method": "ties", "models": ["{m1}", "{m2}"], "parameters": [1]}, "parameters: must be a mapping"),
        (
            {"merge_method": "ties", "models": ["{m1}", "{m2}"], "parameters": {"densty": 0.5}},
            "unknown parameter 'densty'",
        ),
        (
            {"merge_method": "linear", "models": ["{m1}", "{m2}"], "parameters": {"density": 0.5}},
            "density does not apply to average",
        ),
        (
            {
                "merge_method": "ties",
                "models": ["{m1}", "{m2}"],
                "parameters": {"density": [{"pattern": "mlp", "value": 0.3}]},
            },
            "a conditional is {filter: SUBSTRING, value: V}",
        ),
        ({"merge_method": "ties", "models": ["{m1}", "{m2}"], "dtype": "float64"}, "dtype must be one of float32"),
        (
            {"merge_method": "ties", "models": [{"model": "{m1}", "weight": 2}, "{m2}"]},
            "models entry 1: unknown key(s) weight",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "{m1}", "parameters": {"scale": 2}}, "{m2}"]},
            "scale is a global parameter",
        ),
        ({"merge_method": "slerpy", "models": ["{m1}", "{m2}"]}, "unknown merge method 'slerpy'"),
        (
            {
                "merge_method": "dare_ties",
                "models": [{"model": "{m1}", "parameters": {"density": 0.5}}, "{m2}"],
                "parameters": {"epsilon": 0.1},
            },
            "epsilon does not apply to mergekit's dare_ties (della's parameter)",
        ),
    ],
)
def test_merge_yaml_is_never_silently_dropped(pop, tmp_path, capsys, config, message):
    import yaml

    _, models, _ = pop
    text = json.dumps(config).replace("{m1}", models[1]).replace("{m2}", models[2])
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(json.loads(text)))
    _one_line_error(
        capsys, merge_cli.main(["--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "o")]), message
    )


def test_merge_yaml_dtype_and_linear_are_honoured(pop, tmp_path):
    import yaml

    _, models, _ = pop
    cfg = {"merge_method": "linear", "dtype": "bfloat16", "models": [{"model": m} for m in models[1:]]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    assert merge_cli.main(["--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "o")]) == 0
    out = load_file(str(tmp_path / "o" / "model.safetensors"))
    ws = [load_file(f"{m}/model.safetensors") for m in models[1:]]
    for key, t in out.items():
        assert t.dtype == torch.bfloat16
        # mergekit's dtype: the inputs cast to it before merging (ours then averages in fp32, one rounding)
        assert torch.equal(t, (sum(w[key].bfloat16().float() for w in ws) / len(ws)).to(torch.bfloat16))
    assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == "bfloat16"
