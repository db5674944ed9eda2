"""torchrun with the gloo backend on CPU: 2 processes == 1 process with the same global batch; a signal stops
every rank after the same step."""

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from tests.conftest import TINY_MODEL_ARGS, assert_weights_close
from tests.engine import signal_child

COMMON = [
    "--epochs",
    "2",
    "--num-workers",
    "0",
    "--no-progress",
    "data.num_samples=64",
    "lr=0.002",
    *[f"model_args.{k}={v}" for k, v in TINY_MODEL_ARGS.items()],
]


def _torchrun(nproc):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def _run(args, nproc=None):
    prefix = [sys.executable, "-m", "maelab"]
    if nproc:
        prefix = [*_torchrun(nproc), "-m", "maelab"]
    proc = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "one"
    _run(["pretrain", "--output", str(out), "--batch-size", "16", *COMMON])
    return out


def test_two_gloo_processes_match_one_process(tmp_path, one_process_run):
    proc = _run(["pretrain", "--output", str(tmp_path / "two"), "--batch-size", "8", *COMMON], nproc=2)
    assert proc.stdout.count("finished") == 1  # only rank 0 reports
    assert_weights_close(_weights(one_process_run), _weights(tmp_path / "two"))
    recs = [(d / "metrics.jsonl").read_text().splitlines() for d in (one_process_run, tmp_path / "two")]
    assert len(recs[0]) == len(recs[1]) == 2


@pytest.mark.slow  # 16 s; default suite: test_two_gloo_processes_match_one_process, test_masking's rows test
def test_two_gloo_processes_match_one_process_with_block_masks(tmp_path):
    """Each rank draws the block masks of its own rows only: still exactly one process's masks."""
    args = ["model_args.mask_type=block", "--max-steps", "3", *COMMON]
    _run(["pretrain", "--output", str(tmp_path / "one"), "--batch-size", "16", *args])
    _run(["pretrain", "--output", str(tmp_path / "two"), "--batch-size", "8", *args], nproc=2)
    assert_weights_close(_weights(tmp_path / "one"), _weights(tmp_path / "two"))


# 3 launches (37 s); default suite: test_fsdp_state_is_gathered_onto_rank_0_only_in_the_unsharded_format
@pytest.mark.slow
def test_fsdp_checkpoint_reloads_at_another_world_size(tmp_path, one_process_run):
    # 2 FSDP ranks stop mid-epoch; one plain process finishes the run.
    out = tmp_path / "fsdp"
    _run(["pretrain", "--output", str(out), "--batch-size", "8", "fsdp=true", "--max-steps", "3", *COMMON], nproc=2)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert state["world_size"] == 2 and state["step"] == 3
    assert state["model"]["cls_token"].shape == (1, 1, TINY_MODEL_ARGS["embed_dim"])  # unsharded
    _run(["pretrain", "--output", str(out), "--batch-size", "16", "--resume", *COMMON])
    assert_weights_close(_weights(one_process_run), _weights(out))

    # and the other way: a one-process checkpoint continues on 2 FSDP ranks
    out2 = tmp_path / "to_fsdp"
    _run(["pretrain", "--output", str(out2), "--batch-size", "16", "--max-steps", "5", *COMMON])
    _run(["pretrain", "--output", str(out2), "--batch-size", "8", "fsdp=true", "--resume", *COMMON], nproc=2)
    assert_weights_close(_weights(one_process_run), _weights(out2))


GATHER_SCRIPT = """
import sys, torch, torch.distributed as dist
import maelab
from maelab.engine.distributed import full_state_on_rank0, shard_model
from maelab.engine.optim import build_adamw

def stepped(shard):
    torch.manual_seed(0)
    model = maelab.create_model("mae_vit_pico_patch4_32", **ARGS)
    if shard:
        shard_model(model, [*model.encoder.blocks, *model.decoder_blocks])
    opt = build_adamw(model, 1e-3)
    torch.manual_seed(1)  # the same images on both ranks: FSDP's mean gradient is one process's gradient
    model(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 64)).loss.backward()
    opt.step()
    return model, opt

dist.init_process_group("gloo")
model_sd, optim_sd = full_state_on_rank0(*stepped(shard=True))
if dist.get_rank() == 0:
    plain, opt = stepped(shard=False)
    torch.save({"fsdp": (model_sd, optim_sd), "plain": (plain.state_dict(), opt.state_dict())}, sys.argv[1])
else:
    assert model_sd == {} and optim_sd == {}, "rank 1 must not hold the full state"
dist.destroy_process_group()
"""


