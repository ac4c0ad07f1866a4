"""Code written for Transformers' built-in Mamba works unchanged: PEFT on Transformers-format folders, the Auto
classes, generate() in every mode with its outputs, the Cache type, activation checkpointing, dtypes, embeddings
resizing, torch.compile. Where a behaviour can be compared, it is compared with the built-in on the same weights."""

import copy
import warnings

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, Cache
from transformers.modeling_layers import GradientCheckpointingLayer

import hf_mamba
from hf_mamba import MambaCache, MambaConfig, MambaForCausalLM
from hf_mamba.compat import CACHE_FIELD, enable_activation_checkpointing

LOGITS_RTOL = 1e-5  # fp32, relative to the largest logit


def max_rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def builtin_folder(tiny_kwargs, tmp_path):
    """A folder saved by Transformers' built-in MambaForCausalLM (model type "mamba"), and that model."""
    builtin = transformers.MambaForCausalLM(transformers.MambaConfig(**tiny_kwargs)).eval()
    builtin.save_pretrained(tmp_path)
    return tmp_path, builtin


@pytest.fixture
def pair(builtin_folder):
    folder, builtin = builtin_folder
    return builtin, MambaForCausalLM.from_pretrained(folder).eval()


@pytest.fixture
def model(tiny_kwargs):
    return MambaForCausalLM(MambaConfig(**tiny_kwargs)).eval()


def generate_kwargs(ids, **kwargs):
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, **kwargs)


def returned_cache(generate_output):
    """The cache generate() returns: `cache` on Transformers >= 5.24, `past_key_values` before."""
    return generate_output["cache"] if "cache" in generate_output else generate_output["past_key_values"]


# ---- 1, 10: Transformers-format folders are hf_mamba models -------------------------------------------------


def test_transformers_folder_loads_as_hf_mamba_without_a_type_warning(builtin_folder, capfd):
    folder, _ = builtin_folder
    capfd.readouterr()
    model = MambaForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "hf_mamba" and type(model.config).model_type == "hf_mamba"
    assert "to instantiate a model of type" not in capfd.readouterr().err


def test_lora_without_target_names_on_a_transformers_folder_adapts_all_four_projections(builtin_folder):
    from peft import LoraConfig, get_peft_model

    folder, _ = builtin_folder
    model = MambaForCausalLM.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FutureWarning from PEFT reading deprecated checkpointing names
        lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    ids = torch.randint(0, 97, (2, 8))
    lora(input_ids=ids, labels=ids).loss.backward()
    adapted = {name.split(".")[-1] for name, module in lora.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"in_proj", "x_proj", "dt_proj", "out_proj"}
    grads = {name: p.grad for name, p in lora.named_parameters() if p.requires_grad}
    assert grads and all(name.count("lora_") for name in grads)
    for projection in ("in_proj", "x_proj", "dt_proj", "out_proj"):
        assert any(projection in name and g.abs().sum() > 0 for name, g in grads.items()), projection


def test_register_as_default_mamba_makes_auto_classes_pick_hf_mamba(builtin_folder):
    folder, _ = builtin_folder
    assert type(AutoModelForCausalLM.from_pretrained(folder)) is transformers.MambaForCausalLM  # the default
    hf_mamba.register_as_default_mamba()
    try:
        assert type(AutoConfig.from_pretrained(folder)) is MambaConfig
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model) is MambaForCausalLM and model.config.model_type == "hf_mamba"
    finally:
        hf_mamba.register_as_default_mamba(False)
    assert type(AutoModelForCausalLM.from_pretrained(folder)) is transformers.MambaForCausalLM


