"""The LLaDA transformer against an independent reference written from DESIGN.md section 1.

The model module is the one piece every other part (training, sampling, export to and import
from the released checkpoints) trusts, and its mistakes are silent: an interleaved RoPE, a
`repeat` instead of `repeat_interleave` for grouped-query heads, RMSNorm's weight applied before
the cast, a stray causal mask or a wrong init all still train. So this file recomputes the
forward pass in plain torch from the released format (reading weights by their checkpoint
names), pins the RoPE pairing and the bf16 RMSNorm order on inputs that tell the alternatives
apart, checks the 8B/1B presets against the released tensor list and the paper's parameter
totals, bidirectionality versus the causal AR baseline, the `mitchell` init, which parameters
skip weight decay, and that the model plus the Algorithm 1 loss can overfit a tiny batch.
Logits at selected positions (`logits_positions`, the sampler's current block) equal the whole
logits there, with and without a padding mask and a KV cache (TP=2 and PP=2: test_parallel.py and
test_pipeline.py); control: other positions' logits differ.
"""

import dataclasses
import math

import pytest
import torch

from parallel.attention import KVCache
from parallel.model import LLaDAModel, RMSNorm, RotaryEmbedding, no_weight_decay
from parallel.model_config import ModelConfig, preset
from pretrain.diffusion.objectives import forward_process, pretrain_loss

P = "model.transformer."


def _small_config(**kw) -> ModelConfig:
    # GQA with 2 query heads per KV head; a non-default theta so a hard-coded one shows.
    base = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                vocab_size=50, max_sequence_length=16, rope_theta=10000.0)
    base.update(kw)
    return ModelConfig(**base)


