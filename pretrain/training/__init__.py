"""One training run: the typed config (`config`, loaded by `typed_yaml`), the launch layout and
memory plan (`layout`), data and engine set-up, the objective (`objective`: loss, held-out loss
and closing sample of mdm, arm or sft), the step's noise (`step_loss`), the learning-rate
schedule, the held-out loss, the resumable state (`state`), what a resume carries over into
the same or another layout (`resume_plan`), the steps of a run (`trainer`) and
the loop over them (`loop`); `entry` is the train command's flags and exit codes, and
`init_from_release` turns a released-format directory into a run's starting point. Used by the
train, profile and import_hf commands and the recipes."""
