"""What the tests share and are not tests: the multi-rank workers that `torchrun` and `deepspeed`
launch (`multirank_*_worker.py`, `hf_export_worker.py`), the tiny checkpoints several tests
sample from (`tiny_checkpoints.py`), transcriptions of the official reference code
(`official_reverse_process.py`, `fast_dllm_reference.py`) and lm-eval task files."""
