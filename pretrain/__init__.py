"""The LLaDA stack's commands and library.

The modules at this level are the commands (`python -m pretrain.X`): train, generate, chat,
evaluate, export_hf, import_hf, profile, lm_eval_adapter and recipe_entry, each a thin door
(flags, then one call) over the sub-packages. The sub-packages import downward only:
evaluation -> training / inference -> diffusion / runtime / checkpoint -> `parallel` and
`data_pipeline`; training and inference never import each other.
"""
