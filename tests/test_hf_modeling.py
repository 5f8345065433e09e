"""The stand-alone Hugging Face modeling code against the training model.

`pretrain/checkpoint/hf_modeling/` is what a user of an exported checkpoint runs, and nothing in the
training stack runs it, so its mistakes would show only after export: here it loads the training
model's state dict by name (strict), must give the same logits in fp32 and bf16, must make a
left-padded batch give each row what the row gives alone, must really recompute blocks under
transformers' gradient checkpointing, must refuse what it does not implement, and its config
must read and write every field of the released LLaDA-8B config.json. Its KV cache (fast
decoding): a window computed against a cache of the same sequence gives the whole forward's
logits and the training model's cached logits (a foreign cache moves them: control), and the
sampler through it gives its uncached tokens when refreshed every step and the training
model's tokens when refreshed at block starts. Its forward warns about nothing (Python warnings
and transformers' log records, `warning_once` included), with and without the cache, under the
installed transformers; control: transformers' own output class warns there when handed the
cache under its old name. Logits at selected positions (`logits_positions`) equal the whole
logits at those positions, with a padding mask and with the cache; control: other positions'
logits differ.
"""

import contextlib
import copy
import dataclasses
import json
import logging
import warnings

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging as hf_logging

from parallel.attention import KVCache
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig
from pretrain.checkpoint.hf_modeling.configuration_llada import LLaDAConfig
from pretrain.checkpoint.hf_modeling.modeling_llada import LLaDAKVCache, LLaDAModelLM
from pretrain.diffusion.sampling import SamplerConfig, generate

# Grouped-query (2 query heads per KV head) and a non-default theta, so a hard-coded one shows.
SHAPE = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=96,
             vocab_size=128, max_sequence_length=64, rope_theta=10000.0)

# The released GSAI-ML/LLaDA-8B config.json, less auto_map/architectures/transformers_version.
RELEASED_8B = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "attention_dropout": 0.0,
    "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081,
    "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
    "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
    "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 12288,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 32,
    "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "use_cache": False, "vocab_size": 126464,
    "weight_tying": False,
}


def _hf_config(weight_tying: bool = False, **overrides) -> LLaDAConfig:
    fields = dict(SHAPE, embedding_size=SHAPE["vocab_size"], rms_norm_eps=1e-5,
                  weight_tying=weight_tying,
                  # in-vocabulary special ids (transformers 5 warns about others)
                  pad_token_id=0, eos_token_id=1, mask_token_id=SHAPE["vocab_size"] - 1)
    fields.update(overrides)
    return LLaDAConfig(**fields)


