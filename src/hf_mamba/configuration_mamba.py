"""MambaConfig: the same fields and defaults as Transformers' built-in `MambaConfig`, so a
`config.json` of a Transformers-format "mamba" checkpoint loads as it is, plus `scan_backend`,
`use_cuda_graph` and Falcon Mamba's `mixer_rms_eps` (a "falcon_mamba" config.json loads as it is too)."""

import math

from transformers import PretrainedConfig

from .kernels import BACKENDS as SCAN_BACKENDS

# Model types whose config.json has our fields: Transformers' Mamba and Falcon Mamba, and ours.
READABLE_MODEL_TYPES = ("mamba", "falcon_mamba", "hf_mamba")
FALCON_MAMBA_RMS_EPS = 1e-6  # Transformers' FalconMambaConfig default of mixer_rms_eps

ACTIVATIONS = ("silu", "swish", "gelu", "relu", "tanh")
TIME_STEP_INIT_SCHEMES = ("random", "constant")


class MambaConfig(PretrainedConfig):
    """Configuration of a Mamba (selective SSM) language model.

    Args:
        vocab_size: number of token ids.
        hidden_size: d_model, width of the residual stream.
        state_size: d_state, size N of the SSM state per channel.
        num_hidden_layers: number of Mamba blocks.
        layer_norm_epsilon: RMSNorm epsilon.
        expand: d_inner = expand * hidden_size.
        conv_kernel: d_conv, width of the causal depthwise convolution.
        use_bias: bias in in_proj and out_proj.
        use_conv_bias: bias in the convolution.
        hidden_act: activation after the convolution and on the gate.
        initializer_range: std of the normal init of embeddings.
        residual_in_fp32: keep the residual stream in fp32.
        time_step_rank: dt_rank, rank of the Δ projection; "auto" = ceil(hidden_size / 16).
        time_step_scale, time_step_min, time_step_max, time_step_init_scheme, time_step_floor: Δ initialisation
            (Δ log-uniform in [time_step_min, time_step_max], floored at time_step_floor).
        rescale_prenorm_residual: scale out_proj init by 1/sqrt(num_hidden_layers).
        scan_backend: force the selective-scan backend for the whole model ("reference", "torch", "triton"),
            None = fastest for the device. The environment variable HF_MAMBA_BACKEND overrides it.
        use_cuda_graph: on CUDA, decode each new token by replaying a CUDA graph of the whole step
            (captured once per cache), instead of launching every kernel from Python.
        mixer_rms_eps: Falcon Mamba. A number: the epsilon of three weight-free RMS norms on x_proj's output,
            over dt_rank on the time step (before dt_proj) and over d_state on B and on C. None: plain Mamba.
            A "falcon_mamba" config.json without it gets Transformers' default, 1e-6.
        intermediate_size: d_inner; default expand * hidden_size (a config.json that has it is taken as it says).
    """

    model_type = "hf_mamba"

    def __init__(
        self,
        vocab_size=50280,
        hidden_size=768,
        state_size=16,
        num_hidden_layers=32,
        layer_norm_epsilon=1e-5,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        expand=2,
        conv_kernel=4,
        use_bias=False,
        use_conv_bias=True,
        hidden_act="silu",
        initializer_range=0.1,
        residual_in_fp32=True,
        time_step_rank="auto",
        time_step_scale=1.0,
        time_step_min=0.001,
        time_step_max=0.1,
        time_step_init_scheme="random",
        time_step_floor=1e-4,
        rescale_prenorm_residual=False,
        use_cache=True,
        tie_word_embeddings=True,
        scan_backend=None,
        use_cuda_graph=True,
        mixer_rms_eps=None,
        intermediate_size=None,
        **kwargs,
    ):
        # Fields of the built-in configs that only steer their fallback paths; ours has one dispatch point.
        for ignored in ("use_mambapy", "use_falcon_mambapy", "use_associative_scan"):
            kwargs.pop(ignored, None)
        # A config read from a Transformers "mamba" or "falcon_mamba" folder names that type; this config (and what
        # it saves) is hf_mamba's, so PEFT, Trainer and the Auto classes see hf_mamba whatever folder it came from.
        source_type = kwargs.pop("model_type", None)
        if source_type == "falcon_mamba" and mixer_rms_eps is None:
            mixer_rms_eps = FALCON_MAMBA_RMS_EPS
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.state_size = state_size
        self.num_hidden_layers = num_hidden_layers
        self.layer_norm_epsilon = layer_norm_epsilon
        self.expand = expand
        self.conv_kernel = conv_kernel
        self.use_bias = use_bias
        self.use_conv_bias = use_conv_bias
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.residual_in_fp32 = residual_in_fp32
        self.time_step_rank = math.ceil(hidden_size / 16) if time_step_rank == "auto" else time_step_rank
        self.time_step_scale = time_step_scale
        self.time_step_min = time_step_min
        self.time_step_max = time_step_max
        self.time_step_init_scheme = time_step_init_scheme
        self.time_step_floor = time_step_floor
        self.rescale_prenorm_residual = rescale_prenorm_residual
        self.use_cache = use_cache
        self.scan_backend = scan_backend
        self.use_cuda_graph = use_cuda_graph
        self.mixer_rms_eps = mixer_rms_eps
        self.intermediate_size = int(expand * hidden_size) if intermediate_size is None else intermediate_size
        self._validate_mamba_fields()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """The config.json's fields. A Transformers "mamba" or "falcon_mamba" folder is read as ours (the fields are
        ours, so Transformers' "model of type mamba to instantiate a model of type hf_mamba" warning would
        mislead); its type stays in the dict for __init__ (a Falcon Mamba's norms)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type not in READABLE_MODEL_TYPES:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a model of type {model_type!r}; hf_mamba's MambaConfig "
                f"reads {READABLE_MODEL_TYPES} folders (a state-spaces folder converts with "
                "scripts/convert_checkpoint.py)"
            )
        return config_dict, kwargs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # PretrainedConfig.from_pretrained warns when the dict's type is not ours; the dict is ours to read.
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        return cls.from_dict(config_dict, **kwargs)

    def _validate_mamba_fields(self):
        if not isinstance(self.expand, (int, float)) or self.expand <= 0 or int(self.expand * self.hidden_size) < 1:
            raise ValueError(f"expand must be a positive number with expand * hidden_size >= 1, got {self.expand!r}")
        positive_ints = (
            "vocab_size",
            "hidden_size",
            "state_size",
            "num_hidden_layers",
            "conv_kernel",
            "time_step_rank",
            "intermediate_size",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        positive_floats = ("layer_norm_epsilon", "time_step_min", "time_step_max", "time_step_scale")
        for name in positive_floats:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.time_step_min > self.time_step_max:
            raise ValueError(f"time_step_min ({self.time_step_min}) must be <= time_step_max ({self.time_step_max})")
        if not isinstance(self.time_step_floor, (int, float)) or self.time_step_floor < 0:
            raise ValueError(f"time_step_floor must be a number >= 0, got {self.time_step_floor!r}")
        if not isinstance(self.initializer_range, (int, float)) or self.initializer_range < 0:
            raise ValueError(f"initializer_range must be a number >= 0, got {self.initializer_range!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.time_step_init_scheme not in TIME_STEP_INIT_SCHEMES:
            raise ValueError(
                f"time_step_init_scheme must be one of {TIME_STEP_INIT_SCHEMES}, got {self.time_step_init_scheme!r}"
            )
        if self.mixer_rms_eps is not None and (
            isinstance(self.mixer_rms_eps, bool) or not isinstance(self.mixer_rms_eps, (int, float))
            or not self.mixer_rms_eps > 0
        ):
            raise ValueError(f"mixer_rms_eps must be a positive number or None, got {self.mixer_rms_eps!r}")
        if self.scan_backend is not None and self.scan_backend not in SCAN_BACKENDS:
            raise ValueError(f"scan_backend must be one of {SCAN_BACKENDS} or None, got {self.scan_backend!r}")


__all__ = ["MambaConfig"]
