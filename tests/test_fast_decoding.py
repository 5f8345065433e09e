"""Fast decoding (confidence threshold, block-wise KV cache) against exact decoding.

- The training model's KV cache: a window's logits computed against a cache equal the whole
  forward's logits of that window when the cache was filled from the same sequence (left
  padding, grouped-query attention, a "dual" and a "prefix" window; bound 1e-5, measured 0.0
  on CPU), and move by more than 0.1 (controls) when the cache was filled from another sequence
  or the window is placed one position off.
- On tiny models trained here on the benchmark's copy task (`benchmarks/decoding.py`, 120 steps:
  they have learned the answers' length and EOS padding, not yet the copy): threshold 1.0 with
  steps == gen_length and a cache refreshed every step give exact decoding's tokens and reveal
  steps bit for bit, on a left-padded batch (refreshed at block starts only, the reveal order
  moves: control). On one layer the cache is exact even when refreshed only at block starts (a
  layer-0 key depends on its token and position alone), so the whole decode equals exact
  decoding; the same decode with a cache never refreshed after the first forward (4 tokens
  change), or with the window's positions off by one (17 change), does not. On two layers the
  block-start cache is an approximation (window logits move once the block fills in), and
  threshold decoding reveals several tokens per step, at least one per step.
- cfg with a cache on the left-padded batch: the guided batch [x; unconditional] is cached as
  one batch, so a cache refreshed every step with threshold 1.0 gives exact cfg decoding's tokens
  and reveal steps bit for bit (refreshed at block starts only, or without guidance, they move:
  controls). (Toy-model tests of threshold decoding with the EOS flags, early stop and bf16
  confidences: `test_sampling.py`.)
- `pretrain.evaluate` takes the settings from a task file: the copy task scored with threshold
  decoding and the dual cache answers as exact decoding does, in fewer forwards.
- Settings the sampler, a task file or the model cannot honour are refused with messages
  naming the field.
"""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from parallel.attention import KVCache
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig
from pretrain.diffusion.sampling import SamplerConfig, generate, left_pad
from pretrain.evaluation.scoring import run_task
from pretrain.evaluation.tasks import TaskFileError, load_tasks, read_examples
from pretrain.inference.loading import load_model

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("decoding_benchmark", REPO / "benchmarks" / "decoding.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SMALL = dict(d_model=64, n_heads=4, n_kv_heads=2, mlp_hidden_size=128, vocab_size=384, max_sequence_length=64)
EXACT = SamplerConfig(steps=32, gen_length=32, block_length=8, stop_at_eos=False)


@pytest.fixture(scope="module")
def copy_models(tmp_path_factory):
    """The copy task's tokenizer, its prompts (one short and out of distribution, so the batch is
    left-padded) and two models trained on it for a few seconds: one layer and two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = bench.copy_tokenizer(tmp_path_factory.mktemp("copy") / "tokenizer.json")
    models = {layers: bench.train_copy_model(tok, ModelConfig(n_layers=layers, **SMALL), steps=120, rows=16,
                                             gen_length=EXACT.gen_length)
              for layers in (1, 2)}
    texts = ["copy: red sun fish - - - - - =", "copy: gold iron salt milk rose - - - =", "copy: cat ="]
    yield tok, models, [tok.encode(t) for t in texts]
    torch.set_num_threads(threads)


def decode(model_fn, tok, prompts, config):
    ids, mask = left_pad(prompts, tok.eos_id)
    return generate(model_fn, ids, mask_id=tok.mask_id, eos_id=tok.eos_id, eot_id=tok.special_ids["eot"],
                    config=config, attention_mask=None if bool(mask.all()) else mask)


def same(a, b) -> bool:
    return torch.equal(a.ids, b.ids) and torch.equal(a.reveal_step, b.reveal_step) and a.steps_run == b.steps_run


class NeverRefreshed:
    """Control: every cache after the first holds the first forward's keys and values."""

    def __init__(self, model):
        self.model, self.first = model, None

    def __call__(self, ids, attention_mask=None, past_key_values=None, cache_position=None):
        if past_key_values is None or cache_position is not None:
            return self.model(ids, attention_mask=attention_mask, past_key_values=past_key_values,
                              cache_position=cache_position)
        logits = self.model(ids, attention_mask=attention_mask, past_key_values=past_key_values)
        if self.first is None:
            self.first = [[t.clone() for t in past_key_values.keys], [t.clone() for t in past_key_values.values]]
        past_key_values.keys = [t.clone() for t in self.first[0]]
        past_key_values.values = [t.clone() for t in self.first[1]]
        return logits


class OffByOne:
    """Control: the window is placed one position early (RoPE and cache slots)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids, attention_mask=None, past_key_values=None, cache_position=None):
        return self.model(ids, attention_mask=attention_mask, past_key_values=past_key_values,
                          cache_position=None if cache_position is None else cache_position - 1)


# ---------------------------------------------------------------------------------------------
# The cached forward of the training model
# ---------------------------------------------------------------------------------------------
def test_window_logits_equal_the_whole_forward_and_other_caches_move_them():
    model = LLaDAModel(ModelConfig(n_layers=2, **SMALL), init_seed=4).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 380, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :9] = 0
    other = ids.clone()
    other[:, 12:14] = torch.randint(0, 380, (3, 2), generator=g)  # outside the window 16..24
    with torch.no_grad():
        whole = model(ids, attention_mask=mask)
        for stop in (20, 24):  # a dual window (the block) and a prefix one (block and suffix)
            cache, foreign = KVCache(), KVCache()
            torch.testing.assert_close(model(ids, attention_mask=mask, past_key_values=cache), whole,
                                       atol=0, rtol=0)
            assert len(cache) == 2 and cache.length == 24 and cache.keys[0].shape == (3, 24, 2, 16)
            window = model(ids[:, 16:stop], attention_mask=mask, past_key_values=cache,
                           cache_position=torch.arange(16, stop))
            assert (window - whole[:, 16:stop]).abs().max().item() <= 1e-5
            model(other, attention_mask=mask, past_key_values=foreign)
            stale = model(ids[:, 16:stop], attention_mask=mask, past_key_values=foreign,
                          cache_position=torch.arange(16, stop))
            assert (stale - whole[:, 16:stop]).abs().max().item() > 0.1
            shifted = model(ids[:, 16:stop], attention_mask=mask, past_key_values=cache,
                            cache_position=torch.arange(15, stop - 1))
            assert (shifted - whole[:, 16:stop]).abs().max().item() > 0.1


# ---------------------------------------------------------------------------------------------
# Whole decodes on trained models
# ---------------------------------------------------------------------------------------------
def test_threshold_one_and_a_cache_refreshed_every_step_equal_exact_decoding(copy_models):
    tok, models, prompts = copy_models
    model = models[2]
    exact = decode(model, tok, prompts, EXACT)
    assert exact.steps_run == 32 and not bool((exact.ids == tok.mask_id).any())
    threshold_one = SamplerConfig(**{**EXACT.__dict__, "threshold": 1.0})
    assert same(decode(model, tok, prompts, threshold_one), exact)
    for cache in ("prefix", "dual"):
        refreshed = SamplerConfig(**{**threshold_one.__dict__, "cache": cache, "cache_refresh_every": 1})
        assert same(decode(model, tok, prompts, refreshed), exact), cache
        block_starts = SamplerConfig(**{**threshold_one.__dict__, "cache": cache})  # control
        assert not same(decode(model, tok, prompts, block_starts), exact), cache


def test_cfg_with_a_cache_refreshed_every_step_equals_exact_cfg_decoding(copy_models):
    tok, models, prompts = copy_models
    model = models[2]
    guided = SamplerConfig(**{**EXACT.__dict__, "cfg_scale": 1.0})
    exact = decode(model, tok, prompts, guided)
    assert not same(exact, decode(model, tok, prompts, EXACT))  # premise: guidance moves the decode
    for cache in ("prefix", "dual"):
        block_starts = SamplerConfig(**{**guided.__dict__, "threshold": 1.0, "cache": cache})
        every_step = SamplerConfig(**{**block_starts.__dict__, "cache_refresh_every": 1})
        assert same(decode(model, tok, prompts, every_step), exact), cache
        assert not same(decode(model, tok, prompts, block_starts), exact), cache  # control


def test_one_layer_cache_is_exact_and_stale_or_shifted_caches_are_not(copy_models):
    tok, models, prompts = copy_models
    model = models[1]
    exact = decode(model, tok, prompts, EXACT)
    dual = SamplerConfig(**{**EXACT.__dict__, "cache": "dual"})
    for cache in ("prefix", "dual"):  # refreshed at block starts only
        assert same(decode(model, tok, prompts, SamplerConfig(**{**EXACT.__dict__, "cache": cache})), exact)
    assert not same(decode(NeverRefreshed(model), tok, prompts, dual), exact)
    assert not same(decode(OffByOne(model), tok, prompts, dual), exact)


@pytest.mark.parametrize("layers, moves", [(1, False), (2, True)])
def test_the_block_start_cache_is_an_approximation_beyond_one_layer(copy_models, layers, moves):
    """Cache filled at the block's first step; the block then fills in: the window's logits
    against that cache move from the whole forward's only where deeper layers exist."""
    tok, models, prompts = copy_models
    model = models[layers]
    x = torch.full((1, len(prompts[0]) + 16), tok.mask_id)
    x[0, :len(prompts[0])] = torch.tensor(prompts[0])
    start = len(prompts[0])
    with torch.no_grad():
        cache = KVCache()
        model(x, past_key_values=cache)
        x[0, start:start + 4] = torch.tensor(tok.encode(" red sun fish;"))
        window = model(x[:, start:start + 8], past_key_values=cache, cache_position=torch.arange(start, start + 8))
        gap = (window - model(x)[:, start:start + 8]).abs().max().item()
    assert (gap > 1e-3) if moves else (gap <= 1e-5), gap


def test_threshold_decoding_reveals_in_parallel_at_least_one_token_per_step(copy_models):
    tok, models, prompts = copy_models
    for cache in ("none", "dual"):
        config = SamplerConfig(**{**EXACT.__dict__, "threshold": 0.7, "cache": cache})
        sample = decode(models[2], tok, prompts[:1], config)
        steps = sample.reveal_step[0].tolist()
        assert sample.steps_run < 32 and -1 not in steps  # fewer forwards, everything revealed
        assert sorted(set(steps)) == list(range(sample.steps_run))  # every step revealed something
        assert max(steps.count(s) for s in set(steps)) > 1  # some step revealed several
        for block in range(4):  # each block in its own steps, blocks in order
            own = steps[8 * block:8 * block + 8]
            later = steps[8 * block + 8:]
            assert not later or max(own) < min(later)


def test_evaluate_takes_fast_decoding_from_the_task_file(copy_models, tmp_path):
    tok, models, _ = copy_models
    bench.save_checkpoint(tmp_path / "ckpt", models[2], tok.path)
    task_file = bench.write_task(tmp_path, 6)
    model = load_model(tmp_path / "ckpt")
    base = load_tasks(task_file)[0]
    examples = read_examples(base)
    exact = run_task(model, base, examples, seed=0)
    text = task_file.read_text().replace("stop_at_eos: false", "stop_at_eos: false\n  threshold: 0.9\n  cache: dual")
    (tmp_path / "fast.yaml").write_text(text)
    fast_task = load_tasks(tmp_path / "fast.yaml")[0]
    assert (fast_task.sampler.threshold, fast_task.sampler.cache) == (0.9, "dual")
    fast = run_task(model, fast_task, examples, seed=0)
    assert [r["output"] for r in fast["examples"]] == [r["output"] for r in exact["examples"]]
    assert fast["forwards_per_rank"][0] < exact["forwards_per_rank"][0] == 6 * 64
    (tmp_path / "bad.yaml").write_text(text.replace("threshold: 0.9", "threshold: 2"))
    with pytest.raises(TaskFileError, match=r"task 'copy': sampler settings: threshold 2.0 must be in"):
        load_tasks(tmp_path / "bad.yaml")


# ---------------------------------------------------------------------------------------------
# What is refused
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    (dict(threshold=0.0), r"threshold 0.0 must be in \(0, 1\]"),
    (dict(threshold=1.5), r"threshold 1.5 must be in \(0, 1\]"),
    (dict(threshold=0.9, remasking="random"), "threshold needs remasking 'low_confidence'"),
    (dict(cache="full"), "cache 'full' is not one of none, prefix, dual"),
    (dict(cache_refresh_every=2), "cache_refresh_every needs a cache"),
    (dict(cache="dual", cache_refresh_every=0), "cache_refresh_every 0 must be >= 1"),
])
def test_bad_fast_decoding_settings_are_refused(fields, message):
    problems = "; ".join(SamplerConfig(**{**EXACT.__dict__, **fields}).problems())
    assert problems and re.search(message, problems), problems


