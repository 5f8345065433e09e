"""Import a released-format LLaDA directory as the starting point of a training run.

`python -m pretrain.import_hf --hf DIR --out DIR [--config RUN.yaml] [section.field=value ...]`

DIR is a directory in the released Hugging Face format (a download of GSAI-ML/LLaDA-8B-Base
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
Tensors stream one at a time; the directory appears only once complete. The import itself is
`pretrain.training.init_from_release`. A bad path, config, occupied --out or a release that does
not fit is reported on stderr (one line, or one problem per line) with exit code 2 (the README's
exit-code table).
"""

from __future__ import annotations

import argparse
import sys

from pretrain.checkpoint.weights import WEIGHTS_ERRORS
from pretrain.runtime.exit_codes import USAGE, command_failures, run_command
from pretrain.training.config import ConfigError, load_config
from pretrain.training.init_from_release import import_release


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, help="a directory in the released LLaDA format")
    parser.add_argument("--out", required=True, help="the directory to create")
    parser.add_argument("--config", help="the run config the weights are for (layout, data, ...); "
                        "its model section must be the release's")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides of --config")
    args = parser.parse_args(argv)
    return run_command(lambda: import_checkpoint(args),
                       command_failures("import_hf", dict.fromkeys((ConfigError, FileExistsError, *WEIGHTS_ERRORS),
                                                                   USAGE)))


def import_checkpoint(args: argparse.Namespace) -> int:
    run = load_config(args.config, args.overrides, check_paths=False)
    import_release(args.hf, args.out, run, check_model=args.config is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
