"""Model state on disk: training checkpoints that are complete or absent (`store`), whole
weights under the released names loaded into any layout (`weights`), the optimizer state
under the same names for a resume in another layout (`optimizer_state`), files published
atomically (`atomic`), the released Hugging Face format (`hf_format`, `hf_export`,
`hf_modeling/`), and streamed safetensors I/O. Used by training, inference and the
export/import commands."""
