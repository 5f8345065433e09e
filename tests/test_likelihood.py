"""Conditional log-likelihood (Algorithm 3) against the official get_log_likelihood.py."""

import time

import pytest
import torch

from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig
from pretrain.diffusion.likelihood import conditional_log_likelihood, likelihood_noise, stratified_mask_counts
from pretrain.diffusion.objectives import forward_process, pretrain_loss

MASK = 63
VOCAB = 64


def official_draws(L, b, seed):
    """Independent transcription of the official forward_process's draws (global RNG, CPU)."""
    torch.manual_seed(seed)
    k = torch.randint(1, L + 1, ())
    x = torch.round(torch.linspace(float(k), k + (b - 1) * (L / b), steps=b)).long()
    x = ((x - 1) % L) + 1
    is_mask = torch.arange(L).repeat(b, 1) < x.unsqueeze(1)
    for i in range(b):
        is_mask[i] = is_mask[i][torch.randperm(L)]
    return x, is_mask


def seq_of(prompt_len, L, b, seed=123):
    g = torch.Generator().manual_seed(seed)
    row = torch.randint(0, 60, (prompt_len + L,), generator=g)
    return row[None, :].repeat(b, 1)


@pytest.mark.parametrize("L,b,seed", [(8, 4, 0), (10, 3, 1), (3, 8, 2), (1, 4, 3), (1, 1, 4),
                                      (17, 16, 5), (100, 16, 6), (7, 7, 7), (5, 2, 8)])
def test_official_draws(L, b, seed):
    counts, is_mask = official_draws(L, b, seed)
    p = 5
    seq = seq_of(p, L, b)
    noisy, masked, p_mask = likelihood_noise(seq, p, MASK, torch.Generator().manual_seed(seed))
    assert torch.equal(stratified_mask_counts(L, b, torch.Generator().manual_seed(seed)), counts)
    assert torch.equal(masked[:, p:], is_mask)
    assert not masked[:, :p].any()
    assert torch.equal(p_mask, counts / L)
    assert p_mask.dtype == torch.float32


