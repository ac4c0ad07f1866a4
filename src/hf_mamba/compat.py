"""The names that differ between the Transformers 5 releases hf_mamba supports, decided once.

Transformers 5.25 renamed gradient checkpointing to activation checkpointing: the model method
`activation_checkpointing_enable` and the `TrainingArguments` fields `activation_checkpointing` /
`activation_checkpointing_kwargs`; the old names still work there but raise a FutureWarning.
Earlier 5.x releases know only the old names. Code that should run quietly on both calls these.
"""

from transformers import PreTrainedModel
from transformers.utils import ModelOutput

# Transformers 5.24 renamed the cache of model outputs and forward arguments from `cache_params` to `cache`
# (its generate() reads and passes only `cache`; `outputs.cache_params` became a deprecated property). Earlier
# 5.x releases look for `cache_params`. Our outputs name the field as the installed release expects.
CACHE_FIELD = "cache" if isinstance(getattr(ModelOutput, "cache_params", None), property) else "cache_params"

# Whether the installed Transformers has the 5.25 names.
HAS_ACTIVATION_CHECKPOINTING = hasattr(PreTrainedModel, "activation_checkpointing_enable")


def enable_activation_checkpointing(model, use_reentrant: bool = False) -> None:
    """Turn on activation (gradient) checkpointing of every block, by the installed release's own name."""
    kwargs = {"use_reentrant": use_reentrant}
    if HAS_ACTIVATION_CHECKPOINTING:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_activation_checkpointing(model) -> None:
    if HAS_ACTIVATION_CHECKPOINTING:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def checkpointing_training_args(enabled: bool = True, use_reentrant: bool = False) -> dict:
    """`TrainingArguments` keywords that turn activation checkpointing on (or off), by the installed names."""
    # Imported here: transformers.training_args imports PEFT, and PEFT bitsandbytes (seconds, and a Hub lookup).
    from transformers import TrainingArguments

    fields = {field.name for field in TrainingArguments.__dataclass_fields__.values()}
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    args = {f"{prefix}_checkpointing": enabled}
    if enabled:
        args[f"{prefix}_checkpointing_kwargs"] = {"use_reentrant": use_reentrant}
    return args


__all__ = [
    "CACHE_FIELD",
    "HAS_ACTIVATION_CHECKPOINTING",
    "checkpointing_training_args",
    "disable_activation_checkpointing",
    "enable_activation_checkpointing",
]
