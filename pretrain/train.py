"""Pretrain or fine-tune: `python -m pretrain.train --config FILE [section.field=value ...]`.

`--resume auto|DIR` continues a run, `--dry-run` prints the rank layout, the memory plan and the
DeepSpeed config and stops. Flags and exit codes: `pretrain.training.entry`; the loop:
`pretrain.training.loop`.
"""

import sys

from pretrain.training.entry import main

if __name__ == "__main__":
    sys.exit(main())
