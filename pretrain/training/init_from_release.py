"""A released-format LLaDA directory turned into a weights checkpoint a training run starts from
(`python -m pretrain.import_hf`).

The output holds the whole weights as `model.safetensors` (names and dtype unchanged), the run
config as `config.yaml` (the model section from the release's config.json, `train.init_from`
pointing at the output), `tokenizer.json`, and `imported.json` (where it came from). Every rank
of a run started from it reads each tensor whole and keeps its own tensor-parallel slice and
ZeRO-3 partition, so one import serves every layout. The import checks what it can up front:
names and shapes against the model (every mismatch listed), the architecture fields of
config.json, the tokenizer's special ids against config.json, and the run config's layout
(tensor-parallel divisibility) and model section, if one is given. It writes a training run
config, hence its place in `pretrain.training`. Tensors stream one at a time; the directory
appears only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import yaml

from data_pipeline.tokenizer import check_fits_model, load_tokenizer
from pretrain.checkpoint.hf_format import FormatError, expected_tensors, model_config_from_released, require_tensors
from pretrain.checkpoint.safetensors_stream import PlannedTensor, read_directory, read_tensor, write_file
from pretrain.checkpoint.weights import new_directory
from pretrain.training.config import ConfigError, RunConfig, parallel_problems

IMPORTED = "imported.json"


def import_release(hf_dir: str | os.PathLike, out: str | os.PathLike, run: RunConfig | None = None,
                   check_model: bool = False, log=print) -> Path:
    """Write the weights checkpoint of `hf_dir` to `out` (which must not exist yet). `run`: the
    run config it is for (default: the defaults, training with the release's tokenizer); its
    model section becomes the release's, and with `check_model` must already equal it."""
    hf_dir, out = Path(hf_dir), Path(out).resolve()
    with new_directory(out) as tmp:
        config_path = hf_dir / "config.json"
        if not config_path.is_file():
            found = "no config.json" if hf_dir.is_dir() else "does not exist"
            raise FileNotFoundError(f"--hf {hf_dir}: {found}; expected a directory in the released "
                                    f"LLaDA layout (e.g. a download of GSAI-ML/LLaDA-8B-Base)")
        released = json.loads(config_path.read_text())
        model = model_config_from_released(released, str(config_path))
        entries = read_directory(hf_dir)
        expected = expected_tensors(model)
        require_tensors(entries, expected, f"--hf {hf_dir}: the weights do not match its config.json")
        tok = load_tokenizer(hf_dir / "tokenizer.json")
        check_fits_model(tok, model.vocab_size)
        for role, field in (("mask", "mask_token_id"), ("eos", "eos_token_id")):
            if released.get(field) is not None and released[field] != tok.special_ids[role]:
                raise FormatError(f"{config_path}: {field} is {released[field]} but tokenizer.json has "
                                  f"{tok.special_ids[role]}; the config and the tokenizer disagree")
        run = _run_config(run, model, tok, check_model, hf_dir, out)

        start = time.time()
        plan = [PlannedTensor(name, entries[name].torch_dtype, shape) for name, shape in expected.items()]
        write_file(tmp / "model.safetensors", plan, lambda name: read_tensor(entries[name]))
        shutil.copyfile(hf_dir / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "config.yaml").write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
        (tmp / IMPORTED).write_text(json.dumps({"source": str(hf_dir.resolve()),
                                                "released_config": released}, indent=2) + "\n")
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in plan})
    log(f"imported {hf_dir} -> {out}: {len(plan)} tensors ({', '.join(dtypes)}), "
        f"{sum(t.nbytes for t in plan) / 1e9:.3f} GB in {time.time() - start:.1f} s; train from it with "
        f"--config {out / 'config.yaml'} or train.init_from={out}")
    return out


def _run_config(run: RunConfig | None, model, tok, check_model: bool, hf_dir: Path, out: Path) -> RunConfig:
    """The run config written beside the weights: the release's model and tokenizer, starting
    from `out`; refused when its model (with check_model), tokenizer or layout do not fit."""
    if run is None:
        run = RunConfig()
    differences = run.model.differences(model) if check_model else []
    if differences:
        raise ConfigError("the run config's model is not the release's (config vs release); set "
                          "these in its model section:\n  model." + "\n  model.".join(differences))
    if run.data.tokenizer is None:
        run.data.tokenizer = str(out / "tokenizer.json")
    elif Path(run.data.tokenizer).is_file():
        configured = load_tokenizer(run.data.tokenizer)
        if (configured.special_ids, configured.vocab_size) != (tok.special_ids, tok.vocab_size):
            raise ConfigError(f"data.tokenizer: {run.data.tokenizer} is not the release's tokenizer "
                              f"(special ids or size differ); train with {hf_dir / 'tokenizer.json'}")
    run.model = model
    run.train.init_from = str(out)
    problems = parallel_problems(run)
    if problems:
        raise ConfigError("\n".join(problems))
    return run