def _pair(weight_tying: bool = False, seed: int = 0):
    """The training model (norm weights randomised: ones would hide a misplaced weight
    multiply) and the HF model holding its state dict, both in eval mode."""
    ref = LLaDAModel(ModelConfig(**SHAPE, weight_tying=weight_tying), init_seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    hf = LLaDAModelLM(_hf_config(weight_tying)).eval()
    assert sorted(hf.state_dict()) == sorted(ref.state_dict())
    result = hf.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ref, hf


def _ids(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SHAPE["vocab_size"], (b, s), generator=g)


# ---------------------------------------------------------------------------------------------
# a. Same logits as the training model
# ---------------------------------------------------------------------------------------------
def test_parameter_names_are_the_released_ones():
    _, hf = _pair()
    names = set(hf.state_dict())
    P = "model.transformer."
    assert {P + "wte.weight", P + "ln_f.weight", P + "ff_out.weight"} <= names
    for part in ("attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj",
                 "up_proj", "ff_out"):
        assert f"{P}blocks.1.{part}.weight" in names
    assert hf.state_dict()[P + "blocks.0.k_proj.weight"].shape == (2 * 16, 64)  # kv heads x hd
    assert hf.state_dict()[P + "blocks.0.ff_proj.weight"].shape == (96, 64)


def test_fp32_logits_equal_the_training_model():
    ref, hf = _pair()
    ids = _ids(3, 20)
    with torch.no_grad():
        want, got = ref(ids), hf(ids).logits
    assert got.dtype == torch.float32 and got.shape == (3, 20, SHAPE["vocab_size"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_logits_agree_with_the_training_model_in_bf16():
    """Bound: 4 bf16 units in the last place (2^-8 relative each) of the largest fp32 logit,
    1.6% of the logit scale (0.068 here), room for two bf16 implementations rounding in
    different kernels. Measured on CPU, where both run the same ops: 0.0. For scale, bf16
    itself is 0.082 (1.9%) off the fp32 logits, and one q_proj weight moved by 4 init stds
    moves the bf16 logits by 1.03: the negative control must fail the bound (by 4x)."""
    ref, hf = _pair()
    ids = _ids(4, 32, seed=1)
    with torch.no_grad():
        bound = 2 ** -6 * ref(ids).abs().max().item()
        ref16, hf16 = ref.to(torch.bfloat16), copy.deepcopy(hf).to(torch.bfloat16)
        want = ref16(ids)
        out = hf16(ids, output_hidden_states=True)
        assert all(h.dtype == torch.bfloat16 for h in out.hidden_states)  # bf16 matmuls throughout
        assert (out.logits - want).abs().max().item() <= bound

        hf.model.transformer.blocks[0].q_proj.weight[0, 0] += 4 * 64 ** -0.5
        perturbed = hf.to(torch.bfloat16)(ids).logits
        assert (perturbed - want).abs().max().item() > 4 * bound


def test_inputs_embeds_hidden_states_and_tuple_output():
    _, hf = _pair()
    ids = _ids(2, 9)
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        from_embeds = hf(inputs_embeds=hf.get_input_embeddings()(ids)).logits
        as_tuple = hf(ids, output_hidden_states=True, return_dict=False)
    torch.testing.assert_close(from_embeds, out.logits, atol=0, rtol=0)
    assert len(out.hidden_states) == SHAPE["n_layers"] + 1  # embeddings + every block
    torch.testing.assert_close(out.hidden_states[0], hf.get_input_embeddings()(ids))
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], out.logits, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# b. Left-padded batches
# ---------------------------------------------------------------------------------------------
def test_left_padded_rows_equal_each_row_alone():
    _, hf = _pair()
    lengths, s, pad = [12, 7, 3], 12, 5
    rows = [_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.full((len(rows), s), pad)
    mask = torch.zeros(len(rows), s, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, s - len(row):] = row
        mask[i, s - len(row):] = 1
    with torch.no_grad():
        padded = hf(ids, attention_mask=mask).logits
        as_bool = hf(ids, attention_mask=mask.bool()).logits
        unmasked = hf(ids).logits
        for i, row in enumerate(rows):
            alone = hf(row[None]).logits[0]
            torch.testing.assert_close(padded[i, s - len(row):], alone, atol=1e-5, rtol=1e-5)
            if len(row) < s:  # negative control: without the mask padding leaks in
                assert (unmasked[i, s - len(row):] - alone).abs().max() > 1e-2
    torch.testing.assert_close(as_bool, padded, atol=0, rtol=0)
    assert torch.isfinite(padded).all()  # padding queries: garbage, but finite


def test_all_ones_mask_is_the_unmasked_path():
    _, hf = _pair()
    ids = _ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, attention_mask=torch.ones_like(ids)).logits,
                                   hf(ids).logits, atol=0, rtol=0)


def test_bad_attention_masks_are_refused():
    _, hf = _pair()
    ids = _ids(2, 6)
    with pytest.raises(ValueError, match=r"2-D \[batch, seq\]"):
        hf(ids, attention_mask=torch.ones(2, 1, 1, 6))
    with pytest.raises(ValueError, match=r"2-D"):
        hf(ids, attention_mask=torch.ones(2, 5))
    empty = torch.ones(2, 6, dtype=torch.long)
    empty[1] = 0
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] have no real token"):
        hf(ids, attention_mask=empty)


# ---------------------------------------------------------------------------------------------
# c. Gradient checkpointing through transformers' own switch
# ---------------------------------------------------------------------------------------------
def _block_calls(hf, fn):
    """fn()'s result and how many times the blocks' forward started during it (a pre-hook:
    torch's non-reentrant recomputation stops early, before forward hooks would fire)."""
    calls = []
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1))
             for b in hf.model.transformer.blocks]
    try:
        return fn(), len(calls)
    finally:
        for h in hooks:
            h.remove()


def _step(hf, ids, targets):
    """One training step: loss and parameter gradients."""
    hf.zero_grad()
    logits = hf(ids).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in hf.named_parameters()}


