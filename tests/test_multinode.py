"""Multi-node operation on one machine, through the commands a cluster team types.

- Two "nodes": two `deepspeed --no_ssh --node_rank {0,1}` launchers of `recipes/tiny.sh`, 2 ranks
  each, train together and log the same per-step losses, bit for bit, as one launcher with 4
  ranks; a 2-rank run with another seed logs other losses (the negative control). Rank 2 is
  slowed on purpose (guard.inject_delay_*): the straggler metric and warning name it, while in
  the undelayed run the slowest rank is no slower than the median by anything like the delay.
  Every rank writes a per-rank log.
- The same two-launcher run, once a few steps are logged, loses rank 3 to SIGKILL: both
  launchers exit non-zero well within the collective timeout plus the launcher's own grace
  period, node 1's log names rank 3 and the signal, node 0's ranks report the failed
  collective.
- A peer that hangs instead (never joins the all-reduce): the collective fails after
  `parallel.collective_timeout_s`, as gloo's message shows, and the rank exits 6 naming itself.
- SLURM, simulated: `recipes/slurm_llada.sbatch` with stand-ins for `scontrol` and `srun` on PATH
  (a fake scheduler CLI; the launcher, ranks and engine are real) builds the hostfile, resolves
  the master, trains a 2-rank run, and on the preemption signal lets every rank checkpoint and
  requeues the job; a master host that does not resolve stops the script at once. `bash -n`.
- `recipes/deepspeed_env.sh` writes a .deepspeed_env that DeepSpeed's own pdsh runner turns into
  the exports of the remote command (pdsh itself is a stand-in that records its command).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.ports import free_port

from pretrain.checkpoint import store as ckpt
from pretrain.training.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny.sh")
SBATCH = REPO / "recipes" / "slurm_llada.sbatch"
OVERRIDES = ["train.micro_batch_size=8", "train.global_batch_size=32", "model.n_layers=2",
             "model.vocab_size=500", "data.pad_vocab_to_multiple=64", "data.max_bytes=1000000",
             "data.heldout_fraction=0.1", "data.num_workers=1", "validation.every=0",
             "validation.elbo_every=0", "logging.every=2", "logging.progress_bar=false",
             "logging.tensorboard=false", "checkpoint.every=0", "sample.gen_length=4", "sample.steps=4",
             "sample.block_length=4"]
COMPARED_STEPS = [1, 2, 3, 4]
DELAYED_RANK, DELAY_S = 2, 0.5
KILLED_RANK = 3
COLLECTIVE_TIMEOUT_S = 20
LAUNCHER_GRACE_S = 30  # DeepSpeed's launch.py waits this long for the ranks it terminates


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    complete = path.read_text().split("\n")[:-1] if path.exists() else []  # not a line being written
    return [json.loads(line) for line in complete]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def wait_for_step(out: Path, step: int, launchers: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + 400
    while max(losses(out), default=0) < step:
        ended = [p.returncode for p in launchers if p.poll() is not None]
        if ended or time.monotonic() > deadline:
            pytest.fail(f"launchers ended {ended} before step {step}:\n" +
                        "\n".join(log.read_text()[-3000:] for log in logs))
        time.sleep(0.1)


def process_tree(pid: int) -> list[int]:
    """pid and every process below it."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, stack = [], [pid]
    while stack:
        tree.append(stack.pop())
        stack.extend(parents.get(tree[-1], []))
    return tree


