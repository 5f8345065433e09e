"""The configuration class of an exported LLaDA checkpoint, for `trust_remote_code` loading.

Copied beside the weights by the exporter, so it may import only `torch`, `transformers` and the
standard library. It accepts every field the released LLaDA-8B `config.json` writes, with the
released 8B values as defaults, so a released config loads unchanged and an export's config
loads in the released code. Works with transformers 4.46 through 5.x.
"""

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    """Field names are the released checkpoints' (OLMo-style: d_model, n_heads, ...); the
    standard Hugging Face names resolve to them through `attribute_map`."""

    model_type = "llada"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "num_key_value_heads": "n_kv_heads",
    }

    def __init__(
        self,
        activation_type="silu",
        alibi=False,
        alibi_bias_max=8.0,
        attention_dropout=0.0,
        attention_layer_norm=False,
        attention_layer_norm_with_affine=True,
        bias_for_layer_norm=False,
        block_group_size=1,
        block_type="llama",
        d_model=4096,
        embedding_dropout=0.0,
        embedding_size=126464,
        eos_token_id=126081,
        flash_attention=False,
        include_bias=False,
        include_qkv_bias=False,
        init_cutoff_factor=None,
        init_device="meta",
        init_fn="mitchell",
        init_std=0.02,
        input_emb_norm=False,
        layer_norm_type="rms",
        layer_norm_with_affine=True,
        mask_token_id=126336,
        max_sequence_length=4096,
        mlp_hidden_size=12288,
        mlp_ratio=4,
        multi_query_attention=None,
        n_heads=32,
        n_kv_heads=32,
        n_layers=32,
        pad_token_id=126081,
        precision="amp_bf16",
        residual_dropout=0.0,
        rms_norm_eps=1e-05,
        rope=True,
        rope_full_precision=True,
        rope_theta=500000.0,
        scale_logits=False,
        use_cache=False,
        vocab_size=126464,
        weight_tying=False,
        **kwargs,
    ):
        self.activation_type = activation_type
        self.alibi = alibi
        self.alibi_bias_max = alibi_bias_max
        self.attention_dropout = attention_dropout
        self.attention_layer_norm = attention_layer_norm
        self.attention_layer_norm_with_affine = attention_layer_norm_with_affine
        self.bias_for_layer_norm = bias_for_layer_norm
        self.block_group_size = block_group_size
        self.block_type = block_type
        self.d_model = d_model
        self.embedding_dropout = embedding_dropout
        self.embedding_size = embedding_size
        self.flash_attention = flash_attention
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.init_cutoff_factor = init_cutoff_factor
        self.init_device = init_device
        self.init_fn = init_fn
        self.init_std = init_std
        self.input_emb_norm = input_emb_norm
        self.layer_norm_type = layer_norm_type
        self.layer_norm_with_affine = layer_norm_with_affine
        self.mask_token_id = mask_token_id
        self.max_sequence_length = max_sequence_length
        self.mlp_hidden_size = mlp_hidden_size
        self.mlp_ratio = mlp_ratio
        self.multi_query_attention = multi_query_attention
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.n_layers = n_layers
        self.precision = precision
        self.residual_dropout = residual_dropout
        self.rms_norm_eps = rms_norm_eps
        self.rope = rope
        self.rope_full_precision = rope_full_precision
        self.rope_theta = rope_theta
        self.scale_logits = scale_logits
        # transformers 5 treats use_cache as a generation parameter and drops it from kwargs.
        self.use_cache = use_cache
        self.vocab_size = vocab_size
        self.weight_tying = weight_tying
        # The head is tied exactly when weight_tying says so (transformers 4 defaults it to True).
        kwargs["tie_word_embeddings"] = weight_tying
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)
