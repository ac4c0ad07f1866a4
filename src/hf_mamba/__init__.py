"""hf_mamba: Mamba, the selective state space model, as a native Hugging Face Transformers model.

Importing the package registers model type "hf_mamba" with AutoConfig, AutoModel,
AutoModelForCausalLM and AutoModelForSequenceClassification. Transformers-format "mamba" folders load
with hf_mamba's classes directly (`hf_mamba.MambaForCausalLM.from_pretrained(folder)`); to have the Auto
classes pick hf_mamba for them too, call `hf_mamba.register_as_default_mamba()`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .cache import MambaCache
from .configuration_mamba import MambaConfig
from .generation import generate_after_prefill, prefill_in_chunks
from .integrations import register_peft_target_modules
from .loading import MissingModelFileError, ModelFolderError, check_model_folder, check_tokenizer_fits
from .modeling_mamba import (
    MambaForCausalLM,
    MambaForSequenceClassification,
    MambaModel,
    MambaPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(MambaConfig.model_type, MambaConfig, exist_ok=True)
AutoModel.register(MambaConfig, MambaModel, exist_ok=True)
AutoModelForCausalLM.register(MambaConfig, MambaForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(MambaConfig, MambaForSequenceClassification, exist_ok=True)
register_peft_target_modules(MambaConfig.model_type)


def register_as_default_mamba(enabled: bool = True) -> None:
    """Make the Auto classes load Transformers-format "mamba" and "falcon_mamba" folders as hf_mamba models
    (opt-in, process-wide).

    After it, `AutoModelForCausalLM.from_pretrained("state-spaces/mamba-130m-hf")` returns an
    `hf_mamba.MambaForCausalLM` (whose config, and anything it saves, says model type "hf_mamba").
    `register_as_default_mamba(False)` gives both types back to Transformers' built-in classes.
    """
    for model_type in ("mamba", "falcon_mamba"):
        if enabled:  # the Auto model mappings key on MambaConfig, which reads both types' config.json
            CONFIG_MAPPING.register(model_type, MambaConfig, exist_ok=True)
        else:
            CONFIG_MAPPING._extra_content.pop(model_type, None)  # the built-in entry underneath shows again


__all__ = [
    "MambaCache",
    "MissingModelFileError",
    "ModelFolderError",
    "MambaConfig",
    "MambaForCausalLM",
    "MambaForSequenceClassification",
    "MambaModel",
    "MambaPreTrainedModel",
    "check_model_folder",
    "check_tokenizer_fits",
    "generate_after_prefill",
    "prefill_in_chunks",
    "register_as_default_mamba",
]
