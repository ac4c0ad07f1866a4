"""End to end: MambaForCausalLM on the Triton kernels against the PyTorch path, and (on CUDA) the
CUDA-graph decode against plain eager decoding. On CPU the Triton kernels run under the interpreter
(tests/conftest.py), so the model is tiny."""

import pytest
import torch

from hf_mamba import MambaConfig, MambaForCausalLM
from hf_mamba.decode_graphs import SelectStep

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Model sizes: small enough for the Triton interpreter on CPU, real on the GPU.
SIZES = (
    dict(vocab_size=257, hidden_size=128, state_size=16, num_hidden_layers=2)
    if CUDA
    else dict(vocab_size=53, hidden_size=8, state_size=4, num_hidden_layers=1)
)


def run(model, ids, backend, monkeypatch):
    monkeypatch.setenv("HF_MAMBA_BACKEND", backend)
    model.zero_grad()
    out = model(ids, labels=ids if ids.shape[1] > 1 else None, use_cache=False)
    loss = out.loss if out.loss is not None else out.logits.pow(2).mean()  # seqlen 1 has no next token
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("seqlen", [1, 9, 70])
def test_triton_logits_and_gradients_match_torch_path(seqlen, monkeypatch):
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES)).to(DEVICE)
    ids = torch.randint(0, SIZES["vocab_size"], (2, seqlen), device=DEVICE)
    ref_logits, ref_loss, ref_grads = run(model, ids, "torch", monkeypatch)
    logits, loss, grads = run(model, ids, "triton", monkeypatch)
    assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item() < 1e-4
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().clamp(min=1e-6)
        assert ((grad - ref_grads[name]).abs().max() / scale).item() < 1e-3, name


def test_triton_decode_steps_match_full_forward(monkeypatch):
    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(use_cuda_graph=False, **SIZES)).to(DEVICE).eval()
    ids = torch.randint(0, SIZES["vocab_size"], (2, 12), device=DEVICE)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :3], use_cache=True)
        steps = [out.logits]
        # Chunks continuing the cache (the conv's first outputs from the cached window), then single steps.
        for chunk in (slice(3, 5), slice(5, 9)):
            out = model(ids[:, chunk], cache_params=out.cache_params, use_cache=True)
            steps.append(out.logits)
        for t in range(9, 12):
            out = model(ids[:, t : t + 1], cache_params=out.cache_params, use_cache=True)
            steps.append(out.logits)
    stepped = torch.cat(steps, dim=1)
    assert ((stepped - full).abs().max() / full.abs().max()).item() < 1e-4


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
# fp16: the step writes y in fp32 and scales it into range for out_proj inside the graph (`to_fp16_range`)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_cuda_graph_decode_matches_eager(dtype, num_beams):
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES)).to(DEVICE, dtype).eval()
    ids = torch.randint(1, SIZES["vocab_size"], (2, 12), device=DEVICE)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, num_beams=num_beams)
    model.config.use_cuda_graph = False
    eager = model.generate(ids, **kwargs)
    model.config.use_cuda_graph = True
    graphed = model.generate(ids, **kwargs)
    assert torch.equal(graphed, eager)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_on_the_second_gpu_runs_there(monkeypatch):
    """Kernels, the fused training mixer and graph decoding on cuda:1 while cuda:0 is current, as in a process
    that holds several GPUs (device_map, pipeline stages): the same results as the PyTorch path there."""
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES)).to("cuda:1")
    ids = torch.randint(1, SIZES["vocab_size"], (2, 12), device="cuda:1")
    ref_logits, ref_loss, ref_grads = run(model, ids, "torch", monkeypatch)
    logits, loss, grads = run(model, ids, "triton", monkeypatch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert ((grad - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp(min=1e-6)) < 1e-3, name
    model.eval()
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    model.config.use_cuda_graph = False
    eager = model.generate(ids, **kwargs)
    model.config.use_cuda_graph = True
    assert torch.equal(model.generate(ids, **kwargs), eager)
    assert torch.cuda.current_device() == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_split_over_two_gpus_generates_as_on_one(tmp_path):
    """from_pretrained(device_map=...) with the blocks on two GPUs: each layer's cached states move to its GPU,
    decoding runs without graphs, and the tokens are those of the model on one GPU."""
    config = MambaConfig(**{**SIZES, "num_hidden_layers": 4})
    torch.manual_seed(0)
    MambaForCausalLM(config).save_pretrained(tmp_path)
    device_map = {"backbone.embeddings": 0, "backbone.layers.0": 0, "backbone.layers.1": 0, "backbone.layers.2": 1,
                  "backbone.layers.3": 1, "backbone.norm_f": 1, "lm_head": 1}
    split = MambaForCausalLM.from_pretrained(tmp_path, device_map=device_map).eval()
    whole = MambaForCausalLM.from_pretrained(tmp_path).to("cuda:0").eval()
    ids = torch.randint(1, SIZES["vocab_size"], (2, 12), device="cuda:0")
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    out = split.generate(ids, return_dict_in_generate=True, **kwargs)
    assert [state.device.index for state in _cache_of(out).ssm_states] == [0, 0, 1, 1]
    assert torch.equal(out.sequences.cpu(), whole.generate(ids, **kwargs).cpu())


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_is_captured_once_per_cache_and_replayed():
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES)).to(DEVICE).eval()
    ids = torch.randint(0, SIZES["vocab_size"], (1, 6), device=DEVICE)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.cache_params
        token = out.logits[:, -1:].argmax(-1)
        model(token, cache_params=cache, use_cache=True)
        graph = model._decode_graphs.graph_of(cache)
        assert graph is not None
        model(token, cache_params=cache, use_cache=True)
        assert model._decode_graphs.graph_of(cache) is graph and cache.seqlen_offset == 8



