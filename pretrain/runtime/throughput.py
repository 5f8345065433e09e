"""Throughput accounting of every training run, and the fast-path switches it measures.

The training loop hands each step's phases to a `StepProfiler`: data wait (`next(loader)`),
forward, backward, optimizer (`engine.step`) and communication (the step-metrics all-reduce).
Every `logging.every` steps it logs, for the steps since the last report (the first
`profile.warmup_steps` of a run left out: compilation, allocator warm-up): tokens/s per device,
model and executed TFLOP/s per device and MFU (`pretrain.runtime.flops` has the convention), peak memory
(CUDA's allocator peak on GPU, the process's peak resident memory on CPU) and the time split in
ms per step. With `parallel.deepspeed: {comms_logger: {enabled: true, prof_all: true}}` it also
reports the time inside DeepSpeed's own collectives (ZeRO's gathers and reductions, which run
inside the forward, backward and optimizer phases; the logger makes each one blocking, so it
slows the step it measures). `profile.trace_steps` records steps after the warm-up with
torch.profiler and writes a Chrome trace per rank under `<out_dir>/profile/`.

On GPU each phase boundary synchronises the device (`profile.time_split`), which costs some
overlap of host and device work; without it only the whole step is timed.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import time
from pathlib import Path

import torch

from parallel.engine import all_reduce
from pretrain.runtime.flops import FlopMeter, Flops, device_name, mfu, peak_tflops

# "pipeline": forward, backward and optimizer interleaved by the PipelineEngine (pipeline runs only)
PHASES = ("data", "forward", "backward", "optimizer", "pipeline", "communication")


@dataclasses.dataclass
class FastConfig:
    """The fast path's switches (each leaves loss and gradients as they are; tests compare)."""
    # RMSNorm, RoPE and SwiGLU each fused by torch.compile with dynamic shapes
    # (parallel/fused_ops.py); needs a C++ compiler on CPU, Triton on GPU.
    compile_pointwise: bool = False
    # torch.optim.AdamW(fused=True): one kernel per parameter group instead of a loop over tensors.
    fused_adamw: bool = False
    # One q/k/v and one gate/up matmul per block (parallel/fused_projections.py); checkpoints
    # keep the released tensor names; DeepSpeed's optimizer shards change with it, so a resume
    # across a change is a change of layout (the optimizer state comes from optimizer.safetensors).
    fuse_projections: bool = False


@dataclasses.dataclass
class ProfileConfig:
    """What every run measures of its own speed (pretrain/runtime/throughput.py)."""
    # Dense bf16 TFLOP/s of one device, for MFU; 0 looks the device up in pretrain.runtime.flops
    # (H100, H800, H200, A100); on any other device MFU is reported as unknown.
    peak_tflops: float = 0.0
    # Steps at the start of a run left out of the throughput figures.
    warmup_steps: int = 1
    # Synchronise the device at each phase boundary to split step time (GPU; free on CPU).
    time_split: bool = True
    # > 0: record this many steps after the warm-up with torch.profiler into <out_dir>/profile/.
    trace_steps: int = 0

    def problems(self) -> list[str]:
        out = []
        for name in ("peak_tflops", "warmup_steps", "trace_steps"):
            if getattr(self, name) < 0:
                out.append(f"profile.{name}: must be >= 0, got {getattr(self, name)}")
        return out


def peak_memory_gib() -> tuple[float, str]:
    """(peak bytes in GiB, what was measured): CUDA's allocator peak, else the peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "CUDA allocator peak"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "process peak RSS"


def _deepspeed_comm_timers() -> dict | None:
    """DeepSpeed's per-collective timers when its comms logger is on, else None."""
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is None or not comm.comms_logger.enabled:
        return None
    return comm.timers.get_timers()