@pytest.mark.parametrize("switch", ["gradient_checkpointing_enable",
                                    "activation_checkpointing_enable"])
def test_gradient_checkpointing_recomputes_and_keeps_gradients(switch):
    if not hasattr(LLaDAModelLM, switch):
        pytest.skip(f"{switch} is not in this transformers version")
    _, hf = _pair()
    hf.train()
    ids, targets = _ids(2, 12, seed=3), _ids(2, 12, seed=4)
    n_layers = SHAPE["n_layers"]
    (loss, grads), calls = _block_calls(hf, lambda: _step(hf, ids, targets))
    assert calls == n_layers
    with warnings.catch_warnings():
        # transformers 5 deprecates gradient_checkpointing_enable in favour of the other
        warnings.simplefilter("ignore", FutureWarning)
        getattr(hf, switch)()
    assert hf.model.gradient_checkpointing
    (ck_loss, ck_grads), ck_calls = _block_calls(hf, lambda: _step(hf, ids, targets))
    assert ck_calls == 2 * n_layers  # every block ran again in the backward
    torch.testing.assert_close(ck_loss, loss, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(ck_grads[name], grad, atol=1e-6, rtol=1e-6)
    hf.eval()
    with torch.no_grad():
        assert _block_calls(hf, lambda: hf(ids))[1] == n_layers  # only training recomputes


# ---------------------------------------------------------------------------------------------
# d. Tied embeddings
# ---------------------------------------------------------------------------------------------
def test_weight_tying_uses_the_embedding_as_head():
    ref, hf = _pair(weight_tying=True)
    assert "model.transformer.ff_out.weight" not in dict(hf.named_parameters())
    assert hf.get_output_embeddings() is None and hf.config.tie_word_embeddings
    ids = _ids(2, 11, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref(ids), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# e. What the model refuses
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, supported", [
    ("alibi", True, "False"), ("rope", False, "True"), ("block_type", "sequential", "'llama'"),
    ("activation_type", "gelu", "'silu' or 'swiglu'"), ("layer_norm_type", "default", "'rms'"),
    ("include_bias", True, "False"), ("include_qkv_bias", True, "False"),
    ("scale_logits", True, "False"), ("attention_layer_norm", True, "False"),
    ("input_emb_norm", True, "False"), ("multi_query_attention", True, "False"),
])
def test_unimplemented_architecture_fields_are_refused(field, value, supported):
    with pytest.raises(ValueError, match=rf"{field}={value!r} .*supported: {supported}"):
        LLaDAModelLM(_hf_config(**{field: value}))


def test_labels_cache_and_unknown_arguments_are_refused():
    _, hf = _pair()
    ids = _ids(1, 4)
    with pytest.raises(ValueError, match="training stack"):
        hf(ids, labels=ids)
    with pytest.raises(ValueError, match="past_key_values must be an LLaDAKVCache"):
        hf(ids, past_key_values=())
    with pytest.raises(ValueError, match="pass past_key_values too"):
        hf(ids, cache_position=torch.arange(4))
    with torch.no_grad():
        cache = hf(ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="already filled: pass cache_position"):
            hf(ids, past_key_values=cache)
        with pytest.raises(ValueError, match="consecutive positions"):
            hf(ids[:, :2], past_key_values=cache, cache_position=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="exactly one"):
        hf(ids, inputs_embeds=hf.get_input_embeddings()(ids))
    with pytest.raises(ValueError, match="position_ids"):
        hf(ids, position_ids=torch.arange(4)[None])
    with torch.no_grad():
        hf(ids, use_cache=False, output_attentions=False)  # what generic callers pass: fine


# ---------------------------------------------------------------------------------------------
# f. Config round trip and save/load of the model
# ---------------------------------------------------------------------------------------------
def test_released_config_round_trips(tmp_path):
    fields = {k: v for k, v in RELEASED_8B.items() if k != "model_type"}
    defaults = LLaDAConfig()
    assert {k: getattr(defaults, k) for k in fields} == fields  # class defaults are the 8B
    LLaDAConfig(**fields).save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert {k: on_disk[k] for k in RELEASED_8B} == RELEASED_8B  # the released code can read it
    loaded = LLaDAConfig.from_pretrained(tmp_path)
    assert {k: getattr(loaded, k) for k in fields} == fields
    assert loaded.tie_word_embeddings is False
    assert (loaded.num_hidden_layers, loaded.hidden_size, loaded.num_attention_heads,
            loaded.num_key_value_heads) == (32, 4096, 32, 32)
    assert LLaDAConfig(weight_tying=True).tie_word_embeddings is True


