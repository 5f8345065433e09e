"""FLOP accounting, the device peak table and MFU: the one convention every throughput figure uses.

Model FLOPs (what MFU divides by the device peak) per token:
    6 x (every parameter except the input embedding table; the LM head included, a tied head
    counted as the head it also is) + 12 x layers x d_model x seq
the second term being QK^T and AV at full, non-causal width, forward and backward. LLaDA 8B at
sequence 4096: 51.43 GFLOP per token. The autoregressive baseline is counted with the same full
attention term (PaLM's convention), so MDM and ARM runs compare on equal terms; kernels that
skip the causal triangle (flash) do about half that attention work, so an ARM run's figures
overstate its attention by up to 2x.

Executed FLOPs are the matmuls the step really ran, as torch's FlopCounterMode counts them
(tested against it):
- the blocks' linear layers, 6 x their weights per token (norm weights are elementwise: none);
- attention, 12 x layers x d_model x seq per token (full width for the causal baseline too, as
  FlopCounterMode counts it);
- the LM head at the positions actually scored only (the masked tokens: about half at the
  uniform t of pretraining), 6 x d_model x vocab each, or 8 x when the head runs in chunks
  (`memory.loss_chunk_tokens`), whose logits backward recomputes;
- activation checkpointing: "full" adds one more forward of the blocks up to their last
  projection (backward's recomputation stops once it has what backward needs: 2 x the other
  weights + 4 x layers x d_model x seq per token); the whole block when DeepSpeed ZeRO-3's
  memory-efficient linear has replaced `torch.nn.functional.linear` (it does so for the whole
  process once a ZeRO-3 engine or `zero.Init` exists), since the recomputation then runs to the
  block's end; "selective" adds none (it keeps matmul and attention outputs and recomputes
  elementwise ops only).
So executed < model when only the head's skipped positions differ, and usually > model under
full checkpointing (its recomputation outweighs the skipped head). MFU uses model FLOPs; the
executed figure says how busy the device was.

Peaks are dense bf16 tensor-core TFLOP/s by `torch.cuda.get_device_name()`; an unknown device
(a CPU included) has no peak, and its MFU is "unknown" unless `profile.peak_tflops` gives one.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from parallel.memory_plan import parameter_count
from parallel.model_config import ModelConfig

GFLOP = 1e9

# (device name pattern, matched as a whole and case-insensitively, label, dense bf16 TFLOP/s).
# Vendor datasheets quote these figures doubled "with sparsity" (H100 SXM 1979, PCIe 1513;
# A100 624). The H800 and H200 are H100 silicon with other interconnect and memory. Other
# variants (H100 NVL, H200 NVL, GH200, ...) are not listed: their MFU is unknown unless
# profile.peak_tflops gives the peak.
PEAK_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"(NVIDIA )?H100( 80GB)? HBM3|(NVIDIA )?H100 SXM.*", "H100 SXM", 989.0),
    (r"(NVIDIA )?H100 PCIe.*", "H100 PCIe", 756.0),
    (r"(NVIDIA )?H800( 80GB HBM3| SXM.*)?", "H800 SXM", 989.0),
    (r"(NVIDIA )?H800 PCIe.*", "H800 PCIe", 756.0),
    (r"(NVIDIA )?H200( 141GB HBM3e| SXM.*)?", "H200 SXM", 989.0),
    (r"(NVIDIA )?A100[- ].*", "A100", 312.0),
)


def device_peak(device_name: str) -> tuple[str, float] | None:
    """(label, dense bf16 TFLOP/s) of a `torch.cuda.get_device_name()` string, or None."""
    for pattern, label, tflops in PEAK_TFLOPS:
        if re.fullmatch(pattern, device_name.strip(), flags=re.IGNORECASE):
            return label, tflops
    return None


def device_name() -> str:
    """This process's accelerator as torch names it, or 'cpu'."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_tflops(name: str, override: float = 0.0) -> float | None:
    """The peak MFU divides by: the override when > 0, else the table's entry for `name`
    (None: unknown, and MFU is not computed)."""
    if override > 0:
        return override
    found = device_peak(name)
    return found[1] if found else None


def mfu(model_tflops_per_device: float, peak: float | None) -> float | None:
    return None if peak is None else model_tflops_per_device / peak


