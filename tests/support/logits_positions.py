"""What the multi-rank workers measure of `logits_positions` (the head at selected positions only),
so the tensor-parallel and pipeline scenarios check it in the processes they already launch."""


def positions_diffs(picked_logits, block_logits, whole, picked) -> dict:
    """`logits_positions` against the whole logits: at a 1-D index tensor, at slice(4, 8), and
    (control) slice(4, 8) against positions 5..8."""
    return {"positions_picked": (picked_logits - whole[:, picked]).abs().max().item(),
            "positions_block": (block_logits - whole[:, 4:8]).abs().max().item(),
            "control_positions": (block_logits - whole[:, 5:9]).abs().max().item()}
