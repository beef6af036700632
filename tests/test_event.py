"""Event-driven decoding (docs/design.md, "Event-driven decoding"): equals the dense path, holds one copy of the
weights, leaves saved files unchanged, falls back or refuses on bad input, and "auto" decides once and caches."""

import pytest
import torch
from safetensors.torch import load_file
from test_model import run_in_chunks as chunked_logits_and_cache

from spikelm.kernels.rwkv6 import rwkv6_scan_naive
from spikelm.model import event, event_kernel, neurons, time_mix
from spikelm.model.config import SpikeLMConfig
from spikelm.model.modeling import SpikeLMForCausalLM
from spikelm.model.neurons import SpikingLinear, Synapses

VOCAB = 97


def tiny_model(time_mix="rwkv6", neuron="adaptive", **overrides):
    torch.manual_seed(0)
    config = SpikeLMConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, head_size=16, decay_lora_rank=8,
                           intermediate_size=96, time_mix=time_mix, neuron=neuron, adaptive_k=0.4, **overrides)
    return SpikeLMForCausalLM(config).eval()


def run_in_chunks(model, ids, sizes):
    return chunked_logits_and_cache(model, ids, sizes)[0]


def greedy(model, prompt, new_tokens=10):
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, dim=1)


def storage_bytes(model):
    """Bytes of every distinct storage the model holds: parameters, buffers and any tensor attribute."""
    storages = {}
    for module in model.modules():
        tensors = [*module._parameters.values(), *module._buffers.values(),
                   *(v for v in vars(module).values() if isinstance(v, torch.Tensor))]
        for tensor in tensors:
            if tensor is not None:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def count_kernel_calls(monkeypatch):
    """Record the name of every event-kernel entry point called (the compiled module's, or the Python fallbacks
    where they are imported when the kernel is unavailable)."""
    calls = []
    module = event_kernel.extension()
    if module is not None:
        class Counting:
            def __getattr__(self, name):
                function = getattr(module, name)
                return lambda *args: calls.append(name) or function(*args)

        monkeypatch.setitem(event_kernel._state, "module", Counting())
        return calls
    for where in (neurons, time_mix):
        for name in ("event_linear", "adaptive_event_linear"):
            if hasattr(where, name):
                original = getattr(event_kernel, name)
                monkeypatch.setattr(where, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    return calls


DEFAULT_NEURON = {"adaptive_resolution": 4, "max_spikes": 32}  # the default recipe's, with adaptive_k 0.4


@pytest.mark.parametrize(("time_mix", "neuron", "overrides"), [
    ("rwkv6", "adaptive", DEFAULT_NEURON), ("rwkv6", "adaptive", {}), ("rwkv4", "lif", {}), ("rwkv6", "gated", {}),
])
def test_event_decoding_equals_dense_and_holds_one_copy(time_mix, neuron, overrides, monkeypatch):
    model = tiny_model(time_mix, neuron, **overrides)
    model.set_event_decoding(False)
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(5))
    prompt = ids[:, :4]
    dense_bytes = storage_bytes(model)
    with torch.no_grad():
        dense = run_in_chunks(model, ids, [4] + [1] * 6)
    dense_tokens, dense_scores = greedy(model, prompt)
    one_tokens, _ = greedy(model, prompt[:1])
    model.set_event_decoding(True)
    synapses = [m.linear for m in model.modules() if isinstance(m, SpikingLinear)]
    assert all(s.event_driven and s.is_input_major() and s.weight.t().is_contiguous() for s in synapses)
    assert storage_bytes(model) <= 1.1 * dense_bytes  # the input-major layout instead of the dense one, not beside
    calls = count_kernel_calls(monkeypatch)
    with torch.no_grad():
        stepped = run_in_chunks(model, ids, [4] + [1] * 6)
    torch.testing.assert_close(stepped, dense, rtol=1e-4, atol=1e-4)
    event_tokens, event_scores = greedy(model, prompt)
    assert torch.equal(event_tokens, dense_tokens)  # fp32: greedy generations identical
    torch.testing.assert_close(event_scores, dense_scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy(model, prompt[:1])[0], one_tokens)  # batch 1
    assert calls  # the event kernel ran


