"""The training model's optional attention mask, for batched inference over left-padded prompts.

Pretraining and SFT run with no mask; the sampler batches prompts of different lengths by
left-padding them and passing `attention_mask`. Each row's real tokens must then compute what
the row computes alone (logits and, through the chunked head, cross-entropy; bidirectional and
causal; with activation checkpointing), an all-ones mask must leave today's computation
untouched, and the result must equal the exported Hugging Face code's, which is the reference.
"""

import pytest
import torch

from parallel.attention import attention
from parallel.model import LLaDAModel, RotaryEmbedding
from parallel.model_config import ModelConfig
from pretrain.checkpoint.hf_modeling.configuration_llada import LLaDAConfig
from pretrain.checkpoint.hf_modeling.modeling_llada import LLaDAModelLM

SHAPE = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=96,
             vocab_size=128, max_sequence_length=64)
LENGTHS = (12, 7, 3)
PAD = 0


def _model(causal: bool = False, checkpointing: str = "none") -> LLaDAModel:
    return LLaDAModel(ModelConfig(**SHAPE, causal=causal), init_seed=0,
                      activation_checkpointing=checkpointing)


def _rows(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, SHAPE["vocab_size"] - 1, (n,), generator=g) for n in LENGTHS]


def _left_padded(rows):
    s = max(len(r) for r in rows)
    ids = torch.full((len(rows), s), PAD)
    mask = torch.zeros(len(rows), s, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, s - len(r):] = r
        mask[i, s - len(r):] = 1
    return ids, mask


def _assert_rows_alone(rows, batched, run):
    """batched [b, s, ...]: each row's real positions equal run(row [1, n]), with no mask."""
    for i, r in enumerate(rows):
        torch.testing.assert_close(batched[i, -len(r):], run(r[None])[0], atol=1e-5, rtol=0)


def _ones(t):
    return torch.ones_like(t, dtype=torch.bool)


def test_left_padded_rows_give_what_they_give_alone():
    model, rows = _model().eval(), _rows()
    ids, mask = _left_padded(rows)
    with torch.no_grad():
        masked = model(ids, attention_mask=mask)
        _assert_rows_alone(rows, masked, model)
        # negative control: without the mask the padding leaks into the padded rows
        unmasked = model(ids)
        for i, r in enumerate(rows[1:], start=1):
            assert (unmasked[i, -len(r):] - masked[i, -len(r):]).abs().max() > 1e-2


def test_all_ones_mask_is_bit_identical_to_no_mask():
    model = _model().eval()
    ids, _ = _left_padded(_rows())
    with torch.no_grad():
        for ones in (torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)):
            assert torch.equal(model(ids, attention_mask=ones), model(ids))


def test_per_row_rope_positions_are_the_cached_ones_shifted():
    rope = RotaryEmbedding(16, theta=500000.0)
    x = torch.randn(2, 5, 3, 16, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])
    out = rope.apply(x, positions)
    assert torch.equal(out[0], rope.apply(x[:1])[0])
    assert torch.equal(out[1, 2:], rope.apply(x[1:, 2:])[0])


def test_cross_entropy_path_and_checkpointed_gradients_with_a_mask():
    rows = _rows()
    ids, mask = _left_padded(rows)
    model = _model().eval()
    with torch.no_grad():
        ce = model(ids, targets=ids, loss_mask=_ones(ids), attention_mask=mask)
        _assert_rows_alone(rows, ce, lambda r: model(r, targets=r, loss_mask=_ones(r)))

    def grads(checkpointing):
        m = _model(checkpointing=checkpointing)
        loss = (m(ids, targets=ids, loss_mask=_ones(ids), attention_mask=mask) * mask).sum()
        loss.backward()
        return {n: p.grad for n, p in m.named_parameters()}

    plain = grads("none")
    assert all(g is not None and torch.isfinite(g).all() for g in plain.values())
    for checkpointing in ("full", "selective"):
        for name, g in grads(checkpointing).items():
            torch.testing.assert_close(g, plain[name], atol=1e-6, rtol=0, msg=name)


def test_causal_baseline_left_padded_rows_give_what_they_give_alone():
    model, rows = _model(causal=True).eval(), _rows(seed=1)
    ids, mask = _left_padded(rows)
    with torch.no_grad():
        masked = model(ids, attention_mask=mask)
    assert torch.isfinite(masked).all()  # the leading pads see themselves, not nothing
    with torch.no_grad():
        _assert_rows_alone(rows, masked, model)


def test_equals_the_exported_hugging_face_code_on_a_masked_batch():
    model = _model().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norm weights off one, so a misplaced weight multiply shows
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    hf = LLaDAModelLM(LLaDAConfig(
        **SHAPE, embedding_size=SHAPE["vocab_size"], rope_theta=500000.0, rms_norm_eps=1e-5,
        weight_tying=False, mask_token_id=127, eos_token_id=1, pad_token_id=1)).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    ids, mask = _left_padded(_rows())
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask),
                                   hf(ids, attention_mask=mask).logits, atol=1e-5, rtol=0)


def test_bad_masks_are_refused():
    model = _model().eval()
    ids, mask = _left_padded(_rows())
    with pytest.raises(ValueError, match=r"\[3, 12\].*\[3, 11\]"):
        model(ids, attention_mask=mask[:, 1:])
    mask[1] = 0
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] have no real token"):
        model(ids, attention_mask=mask)


def test_flash_backend_refuses_a_key_mask():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="flash-attn takes no padding mask"):
        attention(q, q, q, causal=False, backend="flash", key_mask=_ones(q[..., 0, 0]))