def test_save_and_from_pretrained_keep_the_weights(tmp_path):
    _, hf = _pair()
    hf.save_pretrained(tmp_path)
    loaded = LLaDAModelLM.from_pretrained(tmp_path).eval()
    ids = _ids(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, hf(ids).logits, atol=0, rtol=0)


def test_fresh_model_initialisation():
    hf = LLaDAModelLM(_hf_config(init_std=0.05))
    t = hf.model.transformer
    assert torch.equal(t.ln_f.weight, torch.ones(SHAPE["d_model"]))
    assert abs(t.wte.weight.std().item() - 0.05) < 0.005
    assert abs(t.blocks[0].ff_proj.weight.std().item() - 0.05) < 0.005


# ---------------------------------------------------------------------------------------------
# g. The KV cache of fast decoding
# ---------------------------------------------------------------------------------------------
def test_cached_windows_equal_the_whole_forward_and_the_training_model():
    ref, hf = _pair()
    ids = _ids(2, 20, seed=6)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    other = ids.clone()
    other[:, 4:6] = _ids(2, 2, seed=7)
    with torch.no_grad():
        whole = hf(ids, attention_mask=mask).logits
        out = hf(ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, LLaDAKVCache) and len(cache) == 2 and cache.length == 20
        torch.testing.assert_close(out.logits, whole, atol=0, rtol=0)
        window = hf(ids[:, 8:12], attention_mask=mask, past_key_values=cache,
                    cache_position=torch.arange(8, 12)).logits
        torch.testing.assert_close(window, whole[:, 8:12], atol=1e-5, rtol=1e-5)
        training_cache = KVCache()
        ref(ids, attention_mask=mask, past_key_values=training_cache)
        training = ref(ids[:, 8:12], attention_mask=mask, past_key_values=training_cache,
                       cache_position=torch.arange(8, 12))
        torch.testing.assert_close(window, training, atol=1e-5, rtol=1e-5)
        foreign = hf(other, attention_mask=mask, use_cache=True).past_key_values  # control
        moved = hf(ids[:, 8:12], attention_mask=mask, past_key_values=foreign,
                   cache_position=torch.arange(8, 12)).logits
        assert (moved - whole[:, 8:12]).abs().max().item() > 0.1
        as_tuple = hf(ids, use_cache=True, return_dict=False)
        assert len(as_tuple) == 2 and isinstance(as_tuple[1], LLaDAKVCache)


def test_sampling_through_the_cache():
    ref, hf = _pair()
    logits = lambda ids, **cache: hf(ids, **cache).logits  # noqa: E731
    prompt = torch.randint(2, SHAPE["vocab_size"] - 1, (2, 6), generator=torch.Generator().manual_seed(8))
    ids = dict(mask_id=SHAPE["vocab_size"] - 1, eos_id=1, eot_id=0)
    exact = SamplerConfig(steps=16, gen_length=16, block_length=4, stop_at_eos=False)
    # (no threshold: this random model predicts the mask token, which threshold decoding never does)
    refreshed = SamplerConfig(**{**exact.__dict__, "cache": "dual", "cache_refresh_every": 1})
    block_starts = SamplerConfig(**{**exact.__dict__, "cache": "dual"})
    with torch.no_grad():
        a, b = (generate(logits, prompt, config=c, **ids) for c in (exact, refreshed))
        c, d = (generate(m, prompt, config=block_starts, **ids) for m in (logits, ref))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.reveal_step, b.reveal_step)
    assert torch.equal(c.ids, d.ids) and torch.equal(c.reveal_step, d.reveal_step)
    assert not torch.equal(a.ids, c.ids)  # premise: the block-start cache is an approximation here


# ---------------------------------------------------------------------------------------------
# h. No warnings
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _everything_warned():
    """The Python warnings and transformers' log records (WARNING and above) raised inside, as
    strings. transformers' `warning_once` remembers what it already said in this process: its
    memory is cleared first, so a message said earlier still shows."""
    said = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(f"{record.name}: {record.getMessage()}")
    logger, verbosity = hf_logging.get_logger(), hf_logging.get_verbosity()
    logging.Logger.warning_once.cache_clear()
    hf_logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield said
        said.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)