@pytest.mark.slow  # 10 s; FSDP runs with -m slow
def test_fsdp_state_is_gathered_onto_rank_0_only_in_the_unsharded_format(tmp_path):
    """Under FSDP a checkpoint's full model and optimizer state lands on rank 0's CPU only (rank 1 gets
    empty dicts), keyed like an unsharded ``state_dict()`` and ``Optimizer.state_dict()``."""
    script = tmp_path / "gather.py"
    script.write_text(f"ARGS = {TINY_MODEL_ARGS!r}\n" + GATHER_SCRIPT)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(tmp_path / "state.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "state.pt", weights_only=False)
    (model_sd, optim_sd), (plain_model, plain_optim) = out["fsdp"], out["plain"]
    assert all(t.device.type == "cpu" for t in model_sd.values())
    assert_weights_close(plain_model, model_sd)
    assert optim_sd["param_groups"] == plain_optim["param_groups"]
    assert optim_sd["state"].keys() == plain_optim["state"].keys()
    for i, entry in plain_optim["state"].items():
        assert entry.keys() == optim_sd["state"][i].keys()
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optim_sd["state"][i][name], entry[name], rtol=1e-4, atol=1e-9)


@pytest.mark.slow  # 11 s of torchrun
def test_resume_with_another_global_batch_is_refused(tmp_path):
    out = tmp_path / "run"
    _run(["pretrain", "--output", str(out), "--batch-size", "16", "--max-steps", "1", *COMMON])
    proc = subprocess.run(
        [sys.executable, "-m", "maelab", "pretrain", "--output", str(out), "--batch-size", "8", "--resume", *COMMON],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "global batch of 16" in proc.stderr


@pytest.mark.parametrize("to", ["torchrun-group", pytest.param("rank1", marks=pytest.mark.slow)])  # rank1: 10 s
def test_signal_stops_every_rank_after_the_same_step(tmp_path, to):
    # torchrun-group: SIGTERM to torchrun's process group; torchrun forwards it to each rank's own process group
    # (a DataLoader worker included). rank1: SIGUSR1 to rank 1 alone; rank 0 learns it through the ranks' agreement.
    group = to == "torchrun-group"
    sig = signal.SIGTERM if group else signal.SIGUSR1
    out = tmp_path / "run"
    proc, ready = signal_child.start(
        out,
        3,
        ["--batch-size", "8", *COMMON, "--num-workers", "1"],
        ranks="all" if group else "1",
        launcher=tuple(_torchrun(2)),
    )
    pids = signal_child.wait_ready(proc, ready, [0, 1] if group else [1])  # step 3 of 8: mid-run
    if group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(pids[1], sig)  # rank 0 is not held: it waits for rank 1 in the step's all-reduce
    stdout, stderr = proc.communicate(timeout=120)
    for rank in (0, 1):
        assert f"received signal {sig.value} (rank {rank}): stopped after step 3" in stderr, stderr[-3000:]
        assert (ready / f"exit{rank}").read_text() == "0"
    assert "DataLoader worker" not in stderr and "forcefully exiting" not in stderr  # no worker died, none hung
    # torchrun itself exits 1 when it was signaled: its agent re-raises the signal as a SignalException
    assert proc.returncode == (1 if group else 0), stderr[-3000:]
    assert stdout.count("stopped (resume with --resume)") == 1  # only rank 0 reports
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt"]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 3 and state["world_size"] == 2


def _free_port_below_ephemeral():
    """A free TCP port in 20000-29999, under Linux's ephemeral range (32768+): one taken from that range (bind to
    port 0) can go to another process's outgoing connection before rank 0 listens on it."""
    for i in range(10000):
        port = 20000 + (os.getpid() + i) % 10000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29999")


def _slurm_tasks(ntasks):
    """What ``srun --ntasks N`` sets for each task on one host (no torchrun variables; MASTER_PORT a free port,
    MASTER_ADDR left to the node list)."""
    port = _free_port_below_ephemeral()
    return [
        {
            "SLURM_PROCID": str(r),
            "SLURM_LOCALID": str(r),
            "SLURM_NODEID": "0",
            "SLURM_NTASKS": str(ntasks),
            "SLURM_TASKS_PER_NODE": str(ntasks),
            "SLURM_JOB_NODELIST": "127.0.0.1",
            "SLURM_JOB_ID": "4242",
            "MASTER_PORT": str(port),
        }
        for r in range(ntasks)
    ]


@pytest.mark.slow  # 6 s; default: test_launch.py (the SLURM variables) and the torchrun-group signal test
def test_srun_tasks_stop_after_the_same_step_and_exit_0(tmp_path):
    """SLURM's srun without torchrun: 2 tasks read their ranks from SLURM's variables; SIGTERM to the job's process
    group (as scancel / --signal deliver it) stops both after the same step, each exits 0 itself, one last.pt."""
    out = tmp_path / "run"
    procs, ready = signal_child.start_tasks(
        out, 3, ["--batch-size", "8", *COMMON, "--num-workers", "1"], _slurm_tasks(2)
    )
    try:
        signal_child.wait_ready(procs, ready, [0, 1])  # step 3 of 8: mid-run
        os.killpg(procs[0].pid, signal.SIGTERM)
        ends = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (proc, (stdout, stderr)) in enumerate(zip(procs, ends)):
        assert proc.returncode == 0, stderr[-3000:]
        assert f"received signal {signal.SIGTERM.value} (rank {rank}): stopped after step 3" in stderr, stderr[-3000:]
        assert ("launched by SLURM's srun" in stderr) == (rank == 0)  # logged once, by rank 0
        assert stdout.count("stopped (resume with --resume)") == (rank == 0)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt"]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 3 and state["world_size"] == 2