@pytest.mark.parametrize("compiled", [True, False], ids=["kernel", "embedding_bag"])
def test_fused_sites_equal_the_module_path(compiled, monkeypatch):
    # The fused call (neuron rule + synapses in the kernel) against the same model with a hook on every neuron,
    # which sends each site through its modules; and the embedding_bag fallback when the kernel is unavailable.
    if not compiled:
        monkeypatch.setitem(event_kernel._state, "module", None)
    model = tiny_model(**DEFAULT_NEURON)
    model.set_event_decoding(True)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(11))
    calls = count_kernel_calls(monkeypatch)
    with torch.no_grad():
        fused = run_in_chunks(model, ids, [4, 1, 1, 1, 1])
        # compiled: the 4-token prompt through the prompt kernels, then each block in one call; fallback: each
        # stack of sites in one call
        prompt = {"adaptive_fire", "wkv6_sequence"} if compiled else set()
        assert calls and set(calls) == {"rwkv6_block_step" if compiled else "adaptive_event_linear"} | prompt
        handles = [m.register_forward_hook(lambda *a: None) for m in model.modules()
                   if isinstance(m, neurons.SpikingNeuron)]
        calls.clear()
        through_modules = run_in_chunks(model, ids, [4, 1, 1, 1, 1])
        assert calls and set(calls) == {"event_linear"} | prompt  # per-site synapses, still event-driven
        for handle in handles:
            handle.remove()
        model.set_event_decoding(False)
        dense = run_in_chunks(model, ids, [4, 1, 1, 1, 1])
    torch.testing.assert_close(fused, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(through_modules, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("resolution", [1, 4, 3])
def test_kernel_spikes_are_the_neurons_bit_for_bit(resolution, monkeypatch):
    # Through an identity table each output is exactly one spike value, so the kernel's spikes can be compared with
    # the neuron's own torch rule bit for bit; so is the neuron's inference kernel (adaptive_fire: V_th from its own
    # sums, then the rule) on widths that are not a multiple of the 8-wide vectors, row counts that are not a
    # multiple of its 8-row groups, all-zero tokens and a model's width.
    neuron = neurons.AdaptiveNeuron(64, k=0.4, max_spikes=32 if resolution > 1 else 8, resolution=resolution)
    x = torch.randn(3, 2, 1, 64) * torch.rand(3, 2, 1, 1) * 5
    prompts = [torch.randn(2, 9, 61) * torch.rand(2, 9, 1) * 5, torch.randn(3, 7, 768) * torch.rand(3, 7, 1) * 50]
    prompts[0][0, :2] = 0
    module = event_kernel.extension()
    with torch.no_grad():
        monkeypatch.setitem(event_kernel._state, "module", None)
        expected, _ = neuron(x.reshape(6, 1, 64))
        expected_prompts = [neuron(prompt)[0] for prompt in prompts]
        monkeypatch.setitem(event_kernel._state, "module", module)
        threshold = neuron.event_threshold(x.reshape(6, 64))
        got = event_kernel.adaptive_event_linear(x.reshape(3, 2, 64), threshold.view(3, 2), resolution,
                                                 neuron.max_spikes, [torch.eye(64)] * 3)
        got_prompts = [neuron(prompt)[0] for prompt in prompts]
    assert torch.equal(torch.stack(got).reshape(6, 1, 64), expected)
    for got_prompt, expected_prompt in zip(got_prompts, expected_prompts, strict=True):
        assert torch.equal(got_prompt, expected_prompt)


@pytest.mark.parametrize("width", [40, 44])  # 32 + 8 columns in vectors; 40 + a scalar tail of 4
def test_wkv6_sequence_equals_the_naive_scan(width):
    if event_kernel.extension() is None:
        pytest.skip("the C++ extension did not build here")
    g = torch.Generator().manual_seed(3)
    B, T, H = 2, 7, 2
    r, k, v = (torch.randn(B, T, H, width, generator=g) for _ in range(3))
    w = -torch.exp(torch.randn(B, T, H, width, generator=g))
    w[0, 2, 0, :3] = -torch.exp(torch.tensor(5.0))  # a decay of exp(-148): the state's row is wiped
    u = torch.randn(H, width, generator=g)
    for state in (None, torch.randn(B, H, width, width, generator=g)):
        expected, expected_state = rwkv6_scan_naive(r, k, v, w, u, state, output_final_state=True)
        got, got_state = event_kernel.wkv6_sequence(r, k, v, w, u, state)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_state, expected_state, rtol=1e-5, atol=1e-5)


def test_prompts_on_cpu_take_the_inference_kernels_and_equal_the_torch_path(monkeypatch):
    # A (left-padded) prompt without autograd: the neurons' one-pass rule and the C++ recurrence; the same logits
    # and states as the torch path (chunked scan) within float tolerance. With autograd the torch path runs.
    model = tiny_model(**DEFAULT_NEURON)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    calls = count_kernel_calls(monkeypatch)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
    if event_kernel.extension() is not None:
        assert set(calls) == {"adaptive_fire", "wkv6_sequence"}
    calls.clear()
    model(ids, attention_mask=mask, use_cache=True)  # autograd on: the differentiable torch path
    assert not calls
    monkeypatch.setitem(event_kernel._state, "module", None)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(out.logits, reference.logits, rtol=1e-5, atol=1e-5)
    for layer, expected in zip(out.past_key_values.layers, reference.past_key_values.layers, strict=True):
        torch.testing.assert_close(layer["time_mix"]["wkv"], expected["time_mix"]["wkv"], rtol=1e-5, atol=1e-5)


def test_event_path_is_taken_and_matches_each_projection():
    model = tiny_model(**DEFAULT_NEURON)
    model.set_event_decoding(True)
    synapses = model.model.layers[0].channel_mix.key.linear
    spikes = torch.randn(3, 1, 64)
    spikes[torch.rand_like(spikes) < 0.75] = 0
    with torch.no_grad():
        expected = spikes @ synapses.weight.t()
        original = torch.nn.functional.linear
        torch.nn.functional.linear = None  # the event path must not call the dense product
        try:
            got_batch, got_one = synapses(spikes), synapses(spikes[:1])
        finally:
            torch.nn.functional.linear = original
    torch.testing.assert_close(got_batch, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_one, expected[:1], rtol=1e-5, atol=1e-6)


def test_save_pretrained_is_unchanged_by_event_mode(tmp_path):
    model = tiny_model(**DEFAULT_NEURON)
    model.set_event_decoding(False)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    model.save_pretrained(tmp_path / "dense")
    model.set_event_decoding(True)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], value) and after[name].is_contiguous() for name, value in before.items())
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), use_cache=True)
    model.save_pretrained(tmp_path / "event")
    dense_file, event_file = (tmp_path / d / "model.safetensors" for d in ("dense", "event"))
    assert dense_file.read_bytes() == event_file.read_bytes()
    loaded = load_file(event_file)
    assert all(torch.equal(loaded[name], value) for name, value in before.items() if name in loaded)


