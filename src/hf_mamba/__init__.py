"""hf_mamba: Mamba, the selective state space model, as a native Hugging Face Transformers model.

Importing the package registers model type "hf_mamba" with AutoConfig, AutoModel,
AutoModelForCausalLM and AutoModelForSequenceClassification.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .cache import MambaCache
from .configuration_mamba import MambaConfig
from .integrations import register_peft_target_modules
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

__all__ = [
    "MambaCache",
    "MambaConfig",
    "MambaForCausalLM",
    "MambaForSequenceClassification",
    "MambaModel",
    "MambaPreTrainedModel",
]