def non_embedding_parameters(config: ModelConfig) -> int:
    """Every parameter except the embedding lookup, the LM head included (tied or not)."""
    head = config.vocab_size * config.d_model
    return parameter_count(config) - head + (head if config.weight_tying else 0)


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    return 6.0 * non_embedding_parameters(config) + 12.0 * config.n_layers * config.d_model * seq_len


def _block_matmul_weights(config: ModelConfig) -> int:
    d, kv = config.d_model, config.n_kv_heads * config.head_dim
    return config.n_layers * (2 * d * d + 2 * d * kv + 3 * d * config.mlp_hidden_size)


@dataclasses.dataclass(frozen=True)
class Flops:
    model: float = 0.0
    executed: float = 0.0

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.model + other.model, self.executed + other.executed)


def zero3_linear_in_use() -> bool:
    """Whether DeepSpeed ZeRO-3's memory-efficient linear replaces torch.nn.functional.linear."""
    return getattr(torch.nn.functional.linear, "__module__", "").startswith("deepspeed")


def micro_batch_flops(config: ModelConfig, batch_size: int, seq_len: int, scored_positions: int, *,
                      activation_checkpointing: str, loss_chunk_tokens: int,
                      recompute_stops_early: bool = True) -> Flops:
    """Model and executed FLOPs of one forward and backward over a [batch_size, seq_len] batch
    whose head scored `scored_positions` positions (the module docstring has the convention;
    recompute_stops_early=False: full checkpointing reruns whole blocks, as under ZeRO-3's
    linear)."""
    tokens = batch_size * seq_len
    d, layers, vocab = config.d_model, config.n_layers, config.vocab_size
    weights = _block_matmul_weights(config)
    attention_forward = 4.0 * layers * d * seq_len  # per token
    executed = tokens * (6.0 * weights + 3 * attention_forward)
    if activation_checkpointing == "full":
        # backward's recomputation stops once every tensor backward needs exists again: each
        # block's last projection (ff_out) is not rerun, unless the linear is ZeRO-3's
        rerun = weights - (layers * config.mlp_hidden_size * d if recompute_stops_early else 0)
        executed += tokens * (2.0 * rerun + attention_forward)
    chunked = not config.weight_tying and 0 < loss_chunk_tokens < scored_positions
    executed += (8.0 if chunked else 6.0) * d * vocab * scored_positions
    return Flops(model=tokens * model_flops_per_token(config, seq_len), executed=executed)


class FlopMeter:
    """Counts the FLOPs of every training forward of a model (one with targets, recording a
    gradient): a forward pre-hook reads the batch shape and the positions scored (the loss
    mask's count), kept on the device until `take` reads them all with one sync."""

    def __init__(self, config: ModelConfig, *, activation_checkpointing: str, loss_chunk_tokens: int):
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        self.loss_chunk_tokens = loss_chunk_tokens
        self._pending: list[tuple[int, int, torch.Tensor]] = []  # (batch, seq, scored)

    def attach(self, model: torch.nn.Module) -> "FlopMeter":
        """Hook `model`, whose forward is (input_ids, targets=None, loss_mask=None, ...)."""
        model.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def _record(self, module, args, kwargs) -> None:
        named = dict(zip(("input_ids", "targets", "loss_mask"), args), **kwargs)
        targets, loss_mask = named.get("targets"), named.get("loss_mask")
        if targets is None or not torch.is_grad_enabled():
            return  # validation, sampling and other inference forwards are not training work
        b, s = named["input_ids"].shape
        scored = loss_mask.sum() if loss_mask is not None else targets.new_tensor(targets.numel())
        self._pending.append((b, s, scored))

    def take(self) -> Flops:
        """The FLOPs of the forwards recorded since the last call."""
        pending, self._pending = self._pending, []
        if not pending:
            return Flops()
        counts = torch.stack([c.to(torch.int64) for _, _, c in pending]).tolist()
        total = Flops()
        for (b, s, _), scored in zip(pending, counts):
            total += micro_batch_flops(self.config, b, s, scored,
                                       activation_checkpointing=self.activation_checkpointing,
                                       loss_chunk_tokens=self.loss_chunk_tokens,
                                       recompute_stops_early=not zero3_linear_in_use())
        return total
