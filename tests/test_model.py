"""The spiking RWKV model: parallel == recurrent == chunked, padding invariance, loss, checkpointing, bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from spikelm.measure.sparsity import find_spike_sites
from spikelm.model.cache import SpikeLMCache
from spikelm.model.config import SpikeLMConfig
from spikelm.model.modeling import SpikeLMForCausalLM
from spikelm.model.neurons import SpikingNeuron

COMBOS = list(itertools.product(["rwkv6", "rwkv4"], ["adaptive", "lif", "gated", "none"]))
IDS = [f"{t}-{n}" for t, n in COMBOS]
VOCAB = 97



def tiny_model(time_mix="rwkv6", neuron="adaptive", seed=0, **overrides):
    torch.manual_seed(seed)
    config = SpikeLMConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, head_size=16, decay_lora_rank=8,
                           intermediate_size=96, time_mix=time_mix, neuron=neuron, **overrides)
    return SpikeLMForCausalLM(config).eval()


class CountRecorder:
    """Collects every site's spike counts, call after call."""

    def __init__(self, model):
        self.counts: dict[str, list[torch.Tensor]] = {}
        for module in model.modules():
            if isinstance(module, SpikingNeuron):
                module.observers.append(self)

    def __call__(self, neuron, counts, mask):
        self.counts.setdefault(neuron.site, []).append(counts.detach().clone())

    def joined(self):
        return {site: torch.cat(chunks, dim=1) for site, chunks in self.counts.items()}


def run_in_chunks(model, ids, sizes):
    cache, logits = None, []
    for chunk in torch.split(ids, sizes, dim=1):
        out = model(chunk, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize(("time_mix", "neuron"), COMBOS, ids=IDS)
def test_parallel_equals_recurrent_and_chunked(time_mix, neuron):
    model = tiny_model(time_mix, neuron, spike_lm_head=True)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full_rec = CountRecorder(model)
        full = model(ids).logits
        full_counts = full_rec.joined()
        for module in model.modules():
            if isinstance(module, SpikingNeuron):
                module.observers.clear()
        results = []
        for sizes in ([1] * 13, [5, 1, 4, 3]):
            rec = CountRecorder(model)
            logits, cache = run_in_chunks(model, ids, sizes)
            results.append((logits, rec.joined(), cache))
            for module in model.modules():
                if isinstance(module, SpikingNeuron):
                    module.observers.clear()
    assert torch.isfinite(full).all()
    for logits, counts, cache in results:
        torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
        assert counts.keys() == full_counts.keys()
        for site, site_counts in counts.items():
            if neuron == "none":  # the dense twin's "counts" are its float inputs
                torch.testing.assert_close(site_counts, full_counts[site], rtol=1e-5, atol=1e-5, msg=site)
            else:
                assert torch.equal(site_counts, full_counts[site]), site
        assert cache.get_seq_length() == 13
    if neuron != "none":
        assert sum(c.abs().sum() for c in full_counts.values()) > 0  # the sites do fire


@pytest.mark.parametrize(("time_mix", "neuron"), COMBOS, ids=IDS)
def test_left_padded_batch_equals_each_prompt_alone(time_mix, neuron):
    model = tiny_model(time_mix, neuron)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (5, 9, 3)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # pad id 0
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for row, p in enumerate(prompts):
            alone = model(p[None]).logits[0]
            torch.testing.assert_close(batch[row, width - len(p):], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("time_mix", "neuron"), [("rwkv6", "lif"), ("rwkv4", "gated"), ("rwkv6", "adaptive")])
def test_left_padded_generation_equals_each_prompt_alone(time_mix, neuron):
    model = tiny_model(time_mix, neuron)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (6, 2)]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, 6 - len(p):], mask[row, 6 - len(p):] = p, 1
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    batch = model.generate(ids, attention_mask=mask, **kwargs)[:, 6:]
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)
        assert torch.equal(batch[row], alone[0, len(p):])


