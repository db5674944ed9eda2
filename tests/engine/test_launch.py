"""SLURM's srun without torchrun: its host list and tasks-per-node forms, and the mapping to torchrun's variables.
The real 2-task run is tests/engine/test_distributed.py::test_srun_tasks_stop_after_the_same_step_and_exit_0."""

import logging
import os

import pytest

from maelab.cli import main
from maelab.config import DataConfig, processes_in_job, processes_on_node
from maelab.engine.launch import adopt_slurm_launch, expand_nodelist, expand_tasks_per_node, slurm_as_torchrun_env
from maelab.errors import ConfigError

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# task 11 of `srun --nodes 2 --ntasks-per-node 8`: the 4th task on the second node
TASK_11 = {
    "SLURM_PROCID": "11",
    "SLURM_LOCALID": "3",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "16",
    "SLURM_TASKS_PER_NODE": "8(x2)",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_JOB_ID": "1234567",
}


@pytest.fixture
def slurm_env(monkeypatch):
    """Sets SLURM variables in os.environ without torchrun's; afterwards torchrun's are as before, also those
    that adopt_slurm_launch wrote (delenv of an unset variable alone would not undo that)."""

    def set_env(values):
        for key in TORCHRUN:
            monkeypatch.setenv(key, "")  # noted as it was, so the undo restores it
            monkeypatch.delenv(key)
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return set_env


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("localhost", ["localhost"]),
        ("node[01-04,07],gpu5", ["node01", "node02", "node03", "node04", "node07", "gpu5"]),
        ("node[8-10]", ["node8", "node9", "node10"]),  # no padding written: none added
        ("a[1-2]-b[09-10],c", ["a1-b09", "a1-b10", "a2-b09", "a2-b10", "c"]),
    ],
)
def test_nodelist_expands_like_scontrol_show_hostnames(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-", "node01]", "node[a-b]", ""])
def test_a_malformed_nodelist_is_a_config_error(nodelist):
    with pytest.raises(ConfigError, match="invalid SLURM node list"):
        expand_nodelist(nodelist)


def test_tasks_per_node_expands_repeats():
    assert expand_tasks_per_node("8(x2)") == [8, 8]
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(ConfigError, match="N or N"):
        expand_tasks_per_node("8(2)")


def test_slurm_task_maps_to_torchrun_variables():
    assert slurm_as_torchrun_env(TASK_11) == {
        "RANK": "11",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "3",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(20000 + 1234567 % 20000),
    }
    # the node's own count (SLURM_NODEID) of an uneven step, the step's node list before the job's
    uneven = {
        **TASK_11,
        "SLURM_NODEID": "3",
        "SLURM_STEP_TASKS_PER_NODE": "5(x3),1",
        "SLURM_STEP_NODELIST": "gpu[010-013]",
    }
    env = slurm_as_torchrun_env(uneven)
    assert env["LOCAL_WORLD_SIZE"] == "1" and env["MASTER_ADDR"] == "gpu010"


def test_set_master_address_and_port_win():
    env = slurm_as_torchrun_env({**TASK_11, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"})
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.1", "29400")


@pytest.mark.parametrize("extra", [{"RANK": "0", "WORLD_SIZE": "2"}, {"SLURM_NTASKS": "1"}])
def test_torchrun_variables_or_one_task_leave_slurm_unread(extra):
    """``srun torchrun ...``: torchrun's variables win; a single SLURM task is a single process."""
    assert slurm_as_torchrun_env({**TASK_11, **extra}) == {}


def test_processes_per_node_and_job_read_slurm_where_torchrun_is_absent(monkeypatch, slurm_env):
    slurm_env(TASK_11)
    assert (processes_on_node(), processes_in_job()) == (8, 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert (processes_on_node(), processes_in_job()) == (2, 4)  # torchrun's win


def test_adopting_a_slurm_launch_writes_torchrun_variables_and_logs_once(slurm_env, caplog):
    slurm_env({**TASK_11, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"})
    with caplog.at_level(logging.INFO, logger="maelab.engine.launch"):
        adopt_slurm_launch()
        adopt_slurm_launch()
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "0",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "gpu007",
    }
    assert [r.getMessage() for r in caplog.records] == [
        "launched by SLURM's srun (no torchrun): 16 tasks, 8 on this node, rendezvous at gpu007:34567"
    ]


def test_a_malformed_slurm_environment_is_one_line_exit_2(slurm_env, capsys):
    slurm_env({**TASK_11, "SLURM_JOB_NODELIST": "gpu[007-"})
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maelab: error: invalid SLURM node list 'gpu[007-'") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("affinity", "extra", "expected"),
    [
        (10, {}, 10),  # srun bound the task to its 10 CPUs: not divided by the node's 8 tasks
        (80, {}, 10),  # not bound: the task's share of the node's 80
        (
            80,
            {
                "RANK": "3",
                "WORLD_SIZE": "16",
                "LOCAL_WORLD_SIZE": "8",
                "SLURM_NTASKS": "2",
                "SLURM_PROCID": "1",
                "SLURM_CPUS_PER_TASK": "80",
            },
            10,
        ),  # srun torchrun: one task of 80 CPUs runs 8 processes
    ],
)
def test_auto_num_workers_is_a_slurm_tasks_share(monkeypatch, slurm_env, affinity, extra, expected):
    slurm_env({**TASK_11, "SLURM_CPUS_PER_TASK": "10", **extra})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    assert DataConfig.auto_num_workers() == expected
