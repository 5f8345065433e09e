"""Export to and import from the released LLaDA Hugging Face format.

- A model trained single-process, one trained with ZeRO-3 on 2 ranks and one trained with TP=2
  are exported (bf16) and loaded with `AutoModel.from_pretrained(out, trust_remote_code=True)`
  in a subprocess that cannot import this project: each gives its training model's logits
  within bf16 tolerance, and (control) not another layout's model's logits.
- The tokenizer files load with `AutoTokenizer` and give the project's ids, chat template
  included.
- Names, shapes and dtypes equal the released list (written out here from the release's
  index: 291 tensors at 8B); config.json carries every released field.
- export -> import reproduces the training weights exactly (fp32) or their bf16 rounding, and in
  every layout a fresh engine started from the import (`train.init_from`) gives the trained
  engine's logits exactly, also after an optimizer step (control: weights written after the
  engine exists are reverted by that step); import -> export reproduces a released-format
  directory bit for bit.
- Mismatched names and shapes are listed; unsupported architecture fields and occupied output
  directories are refused.
- The peak resident memory of an export stays within a few times the largest tensor, while
  loading the whole file (control) does not.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from support.ports import free_port
from support.tiny_checkpoints import stdlib_tokenizer, write_checkpoint

from data_pipeline.tokenizer import load_tokenizer
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig, preset
from pretrain.checkpoint.hf_export import export
from pretrain.checkpoint.hf_format import FormatError, expected_tensors
from pretrain.export_hf import main as export_main
from pretrain.import_hf import main as import_main
from pretrain.training.init_from_release import import_release

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = ("single", "zero3", "tp2")

# Every field name of the released LLaDA-8B-Base/-Instruct config.json.
RELEASED_CONFIG_KEYS = {
    "activation_type", "alibi", "alibi_bias_max", "architectures", "attention_dropout",
    "attention_layer_norm", "attention_layer_norm_with_affine", "auto_map", "bias_for_layer_norm",
    "block_group_size", "block_type", "d_model", "embedding_dropout", "embedding_size",
    "eos_token_id", "flash_attention", "include_bias", "include_qkv_bias", "init_cutoff_factor",
    "init_device", "init_fn", "init_std", "input_emb_norm", "layer_norm_type",
    "layer_norm_with_affine", "mask_token_id", "max_sequence_length", "mlp_hidden_size",
    "mlp_ratio", "model_type", "multi_query_attention", "n_heads", "n_kv_heads", "n_layers",
    "pad_token_id", "precision", "residual_dropout", "rms_norm_eps", "rope", "rope_full_precision",
    "rope_theta", "scale_logits", "transformers_version", "use_cache", "vocab_size", "weight_tying",
}


def released_tensor_list(n_layers: int, d: int, kv: int, ffn: int, vocab: int) -> dict[str, tuple]:
    """The release's tensor names and shapes, as its model.safetensors.index.json lists them."""
    out = {"model.transformer.wte.weight": (vocab, d), "model.transformer.ln_f.weight": (d,),
           "model.transformer.ff_out.weight": (vocab, d)}
    for i in range(n_layers):
        block = f"model.transformer.blocks.{i}."
        out.update({block + "attn_norm.weight": (d,), block + "ff_norm.weight": (d,),
                    block + "q_proj.weight": (d, d), block + "k_proj.weight": (kv, d),
                    block + "v_proj.weight": (kv, d), block + "attn_out.weight": (d, d),
                    block + "ff_proj.weight": (ffn, d), block + "up_proj.weight": (ffn, d),
                    block + "ff_out.weight": (d, ffn)})
    return out


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a weights directory, through the official safetensors reader."""
    files = sorted(directory.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    stdlib_tokenizer(root / "tokenizer.json")
    return root


@pytest.fixture(scope="module")
def trained(work, subprocess_env) -> Path:
    """Checkpoints, logits and in-process round trips of the three layouts (hf_export_worker.py)."""
    worker = str(REPO / "tests" / "support" / "hf_export_worker.py")
    runs = [[sys.executable, worker, str(work), "single"],
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
             "127.0.0.1", "--master_port", str(free_port()), worker, str(work), "zero3", "tp2"]]
    for command in runs:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=subprocess_env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for layout in LAYOUTS:
        assert export_main(["--checkpoint", str(work / layout / "checkpoints"),
                            "--out", str(work / layout / "hf"), "--max-shard-size", "100KB"]) == 0
    return work


HF_LOADER = textwrap.dedent('''
    import importlib.abc, json, sys
    import torch

    class NoProject(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("pretrain", "parallel", "data_pipeline"):
                raise ImportError(f"the export must not import {name}")

    sys.meta_path.insert(0, NoProject())
    sys.path = [p for p in sys.path if p not in ("", ".", REPO)]
    from transformers import AutoModel, AutoTokenizer

    report = {}
    for layout, directory in DIRS.items():
        model = AutoModel.from_pretrained(directory, trust_remote_code=True).eval()
        saved = torch.load(directory + "/../logits.pt")
        with torch.no_grad():
            logits = model(saved["ids"]).logits.float()
        report[layout] = {"class": type(model).__name__, "dtype": str(next(model.parameters()).dtype),
                          "logits": logits.tolist()}
        tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
        report[layout]["encode"] = tok.encode(TEXT, add_special_tokens=False)
        report[layout]["chat"] = tok.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                         tokenize=False)
        report[layout]["chat_ids"] = tok.encode(report[layout]["chat"], add_special_tokens=False)
    print(json.dumps(report))
''')
TEXT = "def f(x):\n    return {'a': [1, 2]}\n"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count to 3"}]


@pytest.fixture(scope="module")
def loaded(trained, subprocess_env) -> dict:
    """The three exports loaded by transformers in a process that cannot import the project."""
    script = (f"REPO = {str(REPO)!r}\nDIRS = {json.dumps({l: str(trained / l / 'hf') for l in LAYOUTS})}\n"
              f"TEXT = {TEXT!r}\nMESSAGES = {MESSAGES!r}\n" + HF_LOADER)
    env = {k: v for k, v in subprocess_env.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(trained / "hf_home")  # the remote-code module cache
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=env, cwd=str(trained))
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_exports_load_with_transformers_and_give_the_training_logits(trained, loaded):
    training = {l: torch.load(trained / l / "logits.pt")["logits"] for l in LAYOUTS}
    for layout in LAYOUTS:
        hf = torch.tensor(loaded[layout]["logits"])
        assert loaded[layout]["class"] == "LLaDAModelLM"
        scale = training[layout].abs().max().item()
        error = (hf - training[layout]).abs().max().item()
        # bf16 weights (8 mantissa bits): a relative error of a few 2^-8
        assert error < 0.03 * scale, (layout, error, scale)
        for other in LAYOUTS:  # control: another layout trained on other data is far off
            if other != layout:
                assert (hf - training[other]).abs().max().item() > 0.1 * scale, (layout, other)


def test_exported_tokenizer_gives_the_project_ids_and_chat_format(trained, loaded):
    from data_pipeline.sft import ChatTemplate

    tok = load_tokenizer(trained / "tokenizer.json")
    chat = ChatTemplate(tok)
    prompt = chat.pairs(MESSAGES + [{"role": "assistant", "content": "1 2 3"}])[-1].prompt
    for layout in LAYOUTS:
        assert loaded[layout]["encode"] == tok.encode(TEXT)
        assert loaded[layout]["chat_ids"] == prompt, loaded[layout]["chat"]


def test_export_names_shapes_dtypes_and_config_are_the_released_ones(trained):
    llada_8b = preset("llada_8b")
    released_8b = released_tensor_list(32, 4096, 4096, 12288, 126464)
    assert len(released_8b) == 291 and expected_tensors(llada_8b) == released_8b

    from support.hf_export_worker import MODEL
    m = MODEL
    released = released_tensor_list(m.n_layers, m.d_model, m.n_kv_heads * m.head_dim,
                                     m.mlp_hidden_size, m.vocab_size)
    out = trained / "single" / "hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = tensors_of(out)
    assert set(index["weight_map"]) == set(released) == set(tensors)
    assert len(set(index["weight_map"].values())) > 1  # --max-shard-size 100KB: several shards
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    for name, shape in released.items():
        assert tuple(tensors[name].shape) == shape and tensors[name].dtype == torch.bfloat16, name

    config = json.loads((out / "config.json").read_text())
    assert RELEASED_CONFIG_KEYS <= set(config), RELEASED_CONFIG_KEYS - set(config)
    tok = load_tokenizer(trained / "tokenizer.json")
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_llada.LLaDAConfig",
                                  "AutoModel": "modeling_llada.LLaDAModelLM",
                                  "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
    assert (config["d_model"], config["n_layers"], config["n_kv_heads"], config["vocab_size"]) == \
        (m.d_model, m.n_layers, m.n_kv_heads, m.vocab_size)
    assert (config["mask_token_id"], config["eos_token_id"]) == (tok.mask_id, tok.eos_id)
    for name in ("configuration_llada.py", "modeling_llada.py", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert "import pretrain" not in (out / "modeling_llada.py").read_text()


def test_export_then_import_reproduces_the_training_weights(trained, tmp_path):
    checkpoint = trained / "single" / "checkpoints" / "step_00000002"
    weights = tensors_of(checkpoint)
    for layout in LAYOUTS:  # fp32 round trips inside the worker: fresh engines from the import
        roundtrip = json.loads((trained / layout / "roundtrip.json").read_text())
        assert roundtrip["import_logits_diff"] == 0.0, (layout, roundtrip)
        assert roundtrip["late_load_logits_diff"] > 1e-2, (layout, roundtrip)
    imported = tensors_of(trained / "single" / "imported")
    assert all(torch.equal(imported[n], weights[n]) for n in weights) and set(imported) == set(weights)

    assert import_main(["--hf", str(trained / "single" / "hf"), "--out", str(tmp_path / "bf16")]) == 0
    rounded = tensors_of(tmp_path / "bf16")
    assert all(torch.equal(rounded[n], weights[n].to(torch.bfloat16)) for n in weights)
    config = (tmp_path / "bf16" / "config.yaml").read_text()
    assert f"init_from: {tmp_path / 'bf16'}" in config


def write_released_dir(directory: Path, tokenizer: Path, model: ModelConfig, mutate=None) -> None:
    """A directory in the released format, written with the official safetensors writer: random
    bf16 tensors in two files with an index, config.json, tokenizer.json."""
    directory.mkdir(parents=True)
    tok = load_tokenizer(tokenizer)
    kv = model.n_kv_heads * model.head_dim
    shapes = released_tensor_list(model.n_layers, model.d_model, kv, model.mlp_hidden_size, model.vocab_size)
    gen = torch.Generator().manual_seed(5)
    tensors = {n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in shapes.items()}
    if mutate:
        mutate(tensors)
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file_name, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(directory / file_name), metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {n: f for f, part in halves.items() for n in part}}))
    config = {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": model.d_model,
              "n_layers": model.n_layers, "n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads,
              "mlp_hidden_size": model.mlp_hidden_size, "mlp_ratio": 4, "vocab_size": model.vocab_size,
              "embedding_size": model.vocab_size, "max_sequence_length": model.max_sequence_length,
              "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "weight_tying": False, "alibi": False,
              "rope": True, "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
              "include_bias": False, "init_cutoff_factor": None, "mask_token_id": tok.mask_id,
              "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.json").write_bytes(tokenizer.read_bytes())


RELEASE_SHAPE = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=160,
                            vocab_size=320, max_sequence_length=128)


def test_import_then_export_reproduces_a_released_directory(work, tmp_path):
    release = tmp_path / "release"
    write_released_dir(release, work / "tokenizer.json", RELEASE_SHAPE)
    import_release(release, tmp_path / "imported")
    export(tmp_path / "imported", tmp_path / "exported")
    original, again = tensors_of(release), tensors_of(tmp_path / "exported")
    assert set(original) == set(again)
    for name in original:
        assert again[name].dtype == torch.bfloat16 and torch.equal(again[name], original[name]), name


def test_mismatched_names_and_shapes_are_listed(work, tmp_path, capsys):
    def damage(tensors):
        tensors.pop("model.transformer.blocks.1.up_proj.weight")
        tensors["model.transformer.blocks.0.q_proj.weight"] = torch.zeros(64, 32, dtype=torch.bfloat16)
        tensors["model.transformer.blocks.0.q_proj.bias"] = torch.zeros(64, dtype=torch.bfloat16)

    write_released_dir(tmp_path / "damaged", work / "tokenizer.json", RELEASE_SHAPE, mutate=damage)
    assert import_main(["--hf", str(tmp_path / "damaged"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "missing: model.transformer.blocks.1.up_proj.weight" in err
    assert "unexpected: model.transformer.blocks.0.q_proj.bias" in err
    assert "wrong shape: model.transformer.blocks.0.q_proj.weight is [64, 32], expected [64, 64]" in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_unsupported_architecture_and_occupied_out_are_refused(work, tmp_path, capsys):
    write_released_dir(tmp_path / "release", work / "tokenizer.json", RELEASE_SHAPE)
    config_path = tmp_path / "release" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "alibi": True, "block_type": "sequential"}))
    with pytest.raises(FormatError, match="alibi is True; only False is supported.*block_type"):
        import_release(tmp_path / "release", tmp_path / "out")
    config_path.write_text(json.dumps(config))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert import_main(["--hf", str(tmp_path / "release"), "--out", str(tmp_path / "taken")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_import_checks_the_run_config_model_and_layout(work, tmp_path, capsys):
    write_released_dir(tmp_path / "release", work / "tokenizer.json", RELEASE_SHAPE)
    run = tmp_path / "run.yaml"
    run.write_text("model:\n  preset: tiny\nparallel:\n  tensor_parallel: 2\n")
    assert import_main(["--hf", str(tmp_path / "release"), "--out", str(tmp_path / "a"),
                        "--config", str(run)]) == 2
    assert "model.d_model: 128 vs 64" in capsys.readouterr().err
    assert import_main(["--hf", str(tmp_path / "release"), "--out", str(tmp_path / "b"),
                        "parallel.tensor_parallel=3"]) == 2
    assert "parallel.tensor_parallel" in capsys.readouterr().err


MEMORY_PROBE = textwrap.dedent('''
    import json, sys
    from parallel.model_config import ModelConfig
    from pretrain.checkpoint.hf_export import export
    from pretrain.checkpoint.hf_format import expected_tensors
    from safetensors.torch import load_file

    expected_tensors(ModelConfig())  # loads torch's meta-device machinery once (~70 MB of code)

    def status_mb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

    def growth_of(fn):
        """How far the resident set's high-water mark rises above the current size during fn."""
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident size
        base = status_mb("VmRSS")
        result = fn()
        return status_mb("VmHWM") - base, result

    grown, _ = growth_of(lambda: export(sys.argv[1], sys.argv[2], log=lambda *a: None))
    control, _ = growth_of(lambda: [t.sum() for t in load_file(sys.argv[1] + "/model.safetensors").values()])
    print(json.dumps({"export": grown, "control": control}))
''')


def test_export_peak_memory_stays_near_the_largest_tensor(work, tmp_path, subprocess_env):
    model = ModelConfig(d_model=1024, n_layers=4, n_heads=8, n_kv_heads=8, mlp_hidden_size=2816,
                        vocab_size=8192, max_sequence_length=64)
    weights = {n: p.detach() for n, p in LLaDAModel(model, init_seed=0).named_parameters()}
    checkpoint = write_checkpoint(tmp_path / "big", weights, model, work / "tokenizer.json")
    largest_mb = max(t.numel() * 4 for t in weights.values()) / 2 ** 20
    total_mb = sum(t.numel() * 4 for t in weights.values()) / 2 ** 20
    del weights
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(checkpoint), str(tmp_path / "hf")],
                          capture_output=True, text=True, timeout=300, env=subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    grown, control = r["export"], r["control"]
    print(f"largest tensor {largest_mb:.0f} MB, model {total_mb:.0f} MB: export grew the peak by "
          f"{grown:.0f} MB, loading the whole file by {control:.0f} MB")
    assert total_mb > 6 * largest_mb  # the model is much larger than its largest tensor
    assert grown < 3 * largest_mb, r
    assert control > 3 * largest_mb, r  # the measurement can fail
