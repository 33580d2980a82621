"""PEFT's LoRA config fields, as data: what PEFT 0.21 writes, what fastlora reads,
its per-architecture default ``target_modules`` and its field names.

Nothing here imports peft; the adapter files (:mod:`fastlora.peft_io`) and
:class:`fastlora.LoRAConfig` (``from_peft``, PEFT's field names) share it.
"""

from __future__ import annotations

# Every field PEFT 0.21.2 writes for a LoRA adapter, with its default. On load,
# a field outside this table is an error (we cannot know what it means); a
# field inside it whose value differs from the default must be one we handle.
PEFT_LORA_DEFAULTS: dict = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": "0.21.2",
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}
# Fields whose value we read (any value is fine as long as it is well-formed).
HANDLED = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "exclude_modules", "inference_mode",
    "init_lora_weights", "lora_alpha", "lora_dropout", "modules_to_save", "peft_type", "peft_version", "r",
    "rank_pattern", "revision", "target_modules", "task_type", "use_rslora", "megatron_core", "qalora_group_size",
    "loftq_config", "use_dora", "fan_in_fan_out",
}

# What PEFT 0.21.2 writes for a VeRA and an AdaLoRA adapter, with the defaults.
PEFT_VERA_DEFAULTS: dict = {
    "auto_mapping": None, "base_model_name_or_path": None, "bias": "none", "d_initial": 0.1, "fan_in_fan_out": False,
    "inference_mode": True, "init_weights": True, "layers_pattern": None, "layers_to_transform": None,
    "modules_to_save": None, "peft_type": "VERA", "peft_version": "0.21.2", "projection_prng_key": 0, "r": 256,
    "revision": None, "save_projection": True, "target_modules": None, "task_type": None, "vera_dropout": 0.0,
}  # fmt: skip
VERA_HANDLED = {
    "auto_mapping", "base_model_name_or_path", "d_initial", "fan_in_fan_out", "inference_mode", "modules_to_save",
    "peft_type", "peft_version", "projection_prng_key", "r", "revision", "save_projection", "target_modules",
    "task_type", "vera_dropout",
}  # fmt: skip
PEFT_ADALORA_DEFAULTS: dict = {
    **PEFT_LORA_DEFAULTS, "peft_type": "ADALORA", "beta1": 0.85, "beta2": 0.85, "deltaT": 1, "init_r": 12,
    "orth_reg_weight": 0.5, "rank_pattern": None, "target_r": 8, "tfinal": 0, "tinit": 0, "total_step": None,
}  # fmt: skip
ADALORA_HANDLED = HANDLED - {"use_dora", "use_rslora"} | {
    "beta1", "beta2", "deltaT", "init_r", "orth_reg_weight", "target_r", "tfinal", "tinit", "total_step",
}  # fmt: skip

# PEFT 0.21's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` (peft/utils/constants.py):
# what ``target_modules=None`` means for a transformers model of each ``model_type``.
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"], "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}  # fmt: skip

# PEFT's field names accepted by apply_lora / LoRAConfig.from_peft -> fastlora's.
ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}


def init_from_peft(value, what: str = "init_lora_weights") -> str:
    """fastlora's ``init`` for PEFT's ``init_lora_weights`` (True -> "default")."""
    if value is True:
        return "default"
    if isinstance(value, str) and value in ("gaussian", "pissa", "olora") or (
        isinstance(value, str) and value.startswith("pissa_niter_")
    ):
        return value
    raise ValueError(
        f"{what}={value!r} is not supported: fastlora initialises LoRA adapters as PEFT's True (the default), "
        "'gaussian', 'pissa', 'pissa_niter_<N>' or 'olora'"
    )


def model_type(model) -> str | None:
    """A transformers model's ``config.model_type`` (None for other modules)."""
    config = getattr(model, "config", None)
    value = getattr(config, "model_type", None) if config is not None else None
    return value if isinstance(value, str) else None


def default_target_modules(model):
    """PEFT's ``target_modules=None`` for ``model``: its architecture's default for a
    transformers model (a ValueError, as in PEFT, for a type without one); None
    (every linear layer: fastlora's rule) for any other module."""
    kind = model_type(model)
    if kind is None:
        return None
    if kind not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"target_modules=None: PEFT 0.21 has no default target modules for model_type {kind!r}, and neither "
            "does fastlora; pass target_modules (e.g. 'all-linear', or a list of module names such as ['q_proj', 'v_proj'])"
        )
    value = DEFAULT_TARGET_MODULES[kind]
    return list(value) if isinstance(value, list) else value


def unsupported_fields(fields: dict, defaults: dict | None = None, handled: set | None = None) -> list[str]:
    """PEFT config fields set to something other than their default that fastlora
    does not implement (sorted); unknown fields are the caller's to refuse.
    ``defaults`` / ``handled``: another peft_type's tables (LoRA's by default)."""
    defaults = PEFT_LORA_DEFAULTS if defaults is None else defaults
    handled = HANDLED if handled is None else handled
    return sorted(
        k for k, v in fields.items()
        if k in defaults and k not in handled and v != defaults[k] and not (v in (None, [], {}) and not defaults[k])
    )  # fmt: skip


__all__ = [
    "ADALORA_HANDLED",
    "ALIASES",
    "DEFAULT_TARGET_MODULES",
    "HANDLED",
    "PEFT_ADALORA_DEFAULTS",
    "PEFT_LORA_DEFAULTS",
    "PEFT_VERA_DEFAULTS",
    "VERA_HANDLED",
    "default_target_modules",
    "init_from_peft",
    "model_type",
    "unsupported_fields",
]