def test_threshold_ignores_steps_and_refuses_masks_in_the_prompt():
    assert SamplerConfig(steps=5, gen_length=16, block_length=8, threshold=0.9).problems() == []
    model = LLaDAModel(ModelConfig(n_layers=1, **SMALL), init_seed=0).eval()
    with pytest.raises(ValueError, match="the prompt contains the mask token"):
        generate(model, torch.tensor([[5, 383, 6]]), mask_id=383, eos_id=1, eot_id=2,
                 config=SamplerConfig(steps=8, gen_length=8, block_length=8, cache="dual"))


def test_the_model_refuses_inconsistent_cache_calls():
    model = LLaDAModel(ModelConfig(n_layers=1, **SMALL), init_seed=0).eval()
    ids = torch.randint(0, 380, (2, 10))
    cache = KVCache()
    with torch.no_grad():
        with pytest.raises(ValueError, match="pass past_key_values too"):
            model(ids, cache_position=torch.arange(10))
        model(ids, past_key_values=cache)
        with pytest.raises(ValueError, match="already filled: pass cache_position"):
            model(ids, past_key_values=cache)
        with pytest.raises(ValueError, match="consecutive positions"):
            model(ids[:, 2:5], past_key_values=cache, cache_position=torch.tensor([2, 4, 5]))
        with pytest.raises(ValueError, match="consecutive positions"):
            model(ids[:, 2:5], past_key_values=cache, cache_position=torch.arange(8, 11))
        with pytest.raises(ValueError, match="a cache serves the batch that filled it"):
            model(ids[:1, 2:5], past_key_values=cache, cache_position=torch.arange(2, 5))
        with pytest.raises(ValueError, match="targets or past_key_values"):
            model(ids, targets=ids, past_key_values=KVCache())
    causal = LLaDAModel(ModelConfig(n_layers=1, causal=True, **SMALL), init_seed=0).eval()
    with pytest.raises(ValueError, match="autoregressive baseline"):
        causal(ids, past_key_values=KVCache())
