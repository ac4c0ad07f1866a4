"""Defaults that other Hugging Face libraries look up by model type.

PEFT: `LoraConfig()` without `target_modules` looks the model type up in
`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`. hf_mamba's default is every Mamba projection;
`conv1d` (depthwise) and the SSM parameters A_log, D stay frozen unless named.
"""

import importlib.util

LORA_TARGET_MODULES = ["in_proj", "x_proj", "dt_proj", "out_proj"]


def register_peft_target_modules(model_type: str = "hf_mamba") -> bool:
    """Make `LoraConfig()` default to LORA_TARGET_MODULES for `model_type`; False when PEFT is not installed."""
    if importlib.util.find_spec("peft") is None:
        return False
    # LoraModel.target_module_mapping is this same dict object, so adding the key is enough.
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(model_type, list(LORA_TARGET_MODULES))
    return True


__all__ = ["LORA_TARGET_MODULES", "register_peft_target_modules"]