@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_a_replayed_step_refuses_a_bad_id_and_the_gpu_stays_usable():
    """The replay reads the ids clamped and the forward raises after launching it: no device-side assert."""
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES)).to(DEVICE).eval()
    ids = torch.randint(0, SIZES["vocab_size"], (2, 6), device=DEVICE)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache  # the field's name on every release
        model(ids[:, -1:], cache=cache, use_cache=True)
        bad = torch.tensor([[1], [SIZES["vocab_size"]]], device=DEVICE)
        with pytest.raises(ValueError, match="input_ids must lie in"):
            model(bad, cache=cache, use_cache=True)
        assert model._decode_graphs.graph_of(cache) is not None
        expected = model(ids, use_cache=False).logits
    torch.cuda.synchronize()
    assert torch.isfinite(expected).all()


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_kept_across_generate_calls_matches_eager(batch, monkeypatch):
    """A second generate() of the same batch replays the first one's graphs (no capture) and gives eager's
    tokens; a cache the user still holds keeps its states while the next generate() gets fresh ones, and
    so captures again."""
    from hf_mamba.decode_graphs import DecodeGraph, DecodeGraphs, Prefill

    captures = []  # the kind of each capture: per generate() a prefill graph and the forward's (None)

    class Counting(DecodeGraph):
        def __init__(self, *args):
            captures.append(type(args[3]) if len(args) > 3 else None)
            super().__init__(*args)

    monkeypatch.setattr(DecodeGraphs, "graph_class", Counting)
    monkeypatch.setattr(MambaForCausalLM, "decode_chunk_size", 1)  # the forward's graph (chunks: tested below)
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES)).to(DEVICE).eval()
    prompts = [torch.randint(1, SIZES["vocab_size"], (batch, 12), device=DEVICE) for _ in range(2)]

    def greedy(ids, **kwargs):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, **kwargs)

    model.config.use_cuda_graph = False
    eager = [greedy(ids) for ids in prompts]
    model.config.use_cuda_graph = True
    for ids, expected in zip(prompts, eager, strict=True):
        assert torch.equal(greedy(ids), expected)
    first = list(captures)
    assert len(first) == 2 and set(first) == {Prefill, None}
    held = greedy(prompts[0], return_dict_in_generate=True)  # the same graphs again
    cache = held["cache"] if "cache" in held else held["past_key_values"]
    kept = [state.clone() for state in cache.conv_states + cache.ssm_states]
    assert captures == first
    assert torch.equal(greedy(prompts[1]), eager[1])  # fresh states, so new captures
    assert torch.equal(held.sequences, eager[0]) and captures == first * 2
    for state, old in zip(cache.conv_states + cache.ssm_states, kept, strict=True):
        assert torch.equal(state, old)

def test_triton_packed_documents_match_torch_path(monkeypatch):
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES)).to(DEVICE)
    ids = torch.randint(0, SIZES["vocab_size"], (1, 12), device=DEVICE)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]], device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("HF_MAMBA_BACKEND", backend)
        model.zero_grad()
        out = model(ids, labels=ids, position_ids=position_ids, use_cache=False)
        out.loss.backward()
        results[backend] = (out.logits.detach(), model.backbone.layers[0].mixer.A_log.grad.clone())
    (ref_logits, ref_grad), (logits, grad) = results["torch"], results["triton"]
    assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item() < 1e-4
    assert ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item() < 1e-3


def test_model_compiles_fullgraph_through_the_kernels(monkeypatch):
    """torch.compile(model, fullgraph=True): Dynamo traces the whole forward, padding mask included,
    through the custom ops with no graph break. (The "eager" compile backend keeps CI fast; Inductor
    also runs forward and backward, checked by hand: about 20 s on CPU.)"""
    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES)).to(DEVICE)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    out = compiled(ids, attention_mask=mask, labels=ids, use_cache=False)
    out.loss.backward()
    grad = model.backbone.layers[0].mixer.A_log.grad.clone()
    model.zero_grad()
    ref = model(ids, attention_mask=mask, labels=ids, use_cache=False)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, model.backbone.layers[0].mixer.A_log.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_model_exports_through_the_kernels(strict, monkeypatch):
    """torch.export: the exported graph calls the conv and scan custom ops and gives the same logits."""
    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(use_cuda_graph=False, **SIZES)).to(DEVICE).eval()

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(ids, use_cache=False).logits

    ids = torch.randint(0, SIZES["vocab_size"], (2, 9), device=DEVICE)
    wrapped = Logits(model)
    with torch.no_grad():
        program = torch.export.export(wrapped, (ids,), strict=strict)
        targets = {str(node.target) for node in program.graph.nodes}
        assert {"hf_mamba.causal_conv1d_fwd.default", "hf_mamba.selective_scan_fwd.default"} <= targets
        # Not bit for bit: eagerly the RMS norms run their Triton kernel, in the traced graph PyTorch's ops
        # (the norms have no custom op), an fp32 rounding apart (1.9e-6 on an H100).
        torch.testing.assert_close(program.module()(ids), wrapped(ids), rtol=1e-5, atol=1e-5)