def test_a_folder_of_another_model_type_is_refused(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model of type 'gpt2'"):
        MambaConfig.from_pretrained(tmp_path)


# ---- 2: generate() forwards model kwargs; outputs as the built-in's ------------------------------------------


GENERATE_MODES = [
    pytest.param(dict(do_sample=False), id="greedy"),
    pytest.param(dict(do_sample=True, top_k=5), id="sample"),
    pytest.param(dict(do_sample=False, num_beams=3, num_return_sequences=2), id="beam"),
    pytest.param(dict(do_sample=True, num_beams=2, num_return_sequences=2), id="beam-sample"),
    pytest.param(dict(do_sample=False, num_return_sequences=1, use_cache=False), id="greedy-no-cache"),
]


@pytest.mark.parametrize("mode", GENERATE_MODES)
def test_generate_outputs_match_builtin(pair, mode):
    builtin, ours = pair
    ids = torch.randint(1, 97, (2, 6))
    flags = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, output_hidden_states=True)
    outputs = []
    for model in (builtin, ours):
        torch.manual_seed(1)
        outputs.append(model.generate(**generate_kwargs(ids, **mode, **flags)))
    expected, actual = outputs
    assert torch.equal(actual.sequences, expected.sequences)
    for name in ("scores", "logits"):
        assert len(actual[name]) == len(expected[name]) == 4
        for mine, theirs in zip(actual[name], expected[name], strict=True):
            assert mine.shape == theirs.shape
            finite = theirs.isfinite()
            assert torch.equal(mine.isfinite(), finite)
            assert max_rel_diff(mine[finite], theirs[finite]) < LOGITS_RTOL
    assert len(actual.hidden_states) == len(expected.hidden_states) == 4
    for mine, theirs in zip(actual.hidden_states, expected.hidden_states, strict=True):
        assert len(mine) == len(theirs) == ours.config.num_hidden_layers + 1
        for h_mine, h_theirs in zip(mine, theirs, strict=True):
            assert h_mine.shape == h_theirs.shape
            assert max_rel_diff(h_mine, h_theirs) < LOGITS_RTOL


def test_generate_forwards_model_kwargs_the_forward_names(tiny_kwargs):
    seen = []

    class WithFlag(MambaForCausalLM):
        def forward(self, *args, my_flag=None, **kwargs):
            seen.append(my_flag)
            return super().forward(*args, **kwargs)

    model = WithFlag(MambaConfig(**tiny_kwargs)).eval()
    ids = torch.randint(1, 97, (1, 5))
    model.generate(**generate_kwargs(ids, do_sample=False, my_flag="x"))
    assert seen == ["x"] * 4


def test_use_cache_false_generates_the_same_tokens(model):
    ids = torch.randint(1, 97, (2, 6))
    cached = model.generate(**generate_kwargs(ids, do_sample=False))
    recomputed = model.generate(**generate_kwargs(ids, do_sample=False, use_cache=False))
    assert torch.equal(cached, recomputed)


# ---- 3: inputs_embeds generation, and continuing it from a returned cache ------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_from_inputs_embeds_matches_builtin(pair, use_cache):
    builtin, ours = pair
    embeds = builtin.get_input_embeddings()(torch.randint(1, 97, (2, 6)))
    kwargs = dict(inputs_embeds=embeds, max_new_tokens=5, do_sample=False, use_cache=use_cache)
    assert torch.equal(ours.generate(**kwargs), builtin.generate(**kwargs))