def stop_all(launchers: list[subprocess.Popen]) -> None:
    """Teardown after a failed check: SIGKILL what these launchers started, then them."""
    for p in launchers:
        if p.poll() is None:
            for pid in reversed(process_tree(p.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()


@dataclass
class TwoNodeRun:
    out: Path
    logs: list[str]             # each launcher's stdout and stderr
    exit_codes: list[int]
    killed_pid: int
    seconds_to_end: float       # from the SIGKILL until both launchers had exited


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory, subprocess_env) -> TwoNodeRun:
    """Two launchers (node 0, node 1) of 2 ranks each, rank 2 slowed; rank 3 SIGKILLed after step 4."""
    work = tmp_path_factory.mktemp("two_nodes")
    (work / "hostfile").write_text("node0 slots=2\nnode1 slots=2\n")
    out = work / "run"
    port = free_port()
    args = [*OVERRIDES, "train.steps=200", f"train.out_dir={out}", "logging.per_rank_logs=true",
            f"parallel.collective_timeout_s={COLLECTIVE_TIMEOUT_S}", f"guard.inject_delay_rank={DELAYED_RANK}",
            f"guard.inject_delay_s={DELAY_S}", "logging.straggler_factor=1.01"]
    log_paths = [work / f"node{n}.log" for n in (0, 1)]
    launchers = []
    for node, log_path in enumerate(log_paths):
        with open(log_path, "w") as log:
            launchers.append(subprocess.Popen(
                ["deepspeed", "--no_ssh", "--node_rank", str(node), "--hostfile", "hostfile",
                 "--master_addr", "127.0.0.1", "--master_port", str(port), TINY, *args],
                cwd=work, env=subprocess_env, stdout=log, stderr=subprocess.STDOUT))
    try:
        wait_for_step(out, COMPARED_STEPS[-1], launchers, log_paths)
        header = (out / "logs" / f"rank_{KILLED_RANK:05d}.log").read_text().splitlines()[0]
        killed_pid = int(header.split(" pid ")[1].split(",")[0])
        os.kill(killed_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        for p in launchers:
            p.wait(timeout=COLLECTIVE_TIMEOUT_S + LAUNCHER_GRACE_S + 60)
        seconds = time.monotonic() - killed_at
    finally:
        stop_all(launchers)
    return TwoNodeRun(out, [p.read_text() for p in log_paths], [p.returncode for p in launchers],
                      killed_pid, seconds)


@pytest.fixture(scope="module")
def one_launcher_run(tmp_path_factory, subprocess_env) -> Path:
    """The same 4 ranks under one launcher, no delay, 4 steps."""
    work = tmp_path_factory.mktemp("one_launcher")
    out = work / "run"
    proc = subprocess.run(["deepspeed", "--num_gpus", "4", "--master_port", str(free_port()), TINY,
                           *OVERRIDES, f"train.steps={COMPARED_STEPS[-1]}", f"train.out_dir={out}"],
                          cwd=work, env=subprocess_env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


HUNG_PEER = """
import sys, time, torch
from parallel import engine
from pretrain.runtime.rank_failures import exit_after_collective_failure, is_collective_failure
engine.init_distributed(rendezvous_timeout_s=60, collective_timeout_s=float(sys.argv[1]))
if torch.distributed.get_rank() == 1:
    time.sleep(600)  # hung: never joins the collective (the test ends it)
try:
    torch.distributed.all_reduce(torch.ones(1))
except Exception as error:
    assert is_collective_failure(error), error
    exit_after_collective_failure(error, 0, 7, "the test's all-reduce")
"""


def test_a_hung_peer_fails_the_collective_after_the_configured_timeout(subprocess_env):
    """parallel.collective_timeout_s reaches the process group: rank 0's all-reduce with a rank
    that never joins fails after that timeout (gloo says which), and the rank exits 6 naming itself."""
    env = dict(subprocess_env, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ranks = [subprocess.Popen([sys.executable, "-c", HUNG_PEER, "3"], cwd=REPO,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        _, stderr = ranks[0].communicate(timeout=120)
    finally:
        ranks[1].kill()
        ranks[1].wait()
    assert ranks[0].returncode == 6, stderr[-2000:]
    assert (f"rank 0 on host {socket.gethostname()}: a collective failed at step 7 in the test's all-reduce "
            f"(RuntimeError: ") in stderr
    assert "Timed out waiting 3000ms" in stderr  # the configured timeout, not torch's 30 minutes


FAKE_SCONTROL = """#!/bin/bash
# scontrol stand-in: the allocation's host names; every other call is recorded.
if [[ "$1 $2" == "show hostnames" ]]; then tr ',' '\\n' <<< "$FAKE_SLURM_HOSTS"; exit 0; fi
echo "$*" >> "$FAKE_SLURM_DIR/scontrol.calls"
"""
FAKE_SRUN = """#!/bin/bash
# srun stand-in for one node: runs the step's command as node 0 in its own process group and,
# as slurmstepd does, passes a signal sent to srun on to every process of the step.
echo "$*" >> "$FAKE_SLURM_DIR/srun.calls"
while [[ "$1" == -* ]]; do shift; done
set -m
SLURM_NODEID=0 SLURM_PROCID=0 "$@" &
step=$!
trap 'kill -USR1 -- -$step' USR1
trap 'kill -TERM -- -$step' TERM
while kill -0 $step 2>/dev/null; do wait $step; done
wait $step
"""


def fake_slurm(work: Path, env: dict, hosts: str) -> dict:
    """PATH with the scheduler stand-ins, and the variables a SLURM job sees."""
    bin_dir = work / "fake_slurm_bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return dict(env, PATH=f"{bin_dir}:{env['PATH']}", FAKE_SLURM_DIR=str(work), FAKE_SLURM_HOSTS=hosts,
                SLURM_JOB_ID="4242", SLURM_JOB_NODELIST=hosts, GPUS_PER_NODE="2",
                MASTER_PORT=str(free_port()), JOB_DIR=str(work / "job"))


@dataclass
class SlurmRun:
    work: Path
    out: Path
    output: str
    exit_code: int


@pytest.fixture(scope="module")
def preempted_slurm_run(tmp_path_factory, subprocess_env) -> SlurmRun:
    """The sbatch script on a simulated 1-node allocation (2 ranks, another seed), sent SIGUSR1 after step 2."""
    work = tmp_path_factory.mktemp("slurm")
    out = work / "run"
    env = fake_slurm(work, subprocess_env, "localhost")
    log_path = work / "job.log"
    with open(log_path, "w") as log:
        job = subprocess.Popen(["bash", str(SBATCH), TINY, *OVERRIDES, "train.steps=200", "train.seed=7",
                                f"train.out_dir={out}"],
                               cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_step(out, 2, [job], [log_path])
        job.send_signal(signal.SIGUSR1)
        job.wait(timeout=300)
    finally:
        stop_all([job])
    return SlurmRun(work, out, log_path.read_text(), job.returncode)


def test_two_launchers_train_like_one(two_node_run, one_launcher_run, preempted_slurm_run):
    two_nodes, one = losses(two_node_run.out), losses(one_launcher_run)
    assert sorted(one) == COMPARED_STEPS
    assert {s: two_nodes[s] for s in COMPARED_STEPS} == one  # bit for bit
    # Negative control: another seed (other data order and noise). (2 ranks with the same seed would
    # now follow within float tolerance: the global batch does not depend on its split.)
    two_ranks = losses(preempted_slurm_run.out)
    compared = [s for s in COMPARED_STEPS if s in two_ranks]
    assert compared and all(abs(two_ranks[s] - one[s]) > 1e-4 for s in compared), (two_ranks, one)


def test_the_slowed_rank_is_named(two_node_run, one_launcher_run):
    reports = [r for r in records(two_node_run.out) if "straggler/slowest_rank" in r]
    assert [r["step"] for r in reports][:2] == [2, 4]
    for r in reports:
        assert r["straggler/slowest_rank"] == DELAYED_RANK
        assert r["straggler/slowest_step_s"] - r["straggler/median_step_s"] > 0.8 * DELAY_S, r
        assert r["straggler/slowest_to_median"] > 1
    assert f"straggler: rank {DELAYED_RANK} on host {socket.gethostname()}" in two_node_run.logs[0]
    # Negative control: without the delay no rank is slower than the median by anything like it.
    undelayed = [r for r in records(one_launcher_run) if "straggler/slowest_rank" in r]
    assert [r["step"] for r in undelayed] == [2, 4]
    assert all(r["straggler/slowest_step_s"] - r["straggler/median_step_s"] < 0.5 * DELAY_S
               for r in undelayed), undelayed


def test_a_killed_rank_ends_every_rank_and_is_named(two_node_run):
    node0, node1 = two_node_run.logs
    assert all(code != 0 for code in two_node_run.exit_codes), two_node_run.exit_codes
    assert two_node_run.seconds_to_end < COLLECTIVE_TIMEOUT_S + LAUNCHER_GRACE_S, two_node_run.seconds_to_end
    host = socket.gethostname()
    assert (f"rank {KILLED_RANK} (local rank 1) on host {host}, pid {two_node_run.killed_pid}: killed by SIGKILL"
            in node1), node1[-3000:]
    assert two_node_run.exit_codes[1] == 128 + signal.SIGKILL  # node 1's launcher passes the code on
    # Node 0's ranks saw the collective fail and said so, in the console and in their own logs.
    failed = [r for r in (0, 1) if f"rank {r} on host {host}: a collective failed at step" in node0]
    assert failed, node0[-3000:]
    for r in failed:
        assert "a collective failed" in (two_node_run.out / "logs" / f"rank_{r:05d}.log").read_text()


def test_every_rank_writes_its_own_log(two_node_run):
    logs = sorted((two_node_run.out / "logs").iterdir())
    assert [p.name for p in logs] == [f"rank_{r:05d}.log" for r in range(4)]
    for rank, path in enumerate(logs):
        header = path.read_text().splitlines()[0]
        assert header.startswith(f"rank {rank} (local rank {rank % 2}) on host {socket.gethostname()}, pid ")
        assert "world 4, master 127.0.0.1:" in header
    assert "layout: world 4 = TP 1 x DP 4" in logs[0].read_text()  # rank 0's console output, teed


def test_slurm_script_trains_checkpoints_on_preemption_and_requeues(preempted_slurm_run):
    run = preempted_slurm_run
    assert run.exit_code == 0, run.output[-3000:]
    assert (run.work / "job" / "hostfile").read_text() == "localhost slots=2\n"
    srun = (run.work / "srun.calls").read_text()
    assert "--kill-on-bad-exit=1" in srun and f"{TINY} --resume auto" in srun
    assert "requeue 4242" in (run.work / "scontrol.calls").read_text()
    saved = ckpt.published_steps(run.out / "checkpoints")
    assert saved and saved[-1] >= 2 and saved[-1] == max(losses(run.out)), (saved, run.output[-3000:])
    assert f"preempted (SIGUSR1): saved step {saved[-1]}; continue with --resume auto" in run.output


def test_slurm_script_stops_at_once_when_the_master_does_not_resolve(tmp_path, subprocess_env):
    env = fake_slurm(tmp_path, subprocess_env, "no-such-node.invalid,node2")
    proc = subprocess.run(["bash", str(SBATCH), TINY], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "the rendezvous host 'no-such-node.invalid' does not resolve" in proc.stderr
    assert "set MASTER_ADDR to an address of no-such-node.invalid" in proc.stderr
    assert not (tmp_path / "srun.calls").exists()


def test_slurm_script_parses():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def test_deepspeed_env_reaches_the_remote_command(tmp_path, subprocess_env):
    env = dict(subprocess_env, NCCL_SOCKET_IFNAME="eth0", NCCL_IB_HCA="mlx5_0,mlx5_1",
               TORCH_NCCL_ASYNC_ERROR_HANDLING="1", VIRTUAL_ENV=str(tmp_path / "venv"))
    subprocess.run(["bash", str(REPO / "recipes" / "deepspeed_env.sh"), str(tmp_path)], env=env, check=True,
                   capture_output=True)
    written = dict(line.split("=", 1) for line in (tmp_path / ".deepspeed_env").read_text().splitlines())
    assert written["PATH"].startswith(f"{tmp_path / 'venv'}/bin:")
    assert written["PYTHONPATH"].split(":")[0] == str(REPO)
    # DeepSpeed's runner on a 2-host hostfile builds the pdsh command; pdsh records it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pdsh").write_text(f'#!/bin/bash\necho "$*" > {tmp_path}/pdsh.command\n')
    (bin_dir / "pdsh").chmod(0o755)
    (tmp_path / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    proc = subprocess.run(["deepspeed", "--hostfile", "hostfile", "--no_ssh_check", "--master_addr", "node0",
                           TINY], cwd=tmp_path, env=dict(env, PATH=f"{bin_dir}:{env['PATH']}"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    command = (tmp_path / "pdsh.command").read_text()
    for exported in ("export NCCL_SOCKET_IFNAME=eth0;", "export NCCL_IB_HCA=mlx5_0,mlx5_1;",
                     "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1;", f"export VIRTUAL_ENV={tmp_path / 'venv'};",
                     f"export PYTHONPATH={REPO}"):
        assert exported in command, command


def test_the_new_settings_are_validated():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["parallel.collective_timeout_s=0", "logging.straggler_factor=0.5",
                           "guard.inject_delay_s=-1"])
    message = str(e.value)
    assert "parallel.collective_timeout_s: must be positive, got 0" in message
    assert "logging.straggler_factor: must be 0 (no warning) or > 1, got 0.5" in message
    assert "guard.inject_delay_rank / guard.inject_delay_s" in message
    load_config(None, ["parallel.collective_timeout_s=30", "logging.straggler_factor=0",
                       "guard.inject_delay_rank=1", "guard.inject_delay_s=0.5"])
