"""Shape and behaviour of a LLaDA-family transformer, and the named presets.

Lives in `parallel/` because the model module is built from it and `parallel` never imports
`pretrain`; the training config embeds it. Field names follow the released checkpoints'
`config.json` where one exists (d_model, n_heads, n_kv_heads, mlp_hidden_size, ...), so
export and import are a field copy.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    mlp_hidden_size: int = 344
    vocab_size: int = 1024
    max_sequence_length: int = 256
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    # True only for the autoregressive baseline: the same blocks with a causal mask.
    causal: bool = False
    init_fn: str = "mitchell"
    init_cutoff_factor: float = 3.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def differences(self, other: "ModelConfig", ignore: tuple[str, ...] = ()) -> list[str]:
        """'field: mine vs other' for every field that differs (those in `ignore` aside)."""
        return [f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self)
                if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)]

    def problems(self) -> list[str]:
        """Every inconsistency, as 'field: what is wrong; the fix' lines (empty when valid)."""
        out = []
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size",
                     "vocab_size", "max_sequence_length"):
            if getattr(self, name) <= 0:
                out.append(f"model.{name}: must be positive, got {getattr(self, name)}")
        if out:
            return out
        if self.d_model % self.n_heads:
            out.append(f"model.n_heads: {self.n_heads} does not divide model.d_model "
                       f"{self.d_model}; pick a head count that divides it")
        elif self.head_dim % 2:
            out.append(f"model.n_heads: head dim {self.head_dim} is odd; RoPE needs an even one")
        if self.n_heads % self.n_kv_heads:
            out.append(f"model.n_kv_heads: {self.n_kv_heads} does not divide model.n_heads "
                       f"{self.n_heads} (grouped-query attention needs whole groups)")
        if self.init_fn != "mitchell":
            out.append(f"model.init_fn: only 'mitchell' (the released scheme) is supported, "
                       f"got {self.init_fn!r}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            out.append("model.rope_theta / model.rms_norm_eps: must be positive")
        return out


_LLADA_VOCAB = 126464

PRESETS: dict[str, ModelConfig] = {
    # The embedded demo's model (1M parameters, grouped-query attention): small enough to take
    # the ~2000 optimizer steps a masked diffusion model needs before it uses context, on two
    # CPU cores in about five minutes.
    "tiny": ModelConfig(),
    # Paper Table 5.
    "llada_1b": ModelConfig(d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                            mlp_hidden_size=5634, vocab_size=_LLADA_VOCAB,
                            max_sequence_length=4096),
    "llada_8b": ModelConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                            mlp_hidden_size=12288, vocab_size=_LLADA_VOCAB,
                            max_sequence_length=4096),
    # The paper's autoregressive baselines: ARM 1B has LLaDA 1B's shape; ARM 7B its own.
    "arm_1b": ModelConfig(d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                          mlp_hidden_size=5634, vocab_size=_LLADA_VOCAB,
                          max_sequence_length=4096, causal=True),
    "arm_7b": ModelConfig(d_model=4096, n_layers=28, n_heads=32, n_kv_heads=8,
                          mlp_hidden_size=13440, vocab_size=_LLADA_VOCAB,
                          max_sequence_length=4096, causal=True),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name])