def test_training_restores_the_dense_layout_and_autograd_stays_dense():
    model = tiny_model()
    model.set_event_decoding(True)
    synapses = model.model.layers[0].time_mix.key.linear
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        synapses.weight.mul_(-2.0)  # an in-place update is read by the event path at once (same storage)
        full = model(ids).logits
        stepped = run_in_chunks(model, ids, [5, 1])
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)
    # Parameters require grad (as loaded by from_pretrained): with autograd on, the step stays dense.
    cache = model(ids[:, :5], use_cache=True).past_key_values
    out = model(ids[:, 5:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(out, full[:, 5:], rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert synapses.weight.grad is not None and synapses.weight.grad.abs().sum() > 0
    model.train()
    assert synapses.weight.is_contiguous() and not synapses.is_input_major()
    model.eval()
    assert synapses.is_input_major()
    model.set_event_decoding(False)
    assert not synapses.event_driven and synapses.weight.is_contiguous()


def test_bad_input_refused_or_dense():
    model = tiny_model()
    model.train()
    with pytest.raises(ValueError, match="model.eval"):
        model.set_event_decoding(True)
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        model.set_event_decoding("fast")
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(ids).logits
    model.set_event_decoding(True)
    # A weight replaced behind the model's back (its .data set to a standard layout, as some libraries do) and a
    # hook that changes a projection's input: each site then takes the dense product, with the same results.
    replaced = model.model.layers[1].channel_mix.value.linear
    replaced.weight.data = replaced.weight.data.contiguous()
    assert not replaced.is_input_major()
    hooked = model.model.layers[0].time_mix.key.linear
    hooked.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    with torch.no_grad():
        stepped = run_in_chunks(model, ids, [5, 1])
        model.set_event_decoding(False)
        dense = run_in_chunks(model, ids, [5, 1])
    torch.testing.assert_close(stepped, dense, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(dense, full)  # the hook took effect in both


def test_dense_twin_has_no_event_sites():
    model = tiny_model(neuron="none")
    model.set_event_decoding(True)
    assert not any(m.linear.event_driven for m in model.modules() if isinstance(m, SpikingLinear))
    assert not event.event_synapses(model)


def test_auto_decides_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKELM_CACHE", str(tmp_path))
    monkeypatch.setattr(event, "_decisions", {})
    model = tiny_model()
    assert model.event_decoding == "auto"
    calls = []
    monkeypatch.setattr(event, "calibrate", lambda m: calls.append(m) or True)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values  # a prompt: nothing decided yet
        assert not calls and not any(s.event_driven for s in event.event_synapses(model))
        model(ids[:, :1], past_key_values=cache, use_cache=True)
    assert not calls and not any(s.event_driven for s in event.event_synapses(model))  # tiny: fits in cache, dense

    monkeypatch.setattr(event, "SMALL_BYTES", 0)  # pretend the weights do not fit in cache
    for _ in range(2):
        model = tiny_model()
        with torch.no_grad():
            model(ids[:, :1])
        assert all(s.event_driven and s.is_input_major() for s in event.event_synapses(model))
    assert len(calls) == 1  # the second model of the same shape reused the choice
    assert list(__import__("json").loads(event.cache_path().read_text()).values()) == [True]
    monkeypatch.setattr(event, "_decisions", {})  # a new process: read from disk
    model = tiny_model()
    with torch.no_grad():
        model(ids[:, :1])
    assert len(calls) == 1 and all(s.event_driven for s in event.event_synapses(model))

    model = tiny_model(**DEFAULT_NEURON)  # another neuron setting: another key, calibrated anew
    model.train()
    with torch.no_grad():
        model(ids[:, :1])  # training mode: nothing decided
    assert len(calls) == 1


def test_calibration_runs_on_the_model_and_leaves_results_unchanged(monkeypatch, tmp_path):
    monkeypatch.setenv("SPIKELM_CACHE", str(tmp_path))
    model = tiny_model(**DEFAULT_NEURON)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(8))
    model.set_event_decoding(False)
    with torch.no_grad():
        dense = run_in_chunks(model, ids, [4, 1, 1])
    choice = event.calibrate(model)
    assert isinstance(choice, bool)
    event.apply(model, choice)
    with torch.no_grad():
        after = run_in_chunks(model, ids, [4, 1, 1])
    torch.testing.assert_close(after, dense, rtol=1e-4, atol=1e-4)


def test_lora_wrapped_synapses_decode_event_driven():
    peft = pytest.importorskip("peft")
    model = tiny_model(**DEFAULT_NEURON)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["linear"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # a trained adapter
    model.eval()
    prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(9))
    model.base_model.model.set_event_decoding(False)
    dense_tokens, dense_scores = greedy(model, prompt)
    model.base_model.model.set_event_decoding(True)
    synapses = [m for m in model.modules() if isinstance(m, Synapses)]
    assert synapses and all(m.event_driven and m.is_input_major() for m in synapses)
    event_tokens, event_scores = greedy(model, prompt)
    assert torch.equal(event_tokens, dense_tokens)
    torch.testing.assert_close(event_scores, dense_scores, rtol=1e-4, atol=1e-4)


def test_block_plan_follows_changes_between_tokens(monkeypatch):
    # rwkv6_block_step keeps each block's checked arguments as a plan; a neuron setting changed, a weight laid out
    # again behind the module or a hook added between two tokens must be seen at the next token.
    model = tiny_model(**DEFAULT_NEURON)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(13))
    model.set_event_decoding(True)
    if event_kernel.extension() is None:
        pytest.skip("the C++ extension did not build here")
    calls = count_kernel_calls(monkeypatch)
    prompt = {"adaptive_fire", "wkv6_sequence"}

    def changed(step):
        with torch.no_grad():
            model.set_event_decoding(True)
            run_in_chunks(model, ids[:, :4], [3, 1])  # the plans are made
            step()
            calls.clear()
            event_out = run_in_chunks(model, ids, [3, 1, 1, 1])
            event_calls = list(calls)
            model.set_event_decoding(False)
            dense = run_in_chunks(model, ids, [3, 1, 1, 1])
        torch.testing.assert_close(event_out, dense, rtol=1e-5, atol=1e-5)
        return event_calls

    def new_k():
        for module in model.modules():
            if isinstance(module, neurons.AdaptiveNeuron):
                module.k = 0.7
    assert set(changed(new_k)) - prompt == {"rwkv6_block_step"}  # with the new k: equal to dense with it
    synapses = model.model.layers[1].time_mix.key.linear
    # block 1's kernel call refuses the standard layout; its modules then run (the other sites still event-driven)
    relaid = changed(lambda: setattr(synapses.weight, "data", synapses.weight.detach().contiguous()))
    assert relaid.count("rwkv6_block_step") == 6 and "event_linear" in relaid
    handle = model.model.layers[0].ln2.register_forward_hook(lambda *a: None)
    hooked = changed(lambda: None)
    assert hooked.count("rwkv6_block_step") == 3 and "adaptive_event_linear" in hooked  # block 1 only
    handle.remove()
    assert set(changed(lambda: None)) - prompt == {"rwkv6_block_step"}


def test_small_models_never_wait_for_the_kernel_build(monkeypatch):
    # The prompt kernels only use an extension something already loaded; SpikeLMForCausalLM loads it at its first
    # CPU inference call only past event.SMALL_BYTES of spiking weights (a tiny model's first generate must not
    # wait about a minute for a build that gains it little).
    original, asked = event_kernel.extension, []

    def spy(build=True):
        asked.append(build)
        return original(build)

    monkeypatch.setattr(event_kernel, "_state", {})  # nothing loaded in this process yet
    monkeypatch.setattr(event_kernel, "extension", spy)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(17))
    with torch.no_grad():
        tiny_model(**DEFAULT_NEURON)(ids)
    assert asked and True not in asked and "module" not in event_kernel._state
    monkeypatch.setattr(event, "SMALL_BYTES", 0)  # the same model counted as large
    with torch.no_grad():
        tiny_model(**DEFAULT_NEURON)(ids)
    assert True in asked and "module" in event_kernel._state