def in_dry_pass():
    """Whether a call comes from a pass that compiles kernels ahead (on CUDA a first training step's, which
    runs the first blocks once without running their kernels): the spies below count real calls only."""
    from hf_mamba.kernels import _launch

    return _launch._COMPILE_ONLY.get() is not None


def fused_calls(monkeypatch):
    """Record the model's calls of the fused mixer (`mamba_inner_triton`), letting them run: per call,
    whether in_proj ran inside it."""
    from hf_mamba import block

    calls = []
    real = block.mamba_inner_triton

    def spy(*args, **kwargs):
        if not in_dry_pass():
            calls.append(kwargs.get("in_proj_weight") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(block, "mamba_inner_triton", spy)
    return calls


def train_step(model, ids, **kwargs):
    model.zero_grad()
    out = model(ids, labels=ids, use_cache=False, **kwargs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "use_bias,packed,bf16,falcon",
    [
        (False, False, False, False),
        (True, False, False, False),
        (False, True, False, False),
        (False, False, True, False),
        (False, True, False, True),
    ],
    ids=["fp32", "fp32-bias", "fp32-packed", "bf16-autocast", "falcon-fp32-packed"],
)
def test_fused_mixer_matches_the_modules(use_bias, packed, bf16, falcon, monkeypatch):
    """Training on the Triton backend runs the mixer after in_proj as one function (conv output, Δ and
    the scan output recomputed in the backward); it must give the modules' logits and gradients, Falcon
    Mamba's norms on Δ, B and C included."""
    from hf_mamba.modeling_mamba import MambaMixer

    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    torch.manual_seed(0)
    config = MambaConfig(use_bias=use_bias, mixer_rms_eps=1e-6 if falcon else None, **SIZES)
    model = MambaForCausalLM(config).to(DEVICE)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 37), device=DEVICE)
    kwargs = {}
    if packed:
        kwargs["position_ids"] = torch.tensor([list(range(20)) + list(range(17))] * 2, device=DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
            return train_step(model, ids, **kwargs)

    calls = fused_calls(monkeypatch)
    logits, grads = step()
    assert calls == [True] * SIZES["num_hidden_layers"]  # in_proj inside
    monkeypatch.setattr(MambaMixer, "_fused_ssm_weights", lambda *args: None)
    ref_logits, ref_grads = step()
    assert len(calls) == SIZES["num_hidden_layers"]
    # fp32: the same arithmetic up to summation order. bf16: the recomputed Δ and the per-batch
    # weight-gradient sums round differently from the modules' matmuls.
    logits_tol, grads_tol = (2e-2, 5e-2) if bf16 else (1e-5, 1e-5)
    assert logits.dtype == ref_logits.dtype
    assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item() < logits_tol
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == ref_grads[name].dtype
        assert ((grad - ref_grads[name]).abs().max() / ref_grads[name].abs().max()).item() < grads_tol, name


def test_fused_mixer_leaves_wrapped_or_hooked_modules_to_run(monkeypatch):
    """Hooks and adapters the fused mixer cannot fold in live in the modules: with them on x_proj or dt_proj the
    modules run (no fused call); with a hook on out_proj the mixer stays fused and calls out_proj after it."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES)).to(DEVICE)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 9), device=DEVICE)
    calls = fused_calls(monkeypatch)
    seen = []
    handle = model.backbone.layers[0].mixer.out_proj.register_forward_hook(lambda *args: seen.append(1))
    train_step(model, ids)
    assert seen and calls == [True] * SIZES["num_hidden_layers"]
    handle.remove()
    grads_seen = []
    handle = model.backbone.layers[0].mixer.x_proj.register_full_backward_hook(lambda *args: grads_seen.append(1))
    calls.clear()
    train_step(model, ids)
    assert grads_seen and len(calls) == SIZES["num_hidden_layers"] - 1
    handle.remove()
    # LoRA dropout draws a mask per call of the adapter: not a merged weight, so the modules run.
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["x_proj"], lora_dropout=0.1, init_lora_weights=False))
    calls.clear()
    lora(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert not calls
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("targets", [["x_proj", "dt_proj"], ["in_proj", "x_proj", "dt_proj", "out_proj"]],
                         ids=["ssm-projections", "all-four"])
def test_fused_mixer_with_lora_adapters_matches_the_modules(targets, monkeypatch):
    """LoRA on x_proj and dt_proj keeps the fused path, with the adapters merged into the weights it reads
    (in_proj and out_proj, adapted, run as modules around it): the loss and every adapter's gradient as on the
    module path (fp32, 1e-5 relative)."""
    from peft import LoraConfig, get_peft_model

    from hf_mamba.modeling_mamba import MambaMixer

    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    torch.manual_seed(0)
    base = MambaForCausalLM(MambaConfig(**SIZES)).to(DEVICE)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    ids = torch.randint(0, SIZES["vocab_size"], (2, 9), device=DEVICE)
    calls = fused_calls(monkeypatch)
    logits, grads = train_step(lora, ids)
    assert calls == ["in_proj" not in targets] * SIZES["num_hidden_layers"]
    assert len(grads) == 2 * len(targets) * SIZES["num_hidden_layers"] and all("lora_" in name for name in grads)
    monkeypatch.setattr(MambaMixer, "_fused_ssm_weights", lambda *args: None)
    ref_logits, ref_grads = train_step(lora, ids)
    assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item() < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        assert ((grad - ref_grads[name]).abs().max() / ref_grads[name].abs().max()).item() < 1e-5, name


def test_fused_mixer_with_lora_on_in_proj_only(monkeypatch):
    """LoRA on in_proj alone keeps the fused path (in_proj runs before it); the frozen weights after it
    get no gradient and the adapters the same gradients as on the module path."""
    from peft import LoraConfig, get_peft_model

    from hf_mamba.modeling_mamba import MambaMixer

    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    torch.manual_seed(0)
    base = MambaForCausalLM(MambaConfig(**SIZES)).to(DEVICE)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["in_proj"], init_lora_weights=False))
    ids = torch.randint(0, SIZES["vocab_size"], (2, 9), device=DEVICE)
    calls = fused_calls(monkeypatch)
    _, grads = train_step(lora, ids)
    assert calls == [False] * SIZES["num_hidden_layers"]  # the wrapped in_proj runs as a module
    assert grads and all("lora_" in name for name in grads)
    monkeypatch.setattr(MambaMixer, "_fused_ssm_weights", lambda *args: None)
    _, ref_grads = train_step(lora, ids)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert ((grad - ref_grads[name]).abs().max() / ref_grads[name].abs().max()).item() < 1e-5, name


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_add_norm_matches_the_blocks(bf16, monkeypatch):
    """On the Triton backend the model runs each residual add fused with the next block's norm (and under
    autocast rounds the norm's output to bf16, as in_proj would): the same logits, hidden states and
    gradients as the blocks called one by one."""
    from hf_mamba import modeling_mamba

    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    torch.manual_seed(0)
    config = MambaConfig(**{**SIZES, "num_hidden_layers": 2})
    model = MambaForCausalLM(config).to(DEVICE)
    ids = torch.randint(0, config.vocab_size, (2, 6), device=DEVICE)
    calls = []
    real = modeling_mamba.add_rms_norm

    def recording(*args, **kwargs):
        if not in_dry_pass():
            calls.append(kwargs["out_dtype"])
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling_mamba, "add_rms_norm", recording)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
            model.zero_grad()
            out = model(ids, labels=ids, use_cache=False, output_hidden_states=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), [h.detach() for h in out.hidden_states], grads

    logits, hidden, grads = step()
    # One fused call per block; the last one's norm is norm_f, whose output lm_head reads (not in_proj).
    assert calls == [torch.bfloat16 if bf16 else None, None]
    monkeypatch.setattr(modeling_mamba.MambaModel, "_plain_blocks_and_norms", lambda self: False)
    ref_logits, ref_hidden, ref_grads = step()
    assert len(calls) == 2
    # fp32: the same arithmetic up to the rsqrt. bf16: roundings of the interpreter (towards zero) and
    # PyTorch's (to nearest) differ by a unit in the last place; on the GPU they agree.
    tol = 2e-2 if bf16 and not CUDA else 1e-5
    for value, ref in zip([logits, *hidden], [ref_logits, *ref_hidden], strict=True):
        assert value.dtype == ref.dtype
        assert ((value - ref).abs().max() / ref.abs().max()).item() < tol
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == ref_grads[name].dtype
        assert ((grad - ref_grads[name]).abs().max() / ref_grads[name].abs().max()).item() < tol * 5, name


def test_fused_mixer_with_in_proj_inside_matches_in_proj_outside():
    """mamba_inner_triton with in_proj_weight runs in_proj itself: the same output and gradients (input,
    in_proj's weight and bias, every mixer weight) as in_proj applied first, in fp32. (Without a bias:
    the model's default, in test_fused_mixer_matches_the_modules.)"""
    import torch.nn.functional as F
    from hf_mamba.kernels import mamba_inner_triton

    torch.manual_seed(0)
    config = MambaConfig(use_bias=True, **SIZES)
    mixer = MambaForCausalLM(config).backbone.layers[0].mixer.to(DEVICE)
    hidden = torch.randn(2, 13, config.hidden_size, device=DEVICE)
    weights = (
        mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight, mixer.dt_proj.bias,
        mixer.A_log, mixer.D, mixer.out_proj.weight, mixer.out_proj.bias,
    )
    params = [p for p in mixer.parameters()]
    grad_out = torch.randn(2, 13, config.hidden_size, device=DEVICE)
    results = []
    for inside in (True, False):
        x = hidden.clone().requires_grad_()
        for p in params:
            p.grad = None
        if inside:
            out = mamba_inner_triton(x, *weights, in_proj_weight=mixer.in_proj.weight, in_proj_bias=mixer.in_proj.bias)
        else:
            out = mamba_inner_triton(F.linear(x, mixer.in_proj.weight, mixer.in_proj.bias), *weights)
        out.backward(grad_out)
        results.append([out.detach(), x.grad] + [p.grad.clone() for p in params])
    assert all(p.grad is not None for p in params)
    for value, ref in zip(*results, strict=True):
        torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-6)


def test_fused_mixer_rejects_bad_shapes():
    from hf_mamba.kernels import mamba_inner_triton

    mixer = MambaForCausalLM(MambaConfig(**SIZES)).backbone.layers[0].mixer
    weights = (mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight, mixer.dt_proj.bias,
               mixer.A_log, mixer.D, mixer.out_proj.weight)
    hidden = torch.randn(1, 3, SIZES["hidden_size"])
    with pytest.raises(ValueError, match="in_proj_weight must have shape"):
        mamba_inner_triton(hidden, *weights, in_proj_weight=mixer.in_proj.weight[1:])
    with pytest.raises(ValueError, match="xz is in_proj's input"):
        mamba_inner_triton(hidden[..., 1:], *weights, in_proj_weight=mixer.in_proj.weight)
    with pytest.raises(ValueError, match="xz must have shape"):
        mamba_inner_triton(hidden, *weights)
    with pytest.raises(ValueError, match="xz has no time steps"):  # the kernels would read out of bounds
        mamba_inner_triton(hidden[:, :0], *weights, in_proj_weight=mixer.in_proj.weight)


@pytest.mark.skipif(not CUDA, reason="compiling ahead is for CUDA (under the interpreter nothing compiles)")
def test_first_training_call_compiles_its_kernels_ahead(monkeypatch):
    """The first training call of a kind compiles every kernel its forward and backward launch, side by
    side, before it runs (`compile_ahead`): the run itself then compiles nothing, gives what a run
    without that pass gives, and later calls of that kind skip the pass."""
    import triton
    from hf_mamba.kernels import mamba_inner, mamba_inner_triton

    compiled = []  # (kernel name, whether the pass ahead compiled it)
    monkeypatch.setattr(
        triton.knobs.runtime, "jit_post_compile_hook",
        lambda **kw: compiled.append((kw["fn"].name, kw["is_manual_warmup"])),
    )
    passes = []
    compile_ahead = mamba_inner.compile_ahead
    monkeypatch.setattr(mamba_inner, "compile_ahead", lambda fn: passes.append(compile_ahead(fn)))
    torch.manual_seed(0)
    # A d_state and a conv width no other test builds kernels for: a kernel another test of this process
    # already compiled would not compile again, ahead or not.
    config = MambaConfig(**dict(SIZES, state_size=10, conv_kernel=5))
    mixer = MambaForCausalLM(config).backbone.layers[0].mixer.to(DEVICE)
    weights = (
        mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight, mixer.dt_proj.bias,
        mixer.A_log, mixer.D, mixer.out_proj.weight, mixer.out_proj.bias,
    )
    hidden = torch.randn(2, 45, config.hidden_size, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(2, 45, config.hidden_size, device=DEVICE)

    def train_call():
        hidden.grad = None
        for p in mixer.parameters():
            p.grad = None
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = mamba_inner_triton(hidden, *weights, in_proj_weight=mixer.in_proj.weight)
        out.backward(grad_out)
        return [out.detach(), hidden.grad] + [p.grad for p in mixer.parameters()]

    first = train_call()
    assert passes == [True]
    ahead = {name for name, is_ahead in compiled if is_ahead}
    assert {"scan_fwd_kernel", "scan_bwd_kernel", "_conv_fwd_kernel", "_conv_bwd_kernel"} <= ahead, ahead
    assert [name for name, is_ahead in compiled if not is_ahead] == []
    with torch.no_grad():  # inference: no pass ahead
        mamba_inner_triton(hidden[:1], *weights, in_proj_weight=mixer.in_proj.weight)
    again = train_call()
    monkeypatch.setattr(mamba_inner, "_compile_first_call", lambda inputs: None)  # a run without the pass
    without = train_call()
    assert passes == [True]
    # The backward's dA, dD and dΔ-bias sums are atomic adds, in no fixed order: equal up to that.
    for a, b, c in zip(first, again, without, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)


def test_first_training_step_compiles_the_blocks_and_norms_ahead(monkeypatch):
    """The model's first training step of a kind runs the first two blocks and the final norm forward and
    backward in a dry pass ahead (`MambaModel._compile_training_ahead`), once per kind, touching no gradient,
    parameter or random state: the steps give what steps without that pass give. (On CPU the pass runs for
    real in place of compile_ahead; what it compiles on CUDA, the next test.)"""
    from peft import LoraConfig, get_peft_model

    from hf_mamba import modeling_mamba

    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    torch.manual_seed(0)
    config = MambaConfig(**{**SIZES, "num_hidden_layers": 3})
    model = MambaForCausalLM(config).to(DEVICE)
    # LoRA dropout draws random masks: the pass must leave the random state as it found it
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["out_proj"], lora_dropout=0.5))
    ids = torch.randint(0, config.vocab_size, (2, 7), device=DEVICE)
    norms, passes = [], []
    real_norm = modeling_mamba.add_rms_norm

    def recording(*args, **kwargs):
        norms.append((passes[-1] == "dry" if passes else False, torch.is_grad_enabled()))
        return real_norm(*args, **kwargs)

    def run_dry_pass(fn, *args):  # on CUDA, compile_ahead runs fn with every launch compiling only
        passes.append("dry")
        with torch.no_grad():
            fn(*args)
        passes.append("done")
        return True

    def steps():
        torch.manual_seed(1)
        out = [train_step(model, ids) for _ in range(2)]
        return out, torch.get_rng_state()

    expected, expected_rng = steps()
    monkeypatch.setattr(modeling_mamba.MambaModel, "_compiles_ahead_on", staticmethod(lambda device: True))
    monkeypatch.setattr(modeling_mamba, "compile_ahead", run_dry_pass)
    monkeypatch.setattr(modeling_mamba, "add_rms_norm", recording)
    model.get_base_model().backbone.__dict__.pop("_training_compiled_ahead", None)  # on CUDA: the real pass ran
    (first, second), rng = steps()
    assert passes == ["dry", "done"]  # once per kind
    # the pass: the add + norm after block 0 (into block 1's norm) and after block 1 (into norm_f), with gradients
    assert norms[:2] == [(True, True), (True, True)] and len(norms) == 2 + 2 * 3
    assert torch.equal(rng, expected_rng)
    # On CUDA the scan backward's atomic adds (dA, dD, the Δ bias) sum in no fixed order: equal up to that.
    tol = dict(rtol=1e-5, atol=1e-6) if CUDA else dict(rtol=0, atol=0)
    for (logits, grads), (ref_logits, ref_grads) in zip((first, second), expected, strict=True):
        torch.testing.assert_close(logits, ref_logits, **tol)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], **tol, msg=name)
    with torch.no_grad():  # inference: no pass
        model(ids[:1], use_cache=False)
    ids = ids[:, :5]  # another kind: another pass
    train_step(model, ids)
    assert passes == ["dry", "done"] * 2


