"""A launch that cannot work stops before anything is allocated, with a message naming the fix:
a world size TP does not divide, heads / KV heads / FFN / vocabulary TP cannot split, a global
batch the ranks cannot share, a memory plan the engine cannot run, and a master address that
does not resolve or answer (in the trainer, and through the deepspeed launcher of a second
node)."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel.rendezvous import RendezvousError, check_master_reachable
from pretrain.training.config import ConfigError, load_config
from pretrain.training.layout import resolve_layout

REPO = Path(__file__).resolve().parents[1]


def config_error(overrides: list[str], check_paths: bool = True) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, check_paths=check_paths)
    return str(e.value)


def test_heads_kv_heads_and_ffn_must_split_over_tp():
    message = config_error(["model.preset=llada_1b", "parallel.tensor_parallel=4"])
    assert "model.mlp_hidden_size: 5634 is not divisible by parallel.tensor_parallel 4" in message
    assert "allows TP in [1, 2]" in message  # LLaDA 1B's FFN 5634 and 4 KV heads
    message = config_error(["model.preset=llada_8b", "parallel.tensor_parallel=3"])
    assert "model.n_heads: 32" in message and "model.mlp_hidden_size" not in message
    message = config_error(["model.n_kv_heads=1", "parallel.tensor_parallel=2"])
    assert "model.n_kv_heads: 1 is not divisible" in message


def test_vocabulary_must_split_over_tp():
    message = config_error(["model.vocab_size=1025", "parallel.tensor_parallel=2"])
    assert "model.vocab_size: 1025" in message and "data.pad_vocab_to_multiple" in message
    message = config_error(["data.pad_vocab_to_multiple=3", "parallel.tensor_parallel=2"])
    assert "data.pad_vocab_to_multiple: 3 is not a multiple of parallel.tensor_parallel 2" in message


def test_tied_embeddings_are_refused_where_they_cannot_work():
    assert "model.weight_tying" in config_error(["model.weight_tying=true"])  # ZeRO-3 default
    load_config(None, ["model.weight_tying=true", "parallel.zero_stage=2"])


def test_selective_checkpointing_is_refused_under_zero3():
    assert "use 'full' with parallel.zero_stage 3" in config_error(
        ["memory.activation_checkpointing=selective"])
    load_config(None, ["memory.activation_checkpointing=selective", "parallel.zero_stage=1"])


def test_world_size_and_global_batch_must_fit_the_layout():
    cfg = load_config(None, ["parallel.tensor_parallel=2", "train.micro_batch_size=4",
                             "train.global_batch_size=16"])
    with pytest.raises(ConfigError, match="world size 3 is not divisible by TP 2"):
        resolve_layout(cfg, 3)
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch_size 4 x data-parallel size 8"):
        resolve_layout(cfg, 16)
    layout = resolve_layout(cfg, 4)
    assert (layout.data_parallel, layout.grad_accum) == (2, 2)


def test_cli_refuses_a_world_tp_does_not_divide(subprocess_env):
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "--dry-run", "--world-size", "3",
                           "parallel.tensor_parallel=2"], capture_output=True, text=True,
                          timeout=120, env=subprocess_env)
    assert proc.returncode == 2
    assert "world size 3 is not divisible by TP 2" in proc.stderr


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


def test_unresolvable_master_address_fails_fast(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(RendezvousError, match="MASTER_ADDR 'no-such-host.invalid' does not resolve"):
        check_master_reachable(timeout_s=60)


def test_unreachable_master_port_fails_after_the_timeout(monkeypatch):
    port = closed_port()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("RANK", "0")
    check_master_reachable(timeout_s=1)  # rank 0 serves the port: nothing to reach yet
    monkeypatch.setenv("RANK", "1")
    start = time.monotonic()
    with pytest.raises(RendezvousError, match=f"cannot reach MASTER_ADDR:MASTER_PORT = 127.0.0.1:{port}"):
        check_master_reachable(timeout_s=1)
    assert time.monotonic() - start < 10


def test_cli_reports_an_unreachable_master_before_building_anything(tmp_path, subprocess_env):
    env = dict(subprocess_env, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(closed_port()))
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "parallel.rendezvous_timeout_s=1",
                           "train.global_batch_size=8",
                           f"train.out_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "launch error: rank 1" in proc.stderr and "firewall" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_launcher_of_a_second_node_with_an_unresolvable_master_stops_at_start(tmp_path, subprocess_env):
    """`deepspeed --no_ssh --node_rank 1 --master_addr <typo>`: the rank on that node exits 3 in
    seconds with the fix, its supervisor names it, and the launcher passes the code on."""
    (tmp_path / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    proc = subprocess.run(["deepspeed", "--no_ssh", "--node_rank", "1", "--hostfile", "hostfile",
                           "--master_addr", "no-such-host.invalid", "--master_port", str(closed_port()),
                           str(REPO / "recipes" / "tiny.sh"), f"train.out_dir={tmp_path / 'run'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=subprocess_env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output[-3000:]
    assert "launch error: MASTER_ADDR 'no-such-host.invalid' does not resolve" in output
    assert "`deepspeed --master_addr`" in output
    assert f"rank 1 (local rank 0) on host {socket.gethostname()}" in output and "exited with code 3" in output
