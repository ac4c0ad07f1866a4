"""PEFT / LoRA on hf_mamba: default targets, adapter gradients on every scan backend, save/load, merge, generate."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.nn.utils import parametrize

import hf_mamba
from hf_mamba.integrations import LORA_TARGET_MODULES

TINY = dict(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2)


def base_model(cls=hf_mamba.MambaForCausalLM, **config_kwargs):
    torch.manual_seed(0)
    return cls(hf_mamba.MambaConfig(**{**TINY, **config_kwargs})).eval()


def with_lora(model, task_type="CAUSAL_LM", **lora_kwargs):
    # init_lora_weights=False: random A *and* B, so every adapter changes the output and gets a gradient.
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(task_type=task_type, r=4, init_lora_weights=False, **lora_kwargs))


def input_ids(batch=2, seqlen=11, seed=2):
    return torch.randint(TINY["vocab_size"], (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def lora_module_names(model):
    return {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}


def test_default_target_modules_are_every_projection():
    model = with_lora(base_model())
    expected = {
        f"base_model.model.backbone.layers.{i}.mixer.{projection}"
        for i in range(TINY["num_hidden_layers"])
        for projection in LORA_TARGET_MODULES
    }
    assert lora_module_names(model) == expected
    assert set(model.peft_config["default"].target_modules) == set(LORA_TARGET_MODULES)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)


def test_explicit_target_modules():
    model = with_lora(base_model(), target_modules=["x_proj", "dt_proj"])
    assert {name.rsplit(".", 1)[1] for name in lora_module_names(model)} == {"x_proj", "dt_proj"}


class LoraDelta(nn.Module):
    """W -> W + scaling * B @ A as a parametrization: the adapter folded into the weight itself (unfused)."""

    def __init__(self, lora_A, lora_B, scaling):
        super().__init__()
        self.A, self.B, self.scaling = nn.Parameter(lora_A.clone()), nn.Parameter(lora_B.clone()), scaling

    def forward(self, weight):
        return weight + self.scaling * (self.B @ self.A)


def unfused_reference(peft_model):
    """The same base weights with every adapter folded into its projection's weight, on the exact scan.

    Whatever reads a projection (its module or its weight directly, as fused kernels do) sees the adapter, so
    the gradients of A and B here are the true ones.
    """
    # On the adapters' device before the parametrizations, which add the adapters to the weights at once.
    layers = peft_model.config.num_hidden_layers
    reference = base_model(scan_backend="reference", num_hidden_layers=layers).to(next(peft_model.parameters()).device)
    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            path = name.removeprefix("base_model.model.")
            delta = LoraDelta(
                module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]
            )
            parametrize.register_parametrization(reference.get_submodule(path), "weight", delta)
            deltas[f"{name}.lora_A.default.weight"] = delta.A
            deltas[f"{name}.lora_B.default.weight"] = delta.B
    for param in reference.parameters():
        param.requires_grad_(False)
    for param in deltas.values():
        param.requires_grad_(True)
    return reference, deltas


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
def test_fused_weight_folds_vanilla_adapters_and_refuses_the_rest():
    """fused_weight(module): the weight the fused mixer multiplies by, equal to calling the module, for a plain
    projection and vanilla LoRA over it (one or two active adapters, merged, disabled); None where the module
    computes something else (dropout, DoRA, a LoRA bias, hooks)."""
    from hf_mamba.block import MambaDeltaProjection
    from hf_mamba.fast_path import fused_weight

    def mixer_of(peft_model):
        return peft_model.base_model.model.backbone.layers[0].mixer

    def adapted(**kwargs):
        return mixer_of(with_lora(base_model(), **kwargs))

    def assert_folds(module, cls=nn.Linear):
        weight = fused_weight(module, cls)
        assert weight is not None
        x = torch.randn(3, weight.shape[1])
        torch.testing.assert_close(F.linear(x, weight), module(x), rtol=1e-5, atol=1e-6)

    plain = base_model().backbone.layers[0].mixer
    assert fused_weight(plain.x_proj, nn.Linear) is plain.x_proj.weight
    assert fused_weight(plain.dt_proj, nn.Linear) is None  # not exactly the class asked for
    model = with_lora(base_model())
    mixer = mixer_of(model)
    assert_folds(mixer.x_proj)
    assert_folds(mixer.dt_proj, MambaDeltaProjection)  # W x without the bias, as the module computes
    assert fused_weight(mixer.x_proj, nn.Linear).requires_grad
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    assert mixer.x_proj.active_adapters == ["default", "second"]
    assert_folds(mixer.x_proj)
    mixer.x_proj.merge()
    assert_folds(mixer.x_proj)
    mixer.x_proj.unmerge()
    mixer.x_proj.enable_adapters(False)
    assert_folds(mixer.x_proj)
    for kwargs in (dict(lora_dropout=0.1), dict(use_dora=True), dict(lora_bias=True)):
        assert fused_weight(adapted(**kwargs).x_proj, nn.Linear) is None, kwargs
    mixer = adapted()
    mixer.x_proj.register_forward_pre_hook(lambda *args: None)
    assert fused_weight(mixer.x_proj, nn.Linear) is None


@pytest.mark.parametrize("backend", [pytest.param(b, id=b) for b in ("reference", "torch", "triton")])
def test_adapter_gradients_match_unfused_computation(backend):
    """Each adapter's gradient is non-zero and equals the gradient of the adapter folded into the weight."""
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be on before triton is first imported (tests/kernels/conftest.py does that).
        pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1 from the start of the session")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    # One layer on the Triton interpreter (a minute for two), which runs every kernel in Python.
    layers = 1 if backend == "triton" and device == "cpu" else TINY["num_hidden_layers"]
    model = with_lora(base_model(scan_backend=backend, num_hidden_layers=layers)).to(device)
    reference, reference_params = unfused_reference(model)
    ids = input_ids().to(device)
    for m in (model, reference):
        m(input_ids=ids, labels=ids).loss.backward()

    adapters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(adapters) == 2 * len(LORA_TARGET_MODULES) * layers
    assert {name for name, _ in adapters} == set(reference_params)
    for name, param in adapters:
        assert param.grad is not None and param.grad.abs().max() > 0, f"{name} gets no gradient"
        torch.testing.assert_close(param.grad, reference_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_adapter_save_load_merge_and_generate(tmp_path):
    model = with_lora(base_model())
    ids = input_ids()
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert (adapted - plain).abs().max() > 1e-3  # the adapters do something

    model.save_pretrained(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "config.json", "modeling_mamba.py"}

    loaded = PeftModel.from_pretrained(base_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, adapted, rtol=1e-6, atol=1e-6)

    # Greedy generation through the PEFT wrapper runs on hf_mamba's recurrent cache.
    out = loaded.generate(input_ids=ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, hf_mamba.MambaCache)

    merged = loaded.merge_and_unload()
    assert type(merged) is hf_mamba.MambaForCausalLM and not lora_module_names(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    merged_out = merged.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out.sequences, merged_out)


def test_sequence_classification_lora(tmp_path):
    model = with_lora(base_model(hf_mamba.MambaForSequenceClassification, num_labels=3), task_type="SEQ_CLS")
    assert len(lora_module_names(model)) == len(LORA_TARGET_MODULES) * TINY["num_hidden_layers"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # SEQ_CLS also trains (and saves) the new head, PEFT's modules_to_save.
    assert any(".score." in name for name in trainable)
    assert all("lora_" in name or ".score." in name for name in trainable)

    ids, labels = input_ids(), torch.tensor([0, 2])
    output = model(input_ids=ids, labels=labels)
    output.loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for n, p in model.named_parameters() if n in trainable)

    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(
        base_model(hf_mamba.MambaForSequenceClassification, num_labels=3), tmp_path / "adapter"
    ).eval()
    with torch.no_grad():
        expected = model.eval()(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-6, atol=1e-6)
        merged = loaded.merge_and_unload()
        assert type(merged) is hf_mamba.MambaForSequenceClassification
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_importing_hf_mamba_leaves_peft_alone_and_the_default_still_applies():
    """`import hf_mamba` imports neither PEFT nor bitsandbytes (seconds, and a Hub lookup); PEFT imported
    after it still defaults LoRA to every projection."""
    script = """
import sys
import hf_mamba
assert "peft" not in sys.modules and "bitsandbytes" not in sys.modules, "imported by hf_mamba"
from peft import LoraConfig, get_peft_model
model = hf_mamba.MambaForCausalLM(hf_mamba.MambaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1))
model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2))
print(sorted({n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(sorted(LORA_TARGET_MODULES))


def test_registering_after_peft_is_imported_applies_at_once():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    from hf_mamba.integrations import register_peft_target_modules

    assert register_peft_target_modules("hf_mamba_test_type")  # this module imported PEFT already
    assert mapping.pop("hf_mamba_test_type") == LORA_TARGET_MODULES