def test_training_pass_ahead_waits_for_something_to_differentiate(monkeypatch):
    """A forward with gradients on but nothing to differentiate (every parameter frozen, ids as input) runs no
    pass ahead and does not count as its kind's first step: once the blocks are unfrozen (the embedding staying
    frozen, so the blocks' input is the same kind), the next call runs the pass."""
    from hf_mamba import modeling_mamba

    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    passes = []
    monkeypatch.setattr(modeling_mamba.MambaModel, "_compiles_ahead_on", staticmethod(lambda device: True))
    monkeypatch.setattr(modeling_mamba, "compile_ahead", lambda fn, *args: passes.append(fn) or True)
    model = MambaForCausalLM(MambaConfig(**SIZES)).to(DEVICE)
    ids = torch.randint(0, SIZES["vocab_size"], (1, 5), device=DEVICE)
    model.requires_grad_(False)
    model(ids)
    assert passes == []
    model.backbone.layers.requires_grad_(True)
    model(ids)
    model(ids)
    assert len(passes) == 1


@pytest.mark.skipif(not CUDA, reason="compiling ahead is for CUDA (under the interpreter nothing compiles)")
def test_first_training_step_compiles_every_kernel_ahead(monkeypatch):
    """On CUDA the first training step's kernels, the norms' included, all compile ahead (side by side)."""
    import triton

    compiled = []  # (kernel name, whether the pass ahead compiled it)
    monkeypatch.setattr(
        triton.knobs.runtime, "jit_post_compile_hook",
        lambda **kw: compiled.append((kw["fn"].name, kw["is_manual_warmup"])),
    )
    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    torch.manual_seed(0)
    # widths no other test builds kernels for (72: not a multiple of 16), so every kernel compiles here
    config = MambaConfig(**{**SIZES, "hidden_size": 72, "state_size": 6, "num_hidden_layers": 3})
    model = MambaForCausalLM(config).to(DEVICE)
    ids = torch.randint(0, config.vocab_size, (2, 33), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        train_step(model, ids)
    ahead = {name for name, is_ahead in compiled if is_ahead}
    assert {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "scan_fwd_kernel", "scan_bwd_kernel"} <= ahead, ahead
    assert [name for name, is_ahead in compiled if not is_ahead] == []


def _cache_of(output):
    """The cache a forward with use_cache=True returned (its field's name depends on Transformers' version)."""
    for name in ("cache_params", "past_key_values", "cache"):
        if output.get(name) is not None:
            return output[name]
    raise AssertionError(f"no cache in {list(output.keys())}")


@pytest.mark.parametrize(
    "dtype, falcon", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
    ids=["fp32", "bf16", "falcon-fp32"],
)
def test_fused_decode_step_equals_the_blocks(dtype, falcon, monkeypatch):
    """The decode graph's body (the mixer's fused step, add + norm fused) gives the logits and the states of
    the blocks run one by one on the PyTorch path, Falcon Mamba's norms on Δ, B and C included."""
    import hf_mamba.block as block

    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=3, state_size=8, intermediate_size=72,
        mixer_rms_eps=1e-6 if falcon else None,
    )
    model = MambaForCausalLM(config).to(DEVICE).eval()
    model.to(dtype)
    for name, param in model.named_parameters():  # what from_pretrained keeps in fp32
        if name.endswith(("A_log", "mixer.D", "dt_proj.bias")):
            param.data = param.data.float()
    import hf_mamba.modeling_mamba as modeling

    fused_calls, step_calls, projections = [], [], []
    real_add_rms_norm, real_step, real_linear = modeling.add_rms_norm, block.mamba_step_triton, block.few_rows_linear
    monkeypatch.setattr(modeling, "add_rms_norm", lambda *a, **k: fused_calls.append(1) or real_add_rms_norm(*a, **k))
    monkeypatch.setattr(block, "mamba_step_triton", lambda *a, **k: step_calls.append(1) or real_step(*a, **k))
    monkeypatch.setattr(block, "few_rows_linear", lambda *a, **k: projections.append(1) or real_linear(*a, **k))
    monkeypatch.setattr(block, "FEW_ROWS_LINEAR_MIN_WEIGHT", 0)  # these weights are tiny
    ids = torch.randint(0, 97, (2, 6), device=DEVICE)
    with torch.no_grad():
        cache = _cache_of(model(ids[:, :5], use_cache=True))
        states = cache.conv_states + cache.ssm_states
        start = [s.clone() for s in states]
        assert len(fused_calls) == config.num_hidden_layers  # the prefill runs fused too
        fused_calls.clear()
        fused = model._decode_step_logits(ids[:, 5:], cache)
        assert len(fused_calls) == len(step_calls) == config.num_hidden_layers  # the fused paths ran
        # in_proj and out_proj in one launch each where the weights are 16-bit
        assert len(projections) == (2 * config.num_hidden_layers if dtype == torch.bfloat16 else 0)
        after_fused = [s.clone() for s in states]
        for s, s0 in zip(states, start, strict=True):
            s.copy_(s0)
        monkeypatch.setenv("HF_MAMBA_BACKEND", "torch")
        plain = model._decode_step_logits(ids[:, 5:], cache)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    scale = plain.abs().max()
    assert ((fused - plain).abs().max() / scale).item() < tol
    for a, b in zip(after_fused, states, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_decode_projections_call_the_module_unless_few_rows_linear_computes_the_same(monkeypatch):
    """`project` takes few_rows_linear for a plain 16-bit Linear's few rows on the Triton backend, and calls the
    module wherever that would compute something else, lose something or not pay: more rows, a small weight,
    another backend, fp32, autocast, a gradient to track, a hook."""
    import hf_mamba.block as block

    calls = []
    monkeypatch.setattr(block, "few_rows_linear", lambda x, w, b: calls.append(x.shape) or torch.zeros(()))
    monkeypatch.setattr(block, "FEW_ROWS_LINEAR_MIN_WEIGHT", 32)
    linear = torch.nn.Linear(8, 4).to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 1, 8, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        block.project(linear, x, "triton")
        assert calls == [x.shape]
        calls.clear()
        for rows, backend in ((block.FEW_ROWS_LINEAR_ROWS.stop, "triton"), (2, "torch"), (2, None)):
            torch.testing.assert_close(block.project(linear, x[:1].expand(rows, 1, 8), backend),
                                       linear(x[:1].expand(rows, 1, 8)))
        block.project(linear.float(), x.float(), "triton")
        linear.to(torch.bfloat16)
        monkeypatch.setattr(block, "FEW_ROWS_LINEAR_MIN_WEIGHT", 33)
        block.project(linear, x, "triton")
        monkeypatch.setattr(block, "FEW_ROWS_LINEAR_MIN_WEIGHT", 32)
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            block.project(linear, x, "triton")
        handle = linear.register_forward_hook(lambda *args: None)
        block.project(linear, x, "triton")
        handle.remove()
    block.project(linear, x, "triton")  # gradients on: the weight wants one
    assert calls == []


@pytest.mark.parametrize("falcon", [False, True], ids=["mamba", "falcon"])
def test_wide_mixers_step_through_the_modules(falcon, monkeypatch):
    """Above FUSED_STEP_MAX_D_INNER, and where batch x d_inner^2 passes FUSED_STEP_MAX_BATCH_D_INNER_SQUARED, the
    decode step runs the modules' kernels (faster there; Falcon Mamba's norms in one kernel), with the same logits."""
    import hf_mamba.block as block

    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    torch.manual_seed(0)
    d_inner = 72
    config = MambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8, intermediate_size=d_inner,
                         mixer_rms_eps=1e-6 if falcon else None)
    model = MambaForCausalLM(config).to(DEVICE).eval()
    step_calls = []
    real_step = block.mamba_step_triton
    monkeypatch.setattr(block, "mamba_step_triton", lambda *a, **k: step_calls.append(1) or real_step(*a, **k))
    for batch in (1, 2):
        ids = torch.randint(0, 97, (batch, 6), device=DEVICE)
        logits = []
        # (FUSED_STEP_MAX_D_INNER, FUSED_STEP_MAX_BATCH_D_INNER_SQUARED, fused): either limit alone lets it fuse
        squared = batch * d_inner**2
        for max_d_inner, max_squared, fused in ((d_inner, 0, True), (d_inner - 1, squared, True),
                                                (d_inner - 1, squared - 1, False)):
            monkeypatch.setattr(block, "FUSED_STEP_MAX_D_INNER", max_d_inner)
            monkeypatch.setattr(block, "FUSED_STEP_MAX_BATCH_D_INNER_SQUARED", max_squared)
            with torch.no_grad():
                monkeypatch.setenv("HF_MAMBA_BACKEND", "torch")  # the prefill: the same either way, and quick
                cache = _cache_of(model(ids[:, :5], use_cache=True))
                monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
                logits.append(model._decode_step_logits(ids[:, 5:], cache))
            assert len(step_calls) == (config.num_hidden_layers if fused else 0), (batch, max_d_inner)
            step_calls.clear()
        for other in logits[1:]:
            torch.testing.assert_close(other, logits[0], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_chunks_on_cuda_give_the_eager_tokens(batch):
    """generate()'s chunked greedy loop (up to 16 replays of a greedy step that selects its token on the GPU)
    against Transformers' loop without graphs: the same tokens, with EOS, min_new_tokens and a short last chunk."""
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES, tie_word_embeddings=False)).to(DEVICE).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    ids = torch.randint(1, SIZES["vocab_size"], (batch, 12), device=DEVICE)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=46, do_sample=False)
    model.config.use_cuda_graph = False
    free = model.generate(ids, eos_token_id=None, **kwargs)
    eos = int(free[0, 12 + 20])
    eager = [
        model.generate(ids, eos_token_id=eos, **kwargs),
        model.generate(ids, eos_token_id=eos, min_new_tokens=30, **kwargs),
    ]
    model.config.use_cuda_graph = True
    assert torch.equal(model.generate(ids, eos_token_id=None, **kwargs), free)
    assert torch.equal(model.generate(ids, eos_token_id=eos, **kwargs), eager[0])
    assert torch.equal(model.generate(ids, eos_token_id=eos, min_new_tokens=30, **kwargs), eager[1])
    kinds = [kind for kind in model._decode_graphs.entries[-1].graphs if isinstance(kind, SelectStep)]
    assert sorted(kind.eos for kind in kinds) == [(), (eos,)]  # one graph per kind, kept across calls


