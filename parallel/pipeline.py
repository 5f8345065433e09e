"""Pipeline parallelism: the LLaDA model as DeepSpeed PipelineModule stages, from its own pieces.

For a model (or a sequence length) whose layers outgrow one rank even under ZeRO, the blocks are
split over pipeline stages and trained by DeepSpeed's PipelineEngine (ZeRO stage 0 or 1 only),
with megatron-core tensor parallelism inside each stage. There is no second model definition:
the stages hold the token embedding, `LLaDABlock`s, final norm and chunked LM head that
`parallel.model` builds, through the same construction functions and in the same order, so a
seed gives the weights of the whole model. The layer list is

    [embedding] + [block 0 .. block n-1] + [final norm (its forward) and head]

with the blocks balanced over the stages (`parallel.topology.stage_blocks`); the head runs in
the pipeline's loss, where the labels are: (targets, loss mask, objective-specific tensors such
as p_mask). The loss itself comes from the caller (`loss_from_ce(per-token CE, labels)`), so
this module knows no objective.

Stage boundaries carry the full hidden state [b, l, d]: a boundary lies between blocks, after a
row-parallel layer's all-reduce, never inside a tensor-parallel region. DeepSpeed's default
`pipe_partitioned`/`grad_partitioned` would split those activations over the TP group with
shapes cached from the first micro-batch; the engine config switches them off
(`parallel.engine_config`) and the module runs with `dynamic_shape=True`, so a micro-batch cut
short by the 1% rule crosses the boundary at its own length instead of being padded back.

Importing this module imports DeepSpeed (after `parallel.engine` prepared the process for it).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from parallel.engine import import_deepspeed
from parallel.fused_ops import pointwise_ops
from parallel.fused_projections import ModelParameter, model_parameters, released_shapes, whole_released_tensors
from parallel.layers import DenseLayers
from parallel.memory_plan import CHECKPOINTING
from parallel.model import (
    LLaDABlock,
    RotaryEmbedding,
    at_positions,
    final_norm,
    lm_head,
    run_block,
    token_embedding,
    use_pointwise,
    weight_init,
)
from parallel.model_config import ModelConfig
from parallel.topology import coordinates, rank_of, stage_blocks

import_deepspeed()
from deepspeed.pipe import LayerSpec, PipelineModule  # noqa: E402
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, ProcessTopology  # noqa: E402

# per-token cross-entropy [b, l] and the micro-batch's labels -> the scalar loss
LossFromCE = Callable[[torch.Tensor, tuple], torch.Tensor]


class _Pieces:
    """The model's pieces in its construction order (position 0 the embedding, 1..n the blocks,
    n + 1 the final norm and head), built by `parallel.model`'s functions. A rank builds only its
    own stage's pieces, in order; with seeded weights the pieces before them are drawn and
    dropped first, so the generator reaches each piece in the state the whole model's
    construction would (as tensor-parallel ranks draw whole weights and keep a slice)."""

    def __init__(self, config: ModelConfig, layers: DenseLayers, attention_backend: str,
                 init_seed: int | None, activation_checkpointing: str, loss_chunk_tokens: int,
                 fuse_projections: bool):
        self.config, self.layers = config, layers
        self.fuse_projections = fuse_projections
        self.attention_backend = attention_backend
        self.activation_checkpointing = activation_checkpointing
        self.loss_chunk_tokens = loss_chunk_tokens
        self.init = weight_init(config, init_seed)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta)
        self._next = 0

    def build(self, position: int):
        if position < self._next:
            raise RuntimeError(f"pipeline piece {position} built after piece {self._next - 1}: "
                               f"pieces must be built in model order")
        while self.init is not None and self._next < position:
            self._make(self._next)  # drawn and dropped: advances the generator
            self._next += 1
        self._next = position + 1
        return self._make(position)

    def _make(self, position: int):
        c = self.config
        if position == 0:
            return token_embedding(c, self.layers, self.init)
        if position <= c.n_layers:
            return LLaDABlock(c, self.layers, self.rope, self.attention_backend, position - 1, self.init,
                              self.fuse_projections)
        return final_norm(c), lm_head(c, self.layers, self.init, self.loss_chunk_tokens)


class EmbeddingStage(nn.Module):
    """Token ids -> embeddings (the first stage's first layer)."""

    def __init__(self, pieces: _Pieces):
        super().__init__()
        self.wte = pieces.build(0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def whole_model_parameters(self) -> Iterator[ModelParameter]:
        return model_parameters(self, "model.transformer")


class BlockStage(nn.Module):
    """One transformer block, under the model's activation checkpointing."""

    def __init__(self, pieces: _Pieces, index: int):
        super().__init__()
        self.index = index
        self.activation_checkpointing = pieces.activation_checkpointing
        self.block = pieces.build(1 + index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_block(self.block, x, None, None, self.activation_checkpointing)

    def whole_model_parameters(self) -> Iterator[ModelParameter]:
        return model_parameters(self.block, f"model.transformer.blocks.{self.index}")


class HeadStage(nn.Module):
    """The last layer: its forward is the final norm; the head runs in the pipeline's loss,
    which has the targets (chunked, vocabulary-parallel cross-entropy: no logits gathered)."""

    def __init__(self, pieces: _Pieces):
        super().__init__()
        self.ln_f, self.ff_out = pieces.build(pieces.config.n_layers + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)

    def whole_model_parameters(self) -> Iterator[ModelParameter]:
        return model_parameters(self, "model.transformer")


class LLaDAPipeline(PipelineModule):
    """This rank's stage of the LLaDA model, for `deepspeed.initialize` (which then returns a
    PipelineEngine: train with `train_step`, evaluate and sample through `PipelineForward`).

    layers: the layer factory (`DenseLayers`, or `TensorParallelLayers` after
    `parallel.tensor_parallel.initialize_groups(tp, pp)`). loss_from_ce: the objective at the
    last stage. The other arguments are `LLaDAModel`'s (pointwise and fuse_projections: the
    fast path's switches). topology: DeepSpeed's process topology, by default (pipe, data,
    model) from the sizes, the rank order of megatron-core and `parallel.topology`; DeepSpeed
    takes its data-parallel groups from it (a topology without the model axis would average
    tensor-parallel shards as if they were replicas). After a step, `max_logit` holds the
    largest logit the head scored on this rank (-inf off the last stage).
    """

    def __init__(self, config: ModelConfig, layers: DenseLayers | None = None, *,
                 pipeline_parallel: int, loss_from_ce: LossFromCE, attention_backend: str = "auto",
                 init_seed: int | None = 0, activation_checkpointing: str = "none",
                 loss_chunk_tokens: int = 0, pointwise: str = "eager", fuse_projections: bool = False,
                 topology: ProcessTopology | None = None):
        problems = config.problems()
        if config.weight_tying:
            problems.append("model.weight_tying: a pipeline keeps the embedding and the head on "
                            "different stages; tied weights are not supported")
        if activation_checkpointing not in CHECKPOINTING:
            problems.append(f"activation_checkpointing: {activation_checkpointing!r} is not one of "
                            f"{', '.join(CHECKPOINTING)}")
        if problems:
            raise ValueError("; ".join(problems))
        layers = layers or DenseLayers()
        tp, pp = layers.tp_size, pipeline_parallel
        world = torch.distributed.get_world_size()
        grid = coordinates(torch.distributed.get_rank(), world, tp, pp)
        plan = stage_blocks(config.n_layers, pp)
        pieces = _Pieces(config, layers, attention_backend, init_seed, activation_checkpointing,
                         loss_chunk_tokens, fuse_projections)
        specs = [LayerSpec(EmbeddingStage, pieces),
                 *(LayerSpec(BlockStage, pieces, i) for i in range(config.n_layers)),
                 LayerSpec(HeadStage, pieces)]
        super().__init__(
            layers=specs, loss_fn=self._loss, partition_method=f"type:{BlockStage.__name__}",
            topology=topology or PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=grid.dp_size),
            activation_checkpoint_interval=0, dynamic_shape=True)
        # layer index of each stage's first layer: the embedding is layer 0, block i layer i + 1
        expected = [0] + [1 + blocks[0] for blocks in plan[1:]] + [config.n_layers + 2]
        if [int(p) for p in self.parts] != expected:
            raise RuntimeError(f"DeepSpeed split the layers at {self.parts}, the plan says {expected}")
        self.config = config
        self.gather_vocab = layers.gather_vocab
        self.tp_size, self.pp_size, self.dp_size = tp, pp, grid.dp_size
        self.loss_from_ce = loss_from_ce
        self.max_logit = torch.tensor(float("-inf"))
        use_pointwise(self, pointwise_ops(pointwise))

    def _loss(self, hidden: torch.Tensor, labels: tuple) -> torch.Tensor:
        head = self.forward_funcs[-1].ff_out
        ce = head(hidden, targets=labels[0], loss_mask=labels[1])
        self.max_logit = torch.maximum(self.max_logit, head.max_logit.detach().cpu())
        return self.loss_from_ce(ce, labels)

    def whole_model_parameters(self) -> Iterator[ModelParameter]:
        """This stage's parameters under their whole-model names (a TP shard under TP)."""
        for layer in self.forward_funcs:
            yield from layer.whole_model_parameters()

    def whole_state_dict(self, value_of: Callable[[ModelParameter], torch.Tensor] | None = None
                         ) -> dict[str, torch.Tensor] | None:
        """Every parameter whole under its released name, on global rank 0's CPU (None on other
        ranks): within each stage the tensor-parallel shards are concatenated (fused projections
        split into their released tensors), and the stage's first rank sends its tensors to
        rank 0, one at a time. A collective over the first data-parallel replica (every rank
        calls it). value_of: as `parallel.engine.full_state_dict`'s (an fp32 optimizer state);
        every data-parallel rank computes it, as it may be a collective over that group."""
        dist = torch.distributed
        rank = dist.get_rank()
        here = coordinates(rank, dist.get_world_size(), self.tp_size, self.pp_size)
        out: dict[str, torch.Tensor] | None = {} if rank == 0 else None
        if here.dp_rank != 0 and value_of is None:
            return out
        for stage in range(self.pp_size):
            src = rank_of(0, 0, stage, self.tp_size, self.dp_size)
            if here.pp_rank == stage:
                self._send_stage(rank, src, out, value_of, sends=here.dp_rank == 0)
            elif rank == 0:
                meta = [None]
                dist.recv_object_list(meta, src=src)
                for name, shape, dtype in meta[0]:
                    tensor = torch.empty(shape, dtype=dtype)
                    dist.recv(tensor, src=src)
                    out[name] = tensor
        return out

    def _send_stage(self, rank: int, src: int, out: dict | None,
                    value_of: Callable[[ModelParameter], torch.Tensor] | None, sends: bool) -> None:
        dist = torch.distributed
        params = list(self.whole_model_parameters())
        if rank == src and src != 0:
            meta = [(released, shape, torch.float32 if value_of else p.param.dtype) for p in params
                    for released, shape in released_shapes(p, self.tp_size)]
            dist.send_object_list([meta], dst=0)
        for p in params:
            value = value_of(p) if value_of is not None else None
            if not sends:
                continue
            for released, whole in whole_released_tensors(p, value):
                if rank == 0:
                    out[released] = whole.cpu().clone()
                elif rank == src:
                    dist.send(whole.cpu().contiguous(), dst=0)


class PipelineForward:
    """The whole model's forward over a pipeline, called alike on every rank, for validation
    and sampling: as `LLaDAModel.forward`, logits [b, s, vocab] in the model's dtype (vocabulary gathered), or
    with targets the per-token cross-entropy [b, s] through the chunked head, returned on every
    rank. Each stage runs its layers on what the previous stage sends (the full hidden state)
    and the last stage broadcasts the result over the pipeline group. `logits_positions` as in
    `LLaDAModel.forward`: the head runs at those positions only. No gradients; no padding mask
    and no KV cache (the stages run the blocks unmasked)."""

    def __init__(self, module: LLaDAPipeline):
        self.module = module

    def eval(self) -> "PipelineForward":
        self.module.eval()
        return self

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                 loss_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 logits_positions: slice | torch.Tensor | None = None, **unsupported) -> torch.Tensor:
        if targets is not None and logits_positions is not None:
            raise ValueError("logits_positions selects logits: with targets the loss covers every position")
        if unsupported or (attention_mask is not None and not bool(attention_mask.bool().all())):
            raise ValueError(f"a pipeline's forward takes unpadded ids and no KV cache (got "
                             f"{sorted(unsupported) or 'a padding attention_mask'}); load the "
                             f"checkpoint's whole weights for that (pretrain.inference.loading)")
        dist, module, grid = torch.distributed, self.module, self.module._grid
        stage, last = grid.get_stage_id(), module.num_stages - 1
        b, s = input_ids.shape
        # checked and counted alike on every stage (a last stage's error would leave others waiting)
        kept = at_positions(torch.arange(s, device=input_ids.device)[None], logits_positions).shape[1]
        x = input_ids
        if stage > 0:
            x = torch.empty(b, s, module.config.d_model, device=input_ids.device,
                            dtype=next(module.parameters()).dtype)
            dist.recv(x, src=grid.stage_to_global(stage - 1))
        x = module(x)
        if stage < last:
            dist.send(x.contiguous(), dst=grid.stage_to_global(stage + 1))
            out = torch.empty((b, s) if targets is not None else (b, kept, module.config.vocab_size),
                              dtype=torch.float32 if targets is not None else x.dtype, device=input_ids.device)
        else:
            head = module.forward_funcs[-1].ff_out
            out = (head(x, targets=targets, loss_mask=loss_mask) if targets is not None
                   else module.gather_vocab(head(at_positions(x, logits_positions)))).contiguous()
        dist.broadcast(out, src=grid.stage_to_global(last), group=grid.get_pipe_parallel_group())
        return out


def train_step(engine, micro_batches: list[tuple[torch.Tensor, tuple]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of a PipelineEngine over this replica's micro-batches, each (input
    ids, labels); every stage gets the same list. Returns (the replica's mean micro-batch loss,
    the largest logit this rank's head scored: -inf off the last stage), on every stage.

    The engine scales each micro-batch's loss by 1 / gradient accumulation before its backward,
    as the plain engine does, and averages the losses it reports."""
    engine.module.max_logit = torch.tensor(float("-inf"))
    engine.train_batch(iter(micro_batches))
    return engine.dp_group_loss.detach().cpu(), engine.module.max_logit