def test_generate_continues_from_a_returned_cache_with_inputs_embeds(model):
    ids = torch.randint(1, 97, (2, 9))
    embeds = model.get_input_embeddings()(ids).detach()
    uninterrupted = model.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=False)
    first = model.generate(
        inputs_embeds=embeds[:, :6], max_new_tokens=1, do_sample=False, return_dict_in_generate=True
    )
    cache = returned_cache(first)
    assert cache.get_seq_length() == 6
    continued = model.generate(inputs_embeds=embeds, cache=cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(continued, uninterrupted)


# ---- 4: fp32 SSM parameters however the model is built ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_from_config_keeps_ssm_parameters_fp32(tiny_kwargs, dtype):
    model = AutoModelForCausalLM.from_config(MambaConfig(**tiny_kwargs), dtype=dtype)
    mixer = model.backbone.layers[0].mixer
    assert (mixer.A_log.dtype, mixer.D.dtype, mixer.dt_proj.bias.dtype) == (torch.float32,) * 3
    assert mixer.in_proj.weight.dtype == dtype and mixer.dt_proj.weight.dtype == dtype
    with torch.no_grad():
        assert model(torch.randint(0, 97, (1, 5))).logits.isfinite().all()


def test_dtype_auto_loads_the_saved_dtype(model, tmp_path):
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = MambaForCausalLM.from_pretrained(tmp_path, dtype="auto")
    mixer = loaded.backbone.layers[0].mixer
    assert loaded.lm_head.weight.dtype == torch.bfloat16 and mixer.in_proj.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == torch.float32 and mixer.dt_proj.bias.dtype == torch.float32


# ---- 5: activation checkpointing the Transformers 5 way ----------------------------------------------------


def test_blocks_are_gradient_checkpointing_layers_and_enabling_is_quiet(model):
    assert all(isinstance(block, GradientCheckpointingLayer) for block in model.backbone.layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enable_activation_checkpointing(model.train())
    assert model.is_gradient_checkpointing


# ---- 6: the cache is a Transformers Cache --------------------------------------------------------------------


def test_cache_is_a_transformers_cache_that_copies_and_reads_cheaply(model):
    ids = torch.randint(1, 97, (2, 9))
    out = model(ids[:, :5], use_cache=True)  # grad mode: the cache must still hold plain values
    cache = out[CACHE_FIELD]
    assert out.cache is cache
    assert isinstance(cache, Cache) and cache.get_seq_length() == 5 and cache.batch_size == 2 and len(cache) == 2
    assert all(cache.is_linear) and not cache.is_compileable and cache.has_previous_state()
    assert cache.get_conv_state(1) is cache.conv_states[1] and cache.get_recurrent_state(0) is cache.ssm_states[0]
    copied = copy.deepcopy(cache)
    with torch.no_grad():
        expected = model(ids[:, 5:], cache=cache).logits
        copied_states = [s.clone() for s in copied.ssm_states]
        assert torch.equal(model(ids[:, 5:], cache=copied).logits, expected)
    assert not torch.equal(copied_states[0], copied.ssm_states[0])  # the copy advanced on its own tensors
    with pytest.raises(NotImplementedError, match="recurrent state"):
        cache.crop(3)


def test_cache_update_takes_caches_argument_order_and_the_old_one(model):
    cache = MambaCache(model.config, batch_size=1)
    new = torch.randn_like(cache.ssm_states[1])
    cache.update_recurrent_state(new, 1)
    assert torch.equal(cache.ssm_states[1], new)
    cache.update_ssm_state(0, new)
    assert torch.equal(cache.ssm_states[0], new)


# ---- 8: saving a model PEFT has wrapped never writes a folder that reloads random ------------------------------


def test_saving_a_peft_wrapped_model_refuses_and_merging_saves_it(model, tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
    with pytest.raises(ValueError, match="merge_and_unload"):
        model.save_pretrained(tmp_path / "wrapped")
    lora.merge_and_unload().save_pretrained(tmp_path / "merged")
    reloaded = MambaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert max_rel_diff(reloaded(ids).logits, expected) < LOGITS_RTOL


# ---- what every Transformers causal LM is expected to do -----------------------------------------------------


def test_resize_token_embeddings_keeps_old_rows_and_generates(model):
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120
    assert model.get_input_embeddings().weight.shape == (120, 32) and model.lm_head.weight.shape == (120, 32)
    assert torch.equal(model.get_input_embeddings().weight[:97], old)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    ids = torch.randint(97, 120, (1, 4))
    assert model.generate(**generate_kwargs(ids, do_sample=False)).shape == (1, 8)


def test_untied_lm_head_saves_and_loads_separately(tiny_kwargs, tmp_path):
    model = MambaForCausalLM(MambaConfig(**tiny_kwargs, tie_word_embeddings=False))
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    with torch.no_grad():
        model.lm_head.weight.normal_()
    model.save_pretrained(tmp_path)
    loaded = MambaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(loaded.lm_head.weight, loaded.get_input_embeddings().weight)


def test_compiled_forward_generates_the_same_tokens(model):
    ids = torch.randint(1, 97, (1, 5))
    eager = model.generate(**generate_kwargs(ids, do_sample=False))
    model.forward = torch.compile(model.forward, backend="eager", fullgraph=False)
    assert torch.equal(model.generate(**generate_kwargs(ids, do_sample=False)), eager)


def test_generate_from_a_cache_that_saw_the_whole_prompt_says_so(model):
    ids = torch.randint(1, 97, (1, 6))
    with torch.no_grad():
        cache = model(ids, use_cache=True)[CACHE_FIELD]
    with pytest.raises(ValueError, match="already seen all 6 tokens"):
        model.generate(ids, cache=cache, max_new_tokens=2, do_sample=False)