def test_stratified_counts():
    # L = 8, b = 4: linspace(k, k + 3 * 8 / 4, 4) = k, k + 2, k + 4, k + 6; with k = 3 that is
    # 3, 5, 7, 9, and ((x - 1) % 8) + 1 wraps 9 to 1: [3, 5, 7, 1].
    seed = next(s for s in range(100)
                if torch.randint(1, 9, (), generator=torch.Generator().manual_seed(s)) == 3)
    counts = stratified_mask_counts(8, 4, torch.Generator().manual_seed(seed))
    assert counts.tolist() == [3, 5, 7, 1]
    for L, b in [(8, 4), (12, 3), (16, 16), (64, 16), (6, 1)]:
        for seed in range(10):
            counts = stratified_mask_counts(L, b, torch.Generator().manual_seed(seed))
            assert len(set(counts.tolist())) == b
            stride = L // b
            strata = sorted((c - 1) // stride for c in counts.tolist())
            assert strata == list(range(b))


@pytest.mark.parametrize("L,b", [(16, 4), (3, 8), (1, 2), (9, 16)])
def test_noise_masks_exact_counts(L, b):
    p = 6
    seq = seq_of(p, L, b)
    g = torch.Generator().manual_seed(11)
    counts = stratified_mask_counts(L, b, torch.Generator().manual_seed(11))
    noisy, masked, p_mask = likelihood_noise(seq, p, MASK, g)
    assert torch.equal(masked.sum(1), counts)
    assert torch.equal(noisy[:, :p], seq[:, :p])
    assert torch.equal(noisy[~masked], seq[~masked])
    assert (noisy[masked] == MASK).all()
    assert ((counts >= 1) & (counts <= L)).all()


def hand_estimate(logits_of, prompt, answer, mc_num, b, seed, cfg_scale=0.0):
    """The official loop written out row by row, with the official draws."""
    p, L = len(prompt), len(answer)
    seq = torch.cat([prompt, answer])
    torch.manual_seed(seed)  # one global stream across batches, as the official loop
    losses = []
    for _ in range(mc_num // b):
        k = torch.randint(1, L + 1, ())
        x = torch.round(torch.linspace(float(k), k + (b - 1) * (L / b), steps=b)).long()
        x = ((x - 1) % L) + 1
        rows = [(torch.arange(L) < x[i])[torch.randperm(L)] for i in range(b)]
        total = 0.0
        for i in range(b):
            row_mask = torch.cat([torch.zeros(p, dtype=torch.bool), rows[i]])
            noisy = torch.where(row_mask, torch.tensor(MASK), seq)
            logits = logits_of(noisy[None])[0].double()
            if cfg_scale > 0:
                un = noisy.clone()
                un[:p] = MASK
                un_logits = logits_of(un[None])[0].double()
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            for j in torch.nonzero(row_mask).flatten().tolist():
                ce = -torch.log_softmax(logits[j], -1)[seq[j]].item()
                total += ce * L / x[i].item()
        losses.append(total / b)
    return -sum(losses) / len(losses)


def test_weight_L_over_l_fixed_logits():
    p, L = 4, 10
    fixed = torch.randn(p + L, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    model_fn = lambda ids: fixed[None].expand(ids.shape[0], -1, -1).to(torch.bfloat16).float()
    prompt, answer = seq_of(p, L, 1)[0].split([p, L])
    got = conditional_log_likelihood(model_fn, prompt, answer, mask_id=MASK, mc_num=12,
                                     batch_size=4, generator=torch.Generator().manual_seed(5))
    want = hand_estimate(model_fn, prompt, answer, 12, 4, 5)
    assert abs(got - want) < 1e-6 * max(1.0, abs(want))


def prompt_dependent_model(p):
    g = torch.Generator().manual_seed(1)
    table = torch.randn(VOCAB, VOCAB, generator=g)
    ctx = torch.randn(VOCAB, VOCAB, generator=g)

    def model_fn(ids):
        return table[ids] + ctx[ids[:, :p]].mean(1, keepdim=True)
    return model_fn


def test_cfg():
    p, L = 5, 7
    prompt, answer = seq_of(p, L, 1)[0].split([p, L])
    model_fn = prompt_dependent_model(p)
    kw = dict(mask_id=MASK, mc_num=8, batch_size=4)
    plain = conditional_log_likelihood(model_fn, prompt, answer,
                                       generator=torch.Generator().manual_seed(3), **kw)
    zero = conditional_log_likelihood(model_fn, prompt, answer, cfg_scale=0.0,
                                      generator=torch.Generator().manual_seed(3), **kw)
    assert plain == zero
    guided = conditional_log_likelihood(model_fn, prompt, answer, cfg_scale=1.5,
                                        generator=torch.Generator().manual_seed(3), **kw)
    assert abs(guided - plain) > 1e-3
    want = hand_estimate(model_fn, prompt, answer, 8, 4, 3, cfg_scale=1.5)
    assert abs(guided - want) < 1e-5 * max(1.0, abs(want))
    assert abs(plain - hand_estimate(model_fn, prompt, answer, 8, 4, 3)) < 1e-5 * abs(plain)


def test_memorised_sequence_scores_high():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=128,
                      vocab_size=VOCAB, max_sequence_length=32)
    model = LLaDAModel(cfg, init_seed=0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randperm(60, generator=g)[:24]
    prompt, answer = tokens[:8], tokens[8:]
    shuffled = answer[torch.randperm(16, generator=g)]
    assert (shuffled != answer).sum() >= 12
    batch = tokens[None].repeat(16, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    start = time.perf_counter()
    for _ in range(200):
        nb = forward_process(batch, MASK, generator=g)
        loss = pretrain_loss(model(nb.noisy), batch, nb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - start
    model.eval()
    kw = dict(mask_id=MASK, mc_num=32, batch_size=16)
    memorised = conditional_log_likelihood(model, prompt, answer,
                                           generator=torch.Generator().manual_seed(1), **kw)
    other = conditional_log_likelihood(model, prompt, shuffled,
                                       generator=torch.Generator().manual_seed(1), **kw)
    print(f"training {train_s:.2f} s, final loss {loss.item():.4f}, "
          f"memorised {memorised:.4f}, shuffled {other:.4f}")
    assert memorised > -2
    assert other < memorised - 10


def test_errors():
    model_fn = prompt_dependent_model(2)
    prompt, answer = torch.tensor([1, 2]), torch.tensor([3, 4, 5])
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="mc_num 10.*batch_size 4"):
        conditional_log_likelihood(model_fn, prompt, answer, mask_id=MASK, mc_num=10,
                                   batch_size=4, generator=g)
    with pytest.raises(ValueError, match="empty"):
        conditional_log_likelihood(model_fn, prompt, answer[:0], mask_id=MASK, mc_num=4,
                                   batch_size=4, generator=g)
    with pytest.raises(ValueError, match="mask token"):
        conditional_log_likelihood(model_fn, prompt, torch.tensor([3, MASK]), mask_id=MASK,
                                   mc_num=4, batch_size=4, generator=g)


def test_validation_bound_is_algorithm_3_and_splits_over_ranks():
    """The training-time bound (per-token CE path, no whole logits) equals minus the conditional
    log-likelihood for the same draws, with an empty prompt (pretraining) and with a prompt (SFT
    answers); split over 2 data-parallel ranks (the second scoring a dummy row) its sums equal
    one rank's, and only answer tokens are counted."""
    from pretrain.diffusion.likelihood import sequence_nll_bound
    from pretrain.training.heldout import heldout_elbo

    model = LLaDAModel(ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden_size=64,
                                   vocab_size=VOCAB, max_sequence_length=32), init_seed=0).eval()
    rows = torch.randint(0, MASK, (3, 12), generator=torch.Generator().manual_seed(4))
    bound = sequence_nll_bound(model, rows[0], mask_id=MASK, mc_num=8, batch_size=4,
                               generator=torch.Generator().manual_seed(9))
    ll = conditional_log_likelihood(model, rows[0][:0], rows[0], mask_id=MASK, mc_num=8, batch_size=4,
                                    generator=torch.Generator().manual_seed(9))
    assert bound == pytest.approx(-ll, rel=1e-5)
    answer_bound = sequence_nll_bound(model, rows[0], mask_id=MASK, mc_num=8, batch_size=4,
                                      generator=torch.Generator().manual_seed(9), prompt_length=5)
    answer_ll = conditional_log_likelihood(model, rows[0][:5], rows[0][5:], mask_id=MASK, mc_num=8,
                                           batch_size=4, generator=torch.Generator().manual_seed(9))
    assert answer_bound == pytest.approx(-answer_ll, rel=1e-5)
    assert answer_bound != pytest.approx(bound, rel=1e-2)

    kwargs = dict(mask_id=MASK, mc_num=4, batch_size=2, seed=3)
    for prompt_length, counted in ((0, [24, 12]), (5, [14, 7])):
        examples = [(row, prompt_length) for row in rows]
        whole = heldout_elbo(model, examples, dp_rank=0, dp_size=1, **kwargs)
        halves = [heldout_elbo(model, examples, dp_rank=r, dp_size=2, **kwargs) for r in (0, 1)]
        assert whole[1] == sum(counted) and [h[1] for h in halves] == counted  # no dummy, no prompt
        assert sum(h[0] for h in halves) == pytest.approx(whole[0], rel=1e-6)