@pytest.mark.parametrize("time_mix", ["rwkv6", "rwkv4"])
def test_observing_sites_does_not_change_the_output(time_mix):
    # Unobserved stateless sites of one mix fire in a single stacked call; observed ones fire one by one.
    model = tiny_model(time_mix, "adaptive").train()
    ids = torch.randint(0, VOCAB, (2, 9))
    fast = model(ids, labels=ids)
    fast.loss.backward()
    fast_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    CountRecorder(model)
    observed = model(ids, labels=ids)
    observed.loss.backward()
    torch.testing.assert_close(observed.logits, fast.logits, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, fast_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_cache_size_is_constant_in_the_context_length():
    model = tiny_model("rwkv6", "lif")
    ids = torch.randint(0, VOCAB, (1, 30))

    def numel(cache: SpikeLMCache) -> int:
        total = 0
        cache.map_(lambda t: t)  # the mapping walks every tensor; count them on the way
        for layer in cache.layers:
            for part in layer.values():
                for value in part.values():
                    total += sum(v.numel() for v in value) if isinstance(value, tuple) else value.numel()
        return total

    with torch.no_grad():
        _, short = run_in_chunks(model, ids[:, :2], [2])
        _, long = run_in_chunks(model, ids, [30])
    assert numel(short) == numel(long) > 0


def test_labels_give_the_shifted_loss_with_ignored_positions():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 7))
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("neuron", ["adaptive", "gated"])
def test_gradient_checkpointing_gives_the_same_gradients(neuron):
    model = tiny_model("rwkv6", neuron).train()
    ids = torch.randint(0, VOCAB, (2, 9))
    model(ids, labels=ids).loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    out = model(ids, labels=ids, use_cache=True)
    assert out.past_key_values is None  # checkpointed training does not build a cache
    out.loss.backward()
    assert plain.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if name in plain:
            torch.testing.assert_close(p.grad, plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_tiny_model_learns_quickly():
    model = tiny_model("rwkv6", "adaptive").train()
    torch.manual_seed(0)
    pattern = torch.randint(3, VOCAB, (1, 8))
    ids = pattern.repeat(2, 3)  # a sequence that repeats: easy to predict once learned
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_sites_are_named_and_sized():
    model = tiny_model("rwkv6", "adaptive", spike_lm_head=True)
    sites = dict(find_spike_sites(model))
    expected = {f"layers.{i}.time_mix.{n}" for i in range(2) for n in
                ("receptance", "key", "value", "gate", "decay", "output")}
    expected |= {f"layers.{i}.channel_mix.{n}" for i in range(2) for n in ("key", "receptance", "value")}
    assert set(sites) == expected | {"lm_head"}
    assert sites["layers.0.channel_mix.key"].fan_out == 96 and sites["layers.0.time_mix.decay"].fan_out == 8
    assert sites["lm_head"].fan_out == VOCAB
    rwkv4 = dict(find_spike_sites(tiny_model("rwkv4", "lif")))
    assert "layers.1.time_mix.output" in rwkv4 and "layers.1.time_mix.gate" not in rwkv4


@pytest.mark.parametrize("time_mix", ["rwkv6", "rwkv4"])
def test_bf16_forward_keeps_recurrence_math_finite(time_mix):
    model = tiny_model(time_mix, "adaptive").to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        logits16 = model(ids).logits
    assert logits16.dtype == torch.bfloat16 and torch.isfinite(logits16.float()).all()


def test_bad_input_raises_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token id 97 .* 97 tokens"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="SpikeLMCache"):
        model(torch.tensor([[1]]), past_key_values=object(), use_cache=True)


@pytest.mark.parametrize(("field", "overrides"), [
    ("neuron", {"neuron": "izhikevich"}),
    ("time_mix", {"time_mix": "mamba"}),
    ("head_size", {"hidden_size": 64, "head_size": 24}),
])
def test_bad_config_raises_clear_errors(field, overrides):
    with pytest.raises(ValueError, match=field):
        SpikeLMConfig(vocab_size=VOCAB, **overrides)


def _flat_states(cache):
    """Every state tensor of a cache, in a fixed order."""
    out = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, dict):
            for key in sorted(value):
                walk(value[key])
        elif isinstance(value, tuple | list):
            for item in value:
                walk(item)

    walk(cache.layers)
    walk(cache.head_state)
    return out


@pytest.mark.parametrize(("time_mix", "neuron"), COMBOS, ids=IDS)
def test_one_token_decoding_leaves_the_states_of_one_call(time_mix, neuron):
    # Decoding token by token after a prefill must leave every recurrent state (shifts, WKV, neuron states, the head
    # site's) as one call over the whole sequence does, not only the same logits.
    model = tiny_model(time_mix, neuron, spike_lm_head=True)
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stepped, step_cache = run_in_chunks(model, ids, [3] + [1] * 6)
        whole, whole_cache = run_in_chunks(model, ids, [9])
    torch.testing.assert_close(stepped, whole, rtol=1e-5, atol=1e-5)
    step_states, whole_states = _flat_states(step_cache), _flat_states(whole_cache)
    assert len(step_states) == len(whole_states) > 0
    for a, b in zip(step_states, whole_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_decoding_step_honours_hooks_and_replaced_layers():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    calls = []
    model.model.layers[0].time_mix.key.linear.register_forward_hook(lambda *args: calls.append(1))

    class DoubledLinear(torch.nn.Linear):  # stands in for a LoRA / quantised layer swapped in by a library
        def forward(self, x):
            return 2 * super().forward(x)

    old = model.model.layers[1].channel_mix.value.linear
    new = DoubledLinear(old.in_features, old.out_features, bias=False)
    new.weight.data.copy_(old.weight)
    model.model.layers[1].channel_mix.value.linear = new
    with torch.no_grad():
        full = model(ids).logits
        calls.clear()
        stepped, _ = run_in_chunks(model, ids, [1] * 8)
    assert len(calls) == 8  # the hook fired on every one-token call
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)  # and the replacement took effect in both


def test_decoding_step_returns_hidden_states():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids, output_hidden_states=True).hidden_states
        cache = model(ids[:, :4], use_cache=True).past_key_values
        last = model(ids[:, 4:], past_key_values=cache, use_cache=True, output_hidden_states=True).hidden_states
    assert len(last) == len(full) == model.config.num_hidden_layers + 1
    for step_hidden, full_hidden in zip(last, full, strict=True):
        torch.testing.assert_close(step_hidden, full_hidden[:, 4:], rtol=1e-5, atol=1e-5)