@pytest.mark.skipif(not CUDA, reason="compiling ahead is for CUDA")
def test_first_generate_compiles_ahead_without_warnings_and_keeps_the_tokens():
    import warnings

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES)).to(DEVICE).eval()
    ids = torch.randint(1, SIZES["vocab_size"], (2, 12), device=DEVICE)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = model.generate(ids, **kwargs)
    assert (ids.device, torch.float32, 2) in model._generate_compiled_ahead
    model.config.use_cuda_graph = False
    assert torch.equal(first, model.generate(ids, **kwargs))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_sampling_on_cuda_draws_the_eager_tokens_with_the_same_seed():
    """Sampling on the GPU: torch.multinomial inside a captured graph draws from the generator's Philox
    stream at the offsets the eager loop would use, so the same seed gives Transformers' tokens."""
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES, tie_word_embeddings=False)).to(DEVICE).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    ids = torch.randint(1, SIZES["vocab_size"], (3, 12), device=DEVICE)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=46, do_sample=True, top_k=20, top_p=0.9)
    runs = []
    for graphs_on in (False, True, True):
        model.config.use_cuda_graph = graphs_on
        torch.manual_seed(7)
        runs.append(model.generate(ids, eos_token_id=None, **kwargs))
    assert torch.equal(runs[1], runs[0]) and torch.equal(runs[2], runs[0])
    kinds = [kind for kind in model._decode_graphs.entries[-1].graphs if isinstance(kind, SelectStep)]
    assert [kind.sample for kind in kinds] == [True]


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_sampling_leaves_the_generator_where_transformers_loop_does_after_an_early_eos():
    """Every row reaches EOS inside a chunk: the chunk's later replays drew, and the generator is set back, so
    a second call without a new seed draws what Transformers' loop draws there."""
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES, tie_word_embeddings=False)).to(DEVICE).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    ids = torch.randint(1, SIZES["vocab_size"], (1, 12), device=DEVICE)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=True, top_k=4)
    model.config.use_cuda_graph = False
    torch.manual_seed(3)
    probe = model.generate(ids, eos_token_id=None, **kwargs)
    eos = int(probe[0, 12 + 5])  # sampled as the 6th new token: that call stops inside the first chunk
    runs = []
    for graphs_on in (False, True):
        model.config.use_cuda_graph = graphs_on
        torch.manual_seed(3)
        runs.append([model.generate(ids, eos_token_id=eos, **kwargs) for _ in range(2)])
    assert runs[0][0].shape[1] < 12 + 16  # the first call did end inside a chunk
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(runs[1], runs[0], strict=True))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_graphs_on_cuda_match_the_forward(dtype):
    """A new sequence's prefill replayed as a graph of its bucket length (left-padded, padding masked): the last
    logits and the states as the forward's, and generate() continues with the same tokens."""
    from hf_mamba.decode_graphs import Prefill

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES)).to(DEVICE, dtype).eval()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for length in (7, 64, 100):
        ids = torch.randint(1, SIZES["vocab_size"], (3, length), device=DEVICE)
        mask = torch.ones_like(ids)
        mask[2, : length // 3] = 0
        with torch.no_grad():
            model.config.use_cuda_graph = False
            expected = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            model.config.use_cuda_graph = True
            out = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        torch.testing.assert_close(out.logits.float(), expected.logits.float(), **tol)
        mine, theirs = out.cache, expected.cache
        assert mine.seqlen_offset == theirs.seqlen_offset == length
        for a, b in zip(mine.conv_states + mine.ssm_states, theirs.conv_states + theirs.ssm_states, strict=True):
            torch.testing.assert_close(a.float(), b.float(), **tol)
    kinds = [kind for kind in model._decode_graphs.entries[-1].graphs if isinstance(kind, Prefill)]
    assert sorted(kind.length for kind in kinds) == [64, 128]
