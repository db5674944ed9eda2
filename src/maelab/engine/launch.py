"""Who started the processes of a job: ``torchrun``, SLURM's ``srun`` directly, or nobody (one process).

torch.distributed's ``env://`` rendezvous reads torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). ``srun`` starts one task per GPU itself and sets
SLURM's instead (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_JOB_NODELIST``, ...);
:func:`adopt_slurm_launch` writes torchrun's from them (as timm's ``init_distributed_device`` does), so the
rest of maelab reads one set of variables. torchrun's win where both are present (``srun torchrun ...``).
Without torchrun in between, a job's exit code is its ranks' own: 0 after a preemption signal, where
torchrun's agent exits 1 when signalled. No torch import here: the config reads it too.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

from maelab.errors import ConfigError

log = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE")
"""Set by torchrun (and by any other ``env://`` launcher): their presence means SLURM's are not read."""
DEFAULT_PORT = 29500
"""torchrun's default MASTER_PORT, used when neither MASTER_PORT nor SLURM_JOB_ID is set."""
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_REPEAT = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list in full, in order: ``node[01-03,07],gpu5`` -> node01, node02, node03, node07,
    gpu5 (zero padding as written; several bracket groups in one name give every combination), as
    ``scontrol show hostnames`` prints it."""
    hosts: list[str] = []
    for name in _split_outside_brackets(nodelist):
        hosts.extend(_expand_name(name, nodelist))
    if not hosts:
        raise ConfigError(f"invalid SLURM node list {nodelist!r}: no host in it")
    return hosts


def _split_outside_brackets(text: str) -> list[str]:
    """``text`` split at the commas outside ``[...]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_name(name: str, nodelist: str) -> list[str]:
    """One host name with bracket groups (``rack[1-2]-n[01-02]``) expanded, first group outermost."""
    head, bracket, rest = name.partition("[")
    if not bracket:
        if "]" in name:
            raise ConfigError(f"invalid SLURM node list {nodelist!r}: unbalanced ']' in {name!r}")
        return [name]
    ranges, closed, tail = rest.partition("]")
    if not closed:
        raise ConfigError(f"invalid SLURM node list {nodelist!r}: unclosed '[' in {name!r}")
    out = []
    for item in ranges.split(","):
        match = _RANGE.match(item.strip())
        if not match:
            raise ConfigError(f"invalid SLURM node list {nodelist!r}: {item!r} is not a number or a range a-b")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        for number in range(int(lo), int(hi) + 1):
            out.extend(_expand_name(f"{head}{str(number).zfill(len(lo))}{tail}", nodelist))
    return out


def expand_tasks_per_node(value: str) -> list[int]:
    """SLURM's tasks-per-node list, one count per node: ``8(x2)`` -> [8, 8]; ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in value.split(","):
        match = _REPEAT.match(item.strip())
        if not match:
            raise ConfigError(f"invalid SLURM tasks per node {value!r}: {item!r} is not N or N(xM)")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def tasks_on_this_node(environ: Mapping[str, str]) -> int:
    """The tasks SLURM runs on this process's node (``SLURM_NODEID`` picks the node): from the step's
    ``SLURM_STEP_TASKS_PER_NODE``, else ``SLURM_TASKS_PER_NODE``, else ``SLURM_NTASKS_PER_NODE``; 1 if none."""
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if environ.get(key):
            counts = expand_tasks_per_node(environ[key])
            node = _int(environ, "SLURM_NODEID", "0")
            return counts[node] if node < len(counts) else counts[0]
    return 1


def is_slurm_launch(environ: Mapping[str, str]) -> bool:
    """Several tasks started by ``srun`` itself: SLURM_PROCID is set, SLURM_NTASKS > 1, and no torchrun variable."""
    if any(k in environ for k in TORCHRUN_VARS) or "SLURM_PROCID" not in environ:
        return False
    return _int(environ, "SLURM_NTASKS", "1") > 1


def slurm_ranks(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun's rank variables for a task that ``srun`` started ({} when :func:`is_slurm_launch` is false):
    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID, LOCAL_WORLD_SIZE = the tasks
    on this node."""
    if not is_slurm_launch(environ):
        return {}
    return {
        "RANK": str(_int(environ, "SLURM_PROCID", "0")),
        "WORLD_SIZE": str(_int(environ, "SLURM_NTASKS", "1")),
        "LOCAL_RANK": str(_int(environ, "SLURM_LOCALID", "0")),
        "LOCAL_WORLD_SIZE": str(tasks_on_this_node(environ)),
    }


def slurm_as_torchrun_env(environ: Mapping[str, str]) -> dict[str, str]:
    """:func:`slurm_ranks` plus the rendezvous ({} when :func:`is_slurm_launch` is false): MASTER_ADDR (if not
    set) = the first host of the step's (else the job's) node list, where task 0 runs; MASTER_PORT (if not
    set) = 20000 + SLURM_JOB_ID % 20000, the same on every task of a job and mostly different between jobs."""
    env = slurm_ranks(environ)
    if not env:
        return env
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not environ.get("MASTER_ADDR") and not nodelist:
        raise ConfigError(
            "SLURM started several tasks but set no SLURM_JOB_NODELIST: set MASTER_ADDR to the host of task 0"
        )
    env["MASTER_ADDR"] = environ.get("MASTER_ADDR") or expand_nodelist(nodelist or "")[0]
    port = 20000 + _int(environ, "SLURM_JOB_ID", "0") % 20000 if "SLURM_JOB_ID" in environ else DEFAULT_PORT
    env["MASTER_PORT"] = environ.get("MASTER_PORT") or str(port)
    return env


def adopt_slurm_launch() -> None:
    """Under ``srun`` without torchrun, write torchrun's variables into ``os.environ`` (see the module
    docstring); nothing otherwise. Idempotent: once written, torchrun's variables are present."""
    env = slurm_as_torchrun_env(os.environ)
    os.environ.update(env)
    if env.get("RANK") == "0":
        log.info(
            "launched by SLURM's srun (no torchrun): %s tasks, %s on this node, rendezvous at %s:%s",
            env["WORLD_SIZE"],
            env["LOCAL_WORLD_SIZE"],
            env["MASTER_ADDR"],
            env["MASTER_PORT"],
        )


def job_env(environ: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """``environ`` (default ``os.environ``) with torchrun's rank variables, under ``srun`` without torchrun those
    of :func:`slurm_ranks`: for code that reads them before (or without) :func:`adopt_slurm_launch`."""
    environ = os.environ if environ is None else environ
    return {**environ, **slurm_ranks(environ)}


def task_cpus(environ: Mapping[str, str] | None = None) -> int | None:
    """SLURM_CPUS_PER_TASK where each training process is one SLURM task (``srun`` without torchrun: RANK and
    WORLD_SIZE are SLURM_PROCID and SLURM_NTASKS), else None: under ``srun torchrun`` a task holds several."""
    env = job_env(environ)
    one_per_task = "SLURM_PROCID" in env and (env.get("RANK"), env.get("WORLD_SIZE")) == (
        env["SLURM_PROCID"],
        env.get("SLURM_NTASKS"),
    )
    return (_int(env, "SLURM_CPUS_PER_TASK", "0") or None) if one_per_task else None


def _int(environ: Mapping[str, str], key: str, default: str) -> int:
    """``environ[key]`` as an int (``default`` when unset); ConfigError naming the variable otherwise."""
    value = environ.get(key, default)
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"invalid {key}={value!r} in the environment: expected an integer") from None