def test_forward_warns_about_nothing_with_and_without_the_cache():
    _, hf = _pair()
    ids = _ids(2, 12, seed=11)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad(), _everything_warned() as said:
        hf(ids).logits
        hf(ids, attention_mask=mask, use_cache=False, output_hidden_states=True).hidden_states
        out = hf(ids, attention_mask=mask, use_cache=True)
        assert out.past_key_values is out.cache and out["cache"] is out.cache
        window = hf(ids[:, 4:8], attention_mask=mask, past_key_values=out.past_key_values,
                    cache_position=torch.arange(4, 8), logits_positions=torch.tensor([0, 3]))
        window.logits, window.past_key_values
        hf(ids, past_key_values=LLaDAKVCache(), return_dict=False)
        hf(ids, logits_positions=slice(2, 6)).to_tuple()
    assert said == []


def test_the_capture_sees_transformers_deprecation_of_the_old_cache_name():
    """Control: the output class this code used before, handed the cache as `past_key_values`,
    warns under transformers versions that renamed the field to `cache` (5.24 on), and does so
    in every capture, not only the first of the process."""
    if "cache" not in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}:
        pytest.skip("this transformers version has no cache rename to warn about")
    for _ in range(2):
        with _everything_warned() as said:
            CausalLMOutputWithPast(logits=torch.zeros(1), past_key_values=LLaDAKVCache())
        assert any("past_key_values" in line and "deprecated" in line for line in said), said


# ---------------------------------------------------------------------------------------------
# i. Logits at selected positions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_tying", [False, True])
def test_logits_at_positions_equal_the_whole_logits_there(weight_tying):
    _, hf = _pair(weight_tying)
    ids = _ids(2, 16, seed=12)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    picked = torch.tensor([9, 3, 15, 9])  # unsorted, repeated
    with torch.no_grad():
        for attention_mask in (None, mask):
            whole = hf(ids, attention_mask=attention_mask).logits
            at = hf(ids, attention_mask=attention_mask, logits_positions=picked).logits
            assert at.shape == (2, 4, SHAPE["vocab_size"])
            torch.testing.assert_close(at, whole[:, picked], atol=1e-6, rtol=0)
            block = hf(ids, attention_mask=attention_mask, logits_positions=slice(8, 12)).logits
            torch.testing.assert_close(block, whole[:, 8:12], atol=1e-6, rtol=0)
            assert (block - whole[:, 9:13]).abs().max().item() > 1e-2  # control: other positions


def test_logits_at_positions_with_the_cache():
    """Filling a cache with selected logits fills it whole; a window's selected logits count
    from the window's start and equal its whole logits there."""
    _, hf = _pair()
    ids = _ids(2, 20, seed=13)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        full_cache = hf(ids, attention_mask=mask, use_cache=True).past_key_values
        out = hf(ids, attention_mask=mask, use_cache=True, logits_positions=slice(8, 12))
        assert out.past_key_values.length == 20
        for layer in range(SHAPE["n_layers"]):
            torch.testing.assert_close(out.past_key_values.keys[layer], full_cache.keys[layer], atol=0, rtol=0)
        window = dict(attention_mask=mask, past_key_values=out.past_key_values,
                      cache_position=torch.arange(8, 20))
        whole = hf(ids[:, 8:], **window).logits
        block = hf(ids[:, 8:], **window, logits_positions=slice(0, 4)).logits
        picked = hf(ids[:, 8:], **window, logits_positions=torch.tensor([1, 11])).logits
    torch.testing.assert_close(out.logits, hf(ids, attention_mask=mask).logits[:, 8:12], atol=1e-6, rtol=0)
    torch.testing.assert_close(block, whole[:, :4], atol=1e-6, rtol=0)
    torch.testing.assert_close(picked, whole[:, [1, 11]], atol=1e-6, rtol=0)
    assert (picked - whole[:, [2, 10]]).abs().max().item() > 1e-2  # control: other positions


@pytest.mark.parametrize("positions", [torch.tensor([[1, 2]]), torch.tensor([1.0]), [1, 2]])
def test_bad_logits_positions_are_refused(positions):
    _, hf = _pair()
    with pytest.raises(ValueError, match="logits_positions must be None, a slice or a 1-D LongTensor"):
        hf(_ids(1, 4), logits_positions=positions)