class StepProfiler:
    """Times the phases of each training step and reports throughput every logging interval.

    `meter` counts the FLOPs of the model's training forwards (None: a pipeline, whose stages
    are not hooked; FLOP figures are then absent). `ranks_per_replica`: the tensor x pipeline
    ranks that share one replica's batches, so each FLOP is counted once."""

    def __init__(self, cfg: ProfileConfig, *, meter: FlopMeter | None, out_dir: Path, rank: int,
                 world_size: int, ranks_per_replica: int):
        self.cfg = cfg
        self.meter = meter
        self.rank = rank
        self.world_size = world_size
        self.ranks_per_replica = ranks_per_replica
        self.device = device_name()
        self.peak = peak_tflops(self.device, cfg.peak_tflops)
        self._sync = cfg.time_split and torch.cuda.is_available()
        self._steps_seen = 0
        self._last = 0.0
        self._reset_window()
        self._torch_profiler = self._start_trace(out_dir) if cfg.trace_steps else None

    def _reset_window(self) -> None:
        self._window_steps = 0
        self._window_tokens = 0.0
        self._window_seconds = 0.0
        self._phase_seconds = dict.fromkeys(PHASES, 0.0)
        if self.meter is not None:
            self.meter.take()
        timers = _deepspeed_comm_timers()
        for timer in (timers or {}).values():
            timer.reset()

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start_step(self) -> None:
        self._step_start = self._last = self._now()

    def lap(self, phase: str) -> None:
        """The time since the last boundary goes to `phase` (one of PHASES)."""
        if self.cfg.time_split:
            now = self._now()
            self._phase_seconds[phase] += now - self._last
            self._last = now

    def end_step(self, tokens: float) -> float:
        """Close a step that trained on `tokens` tokens (the whole world's); returns its seconds."""
        seconds = self._now() - self._step_start
        self._steps_seen += 1
        if self._torch_profiler is not None:
            self._torch_profiler.step()
        if self._steps_seen <= self.cfg.warmup_steps:
            self._reset_window()
            return seconds
        self._window_steps += 1
        self._window_tokens += tokens
        self._window_seconds += seconds
        return seconds

    def report(self) -> dict:
        """The `perf/...` metrics of the steps since the last report (empty before any step
        after the warm-up), then a new window. A collective: every rank calls it at the same step."""
        if self._window_steps == 0:
            return {}
        steps, seconds = self._window_steps, self._window_seconds
        flops = self.meter.take() if self.meter is not None else None
        comm_timers = _deepspeed_comm_timers()
        comm_ms = sum(t.elapsed(reset=False) for t in comm_timers.values()) if comm_timers else None
        if flops is not None:
            flops = _sum_over_ranks(flops, self.ranks_per_replica)
        out = {"perf/device": self.device, "perf/steps": steps,
               "perf/tokens_per_s_per_device": self._window_tokens / seconds / self.world_size}
        if flops is not None:
            model_tflops = flops.model / seconds / self.world_size / 1e12
            out.update({"perf/model_tflops_per_device": model_tflops,
                        "perf/executed_tflops_per_device": flops.executed / seconds / self.world_size / 1e12,
                        "perf/mfu": mfu(model_tflops, self.peak)})
        out["perf/peak_tflops"] = self.peak
        memory, _ = peak_memory_gib()
        out["perf/peak_memory_gib"] = memory
        out["perf/ms/step"] = 1000 * seconds / steps
        if self.cfg.time_split:
            for phase in PHASES:
                if phase != "pipeline" or self._phase_seconds[phase]:
                    out[f"perf/ms/{phase}"] = 1000 * self._phase_seconds[phase] / steps
            out["perf/ms/other"] = 1000 * (seconds - sum(self._phase_seconds.values())) / steps
        if comm_ms is not None:
            out["perf/ms/deepspeed_collectives"] = comm_ms / steps
        self._reset_window()
        return out

    def _start_trace(self, out_dir: Path):
        trace_dir = out_dir / "profile"
        trace_dir.mkdir(parents=True, exist_ok=True)
        path = trace_dir / f"trace_rank{self.rank:05d}.json"

        def write(prof) -> None:
            tmp = path.with_name(path.name + ".tmp")
            prof.export_chrome_trace(str(tmp))
            os.replace(tmp, path)

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        warmup = self.cfg.warmup_steps
        profiler = torch.profiler.profile(
            activities=activities, on_trace_ready=write,
            schedule=torch.profiler.schedule(wait=max(warmup - 1, 0), warmup=min(warmup, 1),
                                             active=self.cfg.trace_steps, repeat=1))
        profiler.start()
        return profiler

    def close(self) -> None:
        """Write the trace if the run ended inside the traced steps."""
        if self._torch_profiler is not None:
            self._torch_profiler.stop()
            self._torch_profiler = None


def _sum_over_ranks(flops: Flops, ranks_per_replica: int) -> Flops:
    """Every rank's FLOPs summed, each replica counted once (its TP/PP ranks see its batches)."""
    model, executed = all_reduce([flops.model, flops.executed])
    return Flops(model=model / ranks_per_replica, executed=executed / ranks_per_replica)
