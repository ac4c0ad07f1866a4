"""Defaults that other Hugging Face libraries look up by model type.

PEFT: `LoraConfig()` without `target_modules` looks the model type up in
`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`. hf_mamba's default is every Mamba projection;
`conv1d` (depthwise) and the SSM parameters A_log, D stay frozen unless named.

Importing hf_mamba does not import PEFT: PEFT imports bitsandbytes, which costs seconds and may
reach for the Hub. The default is added when PEFT's constants module is first imported (or at once
when it already is).
"""

import importlib.abc
import importlib.util
import sys

LORA_TARGET_MODULES = ["in_proj", "x_proj", "dt_proj", "out_proj"]
PEFT_CONSTANTS = "peft.utils.constants"


def register_peft_target_modules(model_type: str = "hf_mamba") -> bool:
    """Make `LoraConfig()` default to LORA_TARGET_MODULES for `model_type`; False when PEFT is not installed."""

    def add_default(constants) -> None:
        # LoraModel.target_module_mapping is this same dict object, so adding the key is enough.
        mapping = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
        mapping.setdefault(model_type, list(LORA_TARGET_MODULES))

    if PEFT_CONSTANTS in sys.modules:
        add_default(sys.modules[PEFT_CONSTANTS])
        return True
    if importlib.util.find_spec("peft") is None:
        return False
    sys.meta_path.insert(0, _AfterImport(PEFT_CONSTANTS, add_default))
    return True


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `callback(module)` right after the module named `name` is first executed, then steps aside."""

    def __init__(self, name, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name or self not in sys.meta_path:
            return None
        sys.meta_path.remove(self)
        spec = next(
            (found for finder in sys.meta_path if (found := finder.find_spec(fullname, path, target)) is not None),
            None,
        )
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def execute_then_call_back(module):
            execute(module)
            self.callback(module)

        spec.loader.exec_module = execute_then_call_back
        return spec


__all__ = ["LORA_TARGET_MODULES", "register_peft_target_modules"]
