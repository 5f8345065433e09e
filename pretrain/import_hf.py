"""Import a released-layout LLaDA directory as the starting point of a training run.

`python -m pretrain.import_hf --hf DIR --out DIR [--config RUN.yaml] [section.field=value ...]`

DIR is a directory in the released Hugging Face layout (a download of GSAI-ML/LLaDA-8B-Base
works as it is, as does this stack's own export). The output is a weights checkpoint: the whole
weights as `model.safetensors` (names and dtype unchanged), the run config as `config.yaml`
(the model section from the release's config.json, `train.init_from` pointing at this
directory), `tokenizer.json`, and `imported.json` (where it came from). Start continued
pretraining or SFT with `python -m pretrain.train --config OUT/config.yaml` (or
`train.init_from=OUT` in any config): every rank reads each tensor whole and keeps its own
tensor-parallel slice and ZeRO-3 partition, so one import serves every layout. The import
checks what it can up front: names and shapes against the model (every mismatch listed),
the architecture fields of config.json, the tokenizer's special ids against config.json, and
the run config's layout (tensor-parallel divisibility) and model section, if one is given.
Tensors stream one at a time; the directory appears only once complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from data_pipeline.tokenizer import check_fits_model, load_tokenizer
from pretrain.checkpoint.hf_format import FormatError, expected_tensors, model_config_from_released, require_tensors
from pretrain.checkpoint.safetensors_stream import PlannedTensor, read_directory, read_tensor, write_file
from pretrain.checkpoint.weights import new_directory
from pretrain.training.config import ConfigError, RunConfig, load_config, validate_parallel

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
            raise FileNotFoundError(f"--hf {hf_dir}: no config.json; expected a directory in the released "
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
    problems = validate_parallel(run)
    if problems:
        raise ConfigError("\n".join(problems))
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, help="a directory in the released LLaDA layout")
    parser.add_argument("--out", required=True, help="the directory to create")
    parser.add_argument("--config", help="the run config the weights are for (layout, data, ...); "
                        "its model section must be the release's")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides of --config")
    args = parser.parse_args(argv)
    try:
        run = load_config(args.config, args.overrides, check_paths=False)
        import_release(args.hf, args.out, run, check_model=args.config is not None)
    except (ConfigError, FormatError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"import error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