def _randomise_norms(model: LLaDAModel, seed: int = 0) -> None:
    """Norm weights start at ones, which would hide a wrongly placed weight multiply."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------
# The reference forward, written from DESIGN.md section 1 without the model's helpers.
# ---------------------------------------------------------------------------------------------
def _ref_rms_norm(x, w, eps):
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * w


def _ref_rope(x, theta):
    """x: [b, h, s, hd]. NeoX half-split: dim i rotates with dim i + hd/2; angles in fp32."""
    s, hd = x.shape[-2], x.shape[-1]
    half = hd // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))  # [half]
    ang = torch.arange(s, dtype=torch.float32)[:, None] * inv_freq[None, :]        # [s, half]
    cos, sin = ang.cos(), ang.sin()
    x32 = x.float()
    a, b = x32[..., :half], x32[..., half:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)


def _reference_logits(sd, cfg: ModelConfig, ids: torch.Tensor, causal: bool = False):
    b, s = ids.shape
    d, H, KV = cfg.d_model, cfg.n_heads, cfg.n_kv_heads
    hd = d // H
    eps = cfg.rms_norm_eps
    x = sd[P + "wte.weight"][ids]
    for i in range(cfg.n_layers):
        w = {k: sd[f"{P}blocks.{i}.{k}.weight"] for k in
             ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj",
              "up_proj", "ff_out")}
        h = _ref_rms_norm(x, w["attn_norm"], eps)
        q = (h @ w["q_proj"].T).view(b, s, H, hd).transpose(1, 2)
        k = (h @ w["k_proj"].T).view(b, s, KV, hd).transpose(1, 2)
        v = (h @ w["v_proj"].T).view(b, s, KV, hd).transpose(1, 2)
        q, k = _ref_rope(q, cfg.rope_theta), _ref_rope(k, cfg.rope_theta)
        k = k.repeat_interleave(H // KV, dim=1)  # KV head j serves query heads j*g .. j*g+g-1
        v = v.repeat_interleave(H // KV, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)  # [b, H, s, s]
        if causal:
            future = torch.ones(s, s, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = torch.exp(scores - scores.amax(-1, keepdim=True))
        probs = probs / probs.sum(-1, keepdim=True)
        a = (probs @ v).transpose(1, 2).reshape(b, s, d)
        x = x + a @ w["attn_out"].T
        h = _ref_rms_norm(x, w["ff_norm"], eps)
        gate = h @ w["ff_proj"].T
        x = x + ((gate * torch.sigmoid(gate)) * (h @ w["up_proj"].T)) @ w["ff_out"].T
    x = _ref_rms_norm(x, sd[P + "ln_f.weight"], eps)
    head = sd[P + "wte.weight"] if cfg.weight_tying else sd[P + "ff_out.weight"]
    return (x @ head.T).float()


def _ids(b, s, vocab, seed=0):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_forward_equals_independent_reference_gqa(backend):
    torch.manual_seed(0)
    cfg = _small_config()
    model = LLaDAModel(cfg, attention_backend=backend).eval()
    _randomise_norms(model)
    ids = _ids(3, 11, cfg.vocab_size)
    with torch.no_grad():
        got = model(ids)
        ref = _reference_logits(model.state_dict(), cfg, ids)
    assert got.dtype == torch.float32 and got.shape == (3, 11, cfg.vocab_size)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_reference_is_sensitive_to_gqa_order_and_rope_style():
    """Guard for the test above: the alternatives a buggy model might use give other logits."""
    torch.manual_seed(0)
    cfg = _small_config()
    model = LLaDAModel(cfg).eval()
    ids = _ids(2, 9, cfg.vocab_size)
    sd = model.state_dict()
    with torch.no_grad():
        got = model(ids)
        # theta 500000 instead of the config's 10000
        other = _reference_logits(sd, dataclasses.replace(cfg, rope_theta=500000.0), ids)
        assert (got - other).abs().max() > 1e-3
        # causal mask where there should be none
        assert (got - _reference_logits(sd, cfg, ids, causal=True)).abs().max() > 1e-3


def test_forward_equals_reference_with_tied_weights():
    torch.manual_seed(1)
    cfg = _small_config(weight_tying=True)
    model = LLaDAModel(cfg).eval()
    _randomise_norms(model, seed=1)
    sd = model.state_dict()
    assert P + "ff_out.weight" not in sd
    ids = _ids(2, 8, cfg.vocab_size, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), _reference_logits(sd, cfg, ids), atol=1e-5, rtol=1e-5)


def test_causal_baseline_equals_reference_with_causal_mask():
    torch.manual_seed(2)
    cfg = _small_config(causal=True)
    model = LLaDAModel(cfg).eval()
    _randomise_norms(model, seed=2)
    ids = _ids(2, 10, cfg.vocab_size, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), _reference_logits(model.state_dict(), cfg, ids, causal=True),
                                   atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# RoPE and RMSNorm details.
# ---------------------------------------------------------------------------------------------
def test_rope_pairs_dim_i_with_i_plus_half():
    hd = 8
    rope = RotaryEmbedding(hd, theta=10000.0)
    x = torch.zeros(1, 3, 1, hd)
    x[..., 0] = 1.0
    out = rope.apply(x)[0, :, 0]  # [s, hd]
    # dim 0 has frequency theta^0 = 1: position p gives (cos p) e_0 + (sin p) e_4
    nonzero = (out.abs() > 1e-7)
    assert nonzero[0].tolist() == [True] + [False] * 7  # position 0: unrotated
    for p in (1, 2):
        assert nonzero[p].tolist() == [True, False, False, False, True, False, False, False]
    assert out[1, 0].item() == pytest.approx(0.5403023058681398, abs=1e-6)   # cos 1
    assert out[1, 4].item() == pytest.approx(0.8414709848078965, abs=1e-6)   # sin 1
    assert out[2, 0].item() == pytest.approx(-0.4161468365471424, abs=1e-6)  # cos 2
    assert out[2, 4].item() == pytest.approx(0.9092974268256817, abs=1e-6)   # sin 2
    # dim 1 pairs with dim 5 at frequency 10000^(-2/8) = 0.1: position 1 -> (cos 0.1, sin 0.1)
    y = torch.zeros(1, 2, 1, hd)
    y[..., 1] = 1.0
    out = rope.apply(y)[0, 1, 0]
    assert [i for i in range(hd) if abs(out[i]) > 1e-7] == [1, 5]
    assert out[1].item() == pytest.approx(0.9950041652780258, abs=1e-6)
    assert out[5].item() == pytest.approx(0.09983341664682815, abs=1e-6)
    # the second half rotates back into the first: e_4 at position 1 -> -sin 1 e_0 + cos 1 e_4
    z = torch.zeros(1, 2, 1, hd)
    z[..., 4] = 1.0
    out = rope.apply(z)[0, 1, 0]
    assert out[0].item() == pytest.approx(-0.8414709848078965, abs=1e-6)
    assert out[4].item() == pytest.approx(0.5403023058681398, abs=1e-6)


def test_rope_angles_are_fp32_for_bf16_inputs():
    hd, s = 16, 4096
    rope = RotaryEmbedding(hd, theta=500000.0)
    x = torch.randn(1, s, 2, hd, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = rope.apply(x)
    assert out.dtype == torch.bfloat16
    ref = _ref_rope(x.transpose(1, 2), 500000.0).transpose(1, 2)  # fp32 angles, cast at the end
    # bf16 angles would be off by up to 8 radians at position 4000; fp32 ones by < 1 bf16 ulp.
    assert (out.float() - ref.float()).abs().max().item() < 0.05


def test_bf16_rmsnorm_casts_before_the_weight_multiply():
    d, eps = 64, 1e-5
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, d, generator=g) * 3).to(torch.bfloat16)
    w = (0.5 + torch.rand(d, generator=g)).to(torch.bfloat16)
    y32 = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    cast_then_weight = y32.to(torch.bfloat16) * w              # DESIGN.md's order
    weight_then_cast = (y32 * w.float()).to(torch.bfloat16)    # the other order
    assert not torch.equal(cast_then_weight, weight_then_cast)  # the input tells them apart
    norm = RMSNorm(d, eps).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(w)
    got = norm(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, cast_then_weight)


def test_rmsnorm_default_eps_and_fp32_value():
    assert ModelConfig().rms_norm_eps == 1e-5
    x = torch.tensor([[3.0, 4.0]])  # mean square 12.5
    norm = RMSNorm(2, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, 1.0]))
    # [3, 4] / sqrt(12.5 + 1e-5) * [2, 1] = [1.6970556, 1.1313704]
    assert norm(x)[0].tolist() == pytest.approx([1.6970556, 1.1313704], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# The released format and sizes.
# ---------------------------------------------------------------------------------------------
def _released_8b_shapes():
    """LLaDA-8B's checkpoint tensors, from the released format (d 4096, 32 heads, 32 KV heads,
    FFN 12288, vocab 126464, 32 blocks, untied head)."""
    D, heads, kv_heads, ffn, vocab, n_blocks = 4096, 32, 32, 12288, 126464, 32
    kv = kv_heads * (D // heads)
    shapes = {P + "wte.weight": (vocab, D), P + "ln_f.weight": (D,), P + "ff_out.weight": (vocab, D)}
    for i in range(n_blocks):
        b = f"{P}blocks.{i}."
        shapes.update({
            b + "attn_norm.weight": (D,), b + "q_proj.weight": (D, D),
            b + "k_proj.weight": (kv, D), b + "v_proj.weight": (kv, D),
            b + "attn_out.weight": (D, D), b + "ff_norm.weight": (D,),
            b + "ff_proj.weight": (ffn, D), b + "up_proj.weight": (ffn, D),
            b + "ff_out.weight": (D, ffn),
        })
    return shapes


def _meta_model(name):
    with torch.device("meta"):
        return LLaDAModel(preset(name), init_seed=None)


def test_8b_preset_has_the_released_tensor_names_and_shapes():
    expected = _released_8b_shapes()
    assert len(expected) == 291
    model = _meta_model("llada_8b")
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert params == expected
    state = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert state == expected  # no buffers, no _extra_state, no extra names


def test_parameter_totals_match_the_paper():
    def totals(name):
        model = _meta_model(name)
        total = sum(p.numel() for p in model.parameters())
        blocks = sum(p.numel() for n, p in model.named_parameters() if ".blocks." in n)
        return round(total / 1e9, 2), round(blocks / 1e9, 2)

    assert totals("llada_8b") == (8.02, 6.98)
    assert totals("llada_1b") == (1.49, 0.97)


def test_presets_follow_table_5_and_section_1():
    c8, c1 = preset("llada_8b"), preset("llada_1b")
    assert (c8.n_layers, c8.d_model, c8.n_heads, c8.n_kv_heads, c8.mlp_hidden_size, c8.vocab_size) \
        == (32, 4096, 32, 32, 12288, 126464)
    assert (c1.n_layers, c1.d_model, c1.n_heads, c1.n_kv_heads, c1.mlp_hidden_size, c1.vocab_size) \
        == (22, 2048, 32, 4, 5634, 126464)
    for c in (c8, c1):
        assert c.rope_theta == 500000.0 and c.rms_norm_eps == 1e-5
        assert not c.weight_tying and not c.causal
    a7 = preset("arm_7b")
    assert (a7.n_layers, a7.d_model, a7.n_heads, a7.n_kv_heads, a7.mlp_hidden_size, a7.causal) \
        == (28, 4096, 32, 8, 13440, True)
    a1 = preset("arm_1b")
    assert (a1.n_layers, a1.d_model, a1.n_heads, a1.n_kv_heads, a1.mlp_hidden_size, a1.causal) \
        == (22, 2048, 32, 4, 5634, True)


def test_model_has_no_biases():
    model = LLaDAModel(_small_config())
    assert all(p.ndim == 2 or "norm" in n or "ln_f" in n for n, p in model.named_parameters())
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters())


# ---------------------------------------------------------------------------------------------
# Attention direction.
# ---------------------------------------------------------------------------------------------
def test_mdm_is_bidirectional():
    torch.manual_seed(3)
    cfg = _small_config()
    model = LLaDAModel(cfg).eval()
    ids = _ids(1, 12, cfg.vocab_size, seed=3)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert (a[0, 0] - b[0, 0]).abs().max().item() > 1e-4


def test_causal_baseline_ignores_the_future_but_not_the_past():
    torch.manual_seed(3)
    cfg = _small_config(causal=True)
    model = LLaDAModel(cfg).eval()
    ids = _ids(1, 12, cfg.vocab_size, seed=3)
    last = ids.clone()
    last[0, -1] = (ids[0, -1] + 1) % cfg.vocab_size
    first = ids.clone()
    first[0, 0] = (ids[0, 0] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b, c = model(ids), model(last), model(first)
    torch.testing.assert_close(a[0, :-1], b[0, :-1], atol=1e-6, rtol=0)
    assert (a[0, -1] - c[0, -1]).abs().max().item() > 1e-4


# ---------------------------------------------------------------------------------------------
# Init and weight decay.
# ---------------------------------------------------------------------------------------------
# A normal cut at +-3 std keeps sqrt(1 - 6 phi(3) / (2 Phi(3) - 1)) = 0.98658 of its std.
TRUNC3 = 0.9865783925581086


def _check_trunc_normal(w, std):
    w = w.detach().double()
    assert w.mean().abs().item() < 0.05 * std
    assert w.std().item() == pytest.approx(std * TRUNC3, rel=0.03)
    assert w.abs().max().item() <= 3 * std * (1 + 1e-6)
    assert w.abs().max().item() > 2.5 * std  # a real tail, not a narrower cut


def test_mitchell_init():
    torch.manual_seed(4)
    d, hidden = 256, 512
    cfg = ModelConfig(d_model=d, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden_size=hidden,
                      vocab_size=512, max_sequence_length=16)
    model = LLaDAModel(cfg)
    t = model.model.transformer
    for i, blk in enumerate(t.blocks):
        for lin in (blk.q_proj, blk.k_proj, blk.v_proj, blk.ff_proj, blk.up_proj):
            _check_trunc_normal(lin.weight, 1 / math.sqrt(d))
        # output projections: / sqrt(2 (i + 1))
        _check_trunc_normal(blk.attn_out.weight, 1 / math.sqrt(d) / math.sqrt(2 * (i + 1)))
        _check_trunc_normal(blk.ff_out.weight, 1 / math.sqrt(hidden) / math.sqrt(2 * (i + 1)))
        assert torch.equal(blk.attn_norm.weight, torch.ones(d))
        assert torch.equal(blk.ff_norm.weight, torch.ones(d))
    # literal spot values: block 2's attn_out std 1/16/sqrt(6) = 0.0255155, ff_out
    # 1/sqrt(512)/sqrt(6) = 0.0180422 (times 0.98658 for the cut)
    assert t.blocks[2].attn_out.weight.std().item() == pytest.approx(0.0255155 * TRUNC3, rel=0.03)
    assert t.blocks[2].ff_out.weight.std().item() == pytest.approx(0.0180422 * TRUNC3, rel=0.03)
    assert t.blocks[0].q_proj.weight.std().item() == pytest.approx(0.0625 * TRUNC3, rel=0.03)
    _check_trunc_normal(t.ff_out.weight, 1 / math.sqrt(d))
    assert torch.equal(t.ln_f.weight, torch.ones(d))


def test_no_weight_decay_only_for_norm_weights():
    model = LLaDAModel(_small_config(n_layers=3))
    decisions = {n: no_weight_decay(n, p) for n, p in model.named_parameters()}
    exempt = sorted(n for n, v in decisions.items() if v)
    assert exempt == sorted([P + "ln_f.weight"] + [f"{P}blocks.{i}.{k}.weight"
                                                   for i in range(3) for k in ("attn_norm", "ff_norm")])
    assert not decisions[P + "wte.weight"]
    assert not decisions[P + "ff_out.weight"]
    assert not decisions[P + "blocks.0.ff_out.weight"]
    assert not decisions[P + "blocks.2.attn_out.weight"]


def test_config_problems_report_heads_not_dividing_d_model():
    cfg = ModelConfig(d_model=30, n_heads=4, n_kv_heads=2)
    problems = cfg.problems()
    assert any("n_heads" in p and "d_model" in p for p in problems)
    with pytest.raises(ValueError, match="n_heads"):
        LLaDAModel(cfg)
    assert _small_config().problems() == []
    assert any("n_kv_heads" in p for p in ModelConfig(n_heads=4, n_kv_heads=3).problems())


# ---------------------------------------------------------------------------------------------
# The model and the Algorithm 1 loss learn.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """Tiny matmuls run fastest on one thread, and far slower when two threads fight other
    processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_overfits_a_tiny_batch_with_algorithm_1(one_thread):
    torch.manual_seed(0)
    vocab, mask_id, steps = 32, 31, 1000
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=128,
                      vocab_size=vocab, max_sequence_length=16)
    model = LLaDAModel(cfg)
    # 4 rows x 16 tokens from 0..30 (31 is the mask row), the 4 rows distinct at every
    # position, so any one visible token tells which row is being denoised.
    g = torch.Generator().manual_seed(10)
    batch = torch.stack([torch.randperm(vocab - 1, generator=g)[:4] for _ in range(16)], dim=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)

    # A fixed evaluation noising: t = 0.2, 0.4, 0.6, 0.8 with a fixed mask.
    eval_nb = forward_process(batch, mask_id, t=torch.tensor([0.2, 0.4, 0.6, 0.8]),
                              generator=torch.Generator().manual_seed(99))
    assert (~eval_nb.masked).any(dim=1).all() and eval_nb.masked.any(dim=1).all()

    def eval_loss():
        with torch.no_grad():
            return pretrain_loss(model(eval_nb.noisy), batch, eval_nb).item()

    first = eval_loss()
    gen = torch.Generator().manual_seed(1234)  # a fresh t and mask every step
    for _ in range(steps):
        nb = forward_process(batch, mask_id, generator=gen)
        loss = pretrain_loss(model(nb.noisy), batch, nb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # 1/p_mask spikes when t ~ 0
        opt.step()
        sched.step()
    last = eval_loss()
    assert first > 2.0  # about ln 32 = 3.47 weighted, before training
    assert last < 0.1 * first, (first, last)
    # With half the tokens visible the model fills in the masked ones of every row.
    half = forward_process(batch, mask_id, t=torch.full((4,), 0.5),
                           generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        pred = model(half.noisy).argmax(-1)
    acc = (pred[half.masked] == batch[half.masked]).float().mean().item()
    assert acc > 0.9, acc


# ---------------------------------------------------------------------------------------------
# Logits at selected positions.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_tying", [False, True])
def test_logits_at_positions_equal_the_whole_logits_there(weight_tying):
    cfg = _small_config(weight_tying=weight_tying)
    model = LLaDAModel(cfg, init_seed=4).eval()
    _randomise_norms(model, seed=4)
    ids = _ids(2, 16, cfg.vocab_size, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    picked = torch.tensor([12, 0, 7, 12])  # unsorted, repeated
    with torch.no_grad():
        for attention_mask in (None, mask):
            whole = model(ids, attention_mask=attention_mask)
            at = model(ids, attention_mask=attention_mask, logits_positions=picked)
            assert at.shape == (2, 4, cfg.vocab_size) and at.dtype == torch.float32
            torch.testing.assert_close(at, whole[:, picked], atol=1e-6, rtol=0)
            block = model(ids, attention_mask=attention_mask, logits_positions=slice(8, 12))
            torch.testing.assert_close(block, whole[:, 8:12], atol=1e-6, rtol=0)
            assert (block - whole[:, 7:11]).abs().max().item() > 1e-2  # control: other positions


def test_logits_at_positions_with_the_kv_cache():
    """Filling a cache with selected logits fills it whole; a window's selected logits count
    from the window's start and equal its whole logits there."""
    cfg = _small_config()
    model = LLaDAModel(cfg, init_seed=5).eval()
    ids = _ids(2, 16, cfg.vocab_size, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        full_cache, cache = KVCache(), KVCache()
        whole = model(ids, attention_mask=mask, past_key_values=full_cache)
        filled = model(ids, attention_mask=mask, past_key_values=cache, logits_positions=slice(4, 8))
        window = dict(attention_mask=mask, past_key_values=cache, cache_position=torch.arange(4, 16))
        window_whole = model(ids[:, 4:], **window)
        block = model(ids[:, 4:], **window, logits_positions=slice(0, 4))
        picked = model(ids[:, 4:], **window, logits_positions=torch.tensor([2, 9]))
    torch.testing.assert_close(filled, whole[:, 4:8], atol=1e-6, rtol=0)
    for layer in range(cfg.n_layers):
        torch.testing.assert_close(cache.keys[layer], full_cache.keys[layer], atol=0, rtol=0)
    torch.testing.assert_close(block, window_whole[:, :4], atol=1e-6, rtol=0)
    torch.testing.assert_close(picked, window_whole[:, [2, 9]], atol=1e-6, rtol=0)
    assert (picked - window_whole[:, [3, 8]]).abs().max().item() > 1e-2  # control


def test_logits_positions_refuses_targets_and_bad_indices():
    cfg = _small_config()
    model = LLaDAModel(cfg).eval()
    ids = _ids(1, 6, cfg.vocab_size)
    with pytest.raises(ValueError, match="with targets the loss covers every position"):
        model(ids, targets=ids, logits_positions=slice(0, 2))
    for bad in (torch.tensor([[1]]), torch.tensor([1.0]), [1, 2]):
        with pytest.raises(ValueError, match="logits_positions must be None, a slice or a 1-D LongTensor"):
            model(ids, logits_positions=bad)
