"""The population held once per node under torchrun (evolver_kernels/storage/node_share.py), with gloo ranks on this
machine: 4 and 2 ranks on shared memory and 2 on the disk tier give the bytes of one process;
two nodes simulated on localhost (two torchrun invocations) too; a rank killed with SIGKILL, then --resume with
another rank count, too. No shared-memory or scratch directory survives any of it."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from _util import KILL_RUN
from _util import finish as _finish
from _util import free_port as _port
from _util import torchrun as _torchrun
from safetensors.torch import load_file

from evolver_kernels.evolve import main
from evolver_kernels.evolve.memory_plan import PlanInputs, memory_plan

ARGS = ["--generations", "3", "--seed", "5", "--schedule", "synchronous"]


def _same(a, b) -> None:
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k].view(torch.uint8), wb[k].view(torch.uint8)) for k in wa)
    ja, jb = (json.loads((Path(d) / "evolution.json").read_text()) for d in (a, b))
    assert ja["generations"] == jb["generations"] and ja["evaluations"] == jb["evaluations"]


def _leftovers(*roots) -> list[str]:
    return [
        os.path.join(r, n) for r in roots if os.path.isdir(r) for n in os.listdir(r) if n.startswith("evolver-scratch-")
    ]


@pytest.fixture(scope="module")
def reference(bert_pop, tmp_path_factory):
    """One process, each fitness mode: the bytes every rank count must give."""
    models, dev = bert_pop
    root = tmp_path_factory.mktemp("one")
    outs = {}
    for fitness in ("individual", "merged"):
        outs[fitness] = str(root / fitness)
        assert main(["--models", *models, "--dev", *dev, *ARGS, "--fitness", fitness, "--out", outs[fitness]]) == 0
    return outs


@pytest.mark.slow
@pytest.mark.parametrize(
    "nproc,tier,fitness", [(4, "cpu", "merged"), (2, "disk", "individual"), (2, "gpu", "merged")]
)  # gpu without a GPU: host memory
def test_ranks_of_one_node_share_one_population(bert_pop, reference, tmp_path, nproc, tier, fitness):
    models, dev = bert_pop
    shm = tmp_path / "shm"
    out = tmp_path / "out"
    err = _finish(
        _torchrun(
            [
                "--models",
                *models,
                "--dev",
                *dev,
                *ARGS,
                "--fitness",
                fitness,
                "--population-on",
                tier,
                "--out",
                str(out),
            ],
            shm,
            nproc,
        )
    )
    where = "once for the node's ranks" if tier == "disk" else "in shared memory, once for the node's ranks"
    no_gpu = tier == "gpu" and not torch.cuda.is_available()
    label = "gpu (the compute device: the CPU, so host memory)" if no_gpu else tier
    assert f"population: 4 copies on {label} {where}" in err and f"per rank ({nproc} ranks on this node)" in err
    _same(reference[fitness], out)
    assert not _leftovers(shm, out)


@pytest.mark.slow
def test_two_nodes_on_localhost_give_the_same_bytes(bert_pop, reference, tmp_path):
    models, dev = bert_pop
    shm, port = tmp_path / "shm", _port()
    argv = [
        "--models",
        *models,
        "--dev",
        *dev,
        *ARGS,
        "--fitness",
        "individual",
        "--population-on",
        "cpu",
        "--out",
        str(tmp_path / "out"),
    ]
    nodes = [_torchrun(argv, shm, 1, nnodes=2, node_rank=r, port=port) for r in (0, 1)]
    for proc in nodes:
        _finish(proc)
    _same(reference["individual"], tmp_path / "out")
    assert not _leftovers(shm)


@pytest.mark.slow
@pytest.mark.parametrize("resume_ranks", [1, 2])
def test_a_killed_rank_then_resume_with_any_rank_count_gives_the_same_bytes(
    bert_pop, reference, tmp_path, monkeypatch, resume_ranks
):
    models, dev = bert_pop
    shm = tmp_path / "shm"
    argv = [
        "--models",
        *models,
        "--dev",
        *dev,
        *ARGS,
        "--fitness",
        "individual",
        "--population-on",
        "cpu",
        "--out",
        str(tmp_path / "out"),
    ]
    # rank 1 scores 2 initial individuals, then 2 offspring a generation: killed in generation 2
    killed = _torchrun(argv, shm, 2, script=[KILL_RUN, "evaluate", "5", "1", "--"])
    _, err = killed.communicate(timeout=600)
    assert killed.returncode != 0 and "(SIGKILL)" in err, err[-3000:]
    assert not (tmp_path / "out" / "evolution.json").exists()
    state = json.loads((tmp_path / "out" / "checkpoint" / "state.json").read_text())
    assert state["generation"] == 2  # killed in generation 2, checkpointed at the end of generation 1
    if resume_ranks == 1:
        monkeypatch.setenv("EVOLVER_SHM_DIR", str(shm))
        assert main([*argv, "--resume"]) == 0
    else:
        _finish(_torchrun([*argv, "--resume"], shm, resume_ranks))
    _same(reference["individual"], tmp_path / "out")
    assert not _leftovers(shm, tmp_path / "out")  # the killed run's too, removed by the next start


@pytest.mark.slow
def test_sigterm_removes_the_shared_population(bert_pop, tmp_path):
    """A rank stopped with SIGTERM (torchrun stopping the others) leaves through Run.close. The signal goes once the
    run reports a finished generation (its checkpoint's state.json), in a run far too long to end first."""
    models, dev = bert_pop
    shm = tmp_path / "shm"
    state = tmp_path / "out" / "checkpoint" / "state.json"
    argv = [
        "--models",
        *models,
        "--dev",
        *dev,
        "--generations",
        "100000",
        "--schedule",
        "synchronous",
        "--population-on",
        "cpu",
        "--out",
        str(tmp_path / "out"),
    ]
    proc = _torchrun(argv, shm, 2)

    def generations_done() -> int:
        try:
            return json.loads(state.read_text())["generation"]
        except (OSError, ValueError, KeyError):  # not written yet (state.json appears whole, by rename)
            return 0

    deadline = time.monotonic() + 600  # a safety net against a hung run, not the condition waited for
    while generations_done() < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before its first generation: " + proc.communicate()[1][-3000:]
    assert _leftovers(shm), "the run never made its shared-memory population"
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
    _, err = proc.communicate(timeout=120)
    assert "--resume" in err, err[-3000:]
    assert not _leftovers(shm)


def test_the_plan_is_the_nodes():
    """N copies once (in shared memory, checked like a disk), an evaluation model and chunk buffers per rank;
    one copy per rank without sharing (GPUs hold theirs)."""
    mib = 1 << 20
    common = dict(
        copy_bytes=100 * mib,
        numel=25 * mib,
        n=4,
        tier="cpu",
        compute="cpu",
        evaluation={"cpu": 100 * mib},
        placement="cpu",
        base_model=False,
        chunk_elements=1 << 20,
        out="/out",
    )
    chunk = (1 << 20) * 4 * (2 * 4 + 5)
    one = memory_plan(PlanInputs(**common))
    four = memory_plan(PlanInputs(**common, local_ranks=4, shared_root="/dev/shm"))
    assert one.host == 400 * mib + 100 * mib + chunk
    assert four.host == 400 * mib + 4 * (100 * mib + chunk)
    assert ("the shared-memory population", "/dev/shm", 400 * mib) in four.disk
    assert "population: 4 copies on cpu in shared memory, once for the node's ranks" in four.text()
    assert "evaluation model: 1 copy on cpu per rank (4 ranks on this node)" in four.text()

    def small_shm(needs):
        for what, where, nbytes in needs:
            if where == "/dev/shm" and nbytes > 300 * mib:
                return f"the run writes {nbytes // mib} MiB ({what} under {where}) on a filesystem with 300 MiB free"
        return None

    problem = four.refusal(None, lambda d: 0, small_shm)
    assert "400 MiB (the shared-memory population under /dev/shm)" in problem and "300 MiB free" in problem
    gpus = memory_plan(PlanInputs(**{**common, "tier": "gpu", "compute": "cuda:1"}, local_ranks=4))
    assert gpus.devices["cuda:1"] == 400 * mib + chunk  # each rank's population on its own GPU
