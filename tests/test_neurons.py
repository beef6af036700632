"""Spiking neurons: the spike rules of docs/design.md, their gradients, state carry-over, padding, event expansion."""

import math

import pytest
import torch

from spikelm.model.config import SpikeLMConfig
from spikelm.model.neurons import (
    AdaptiveNeuron,
    GatedNeuron,
    IdentityNeuron,
    LIFNeuron,
    SpikingNeuron,
    build_neuron,
    expand_counts,
)


def reference_lif(x, tau, v_th, reset):
    """float32 loop of SpikeGPT's LIF: v += (x - v) / tau; spike when v >= v_th; hard or soft reset."""
    v = torch.zeros(x.shape[0], x.shape[2])
    spikes = []
    for t in range(x.shape[1]):
        v = v + (x[:, t] - v) / tau
        s = (v >= v_th).float()
        v = v * (1 - s) if reset == "hard" else v - s * v_th
        spikes.append(s)
    return torch.stack(spikes, 1), v


def reference_gated(x, forget, threshold, levels):
    """float32 loop of the gated neuron: I = f I + (1 - f) x; acc += I; emit Q(acc); acc -= theta * count."""
    current = torch.zeros(x.shape[0], x.shape[2])
    acc = torch.zeros_like(current)
    counts = []
    for t in range(x.shape[1]):
        current = forget * current + (1 - forget) * x[:, t]
        acc = acc + current
        c = torch.sign(acc) * torch.clamp(torch.floor(acc.abs() / threshold), max=levels)
        acc = acc - threshold * c
        counts.append(c)
    return torch.stack(counts, 1)


@pytest.mark.parametrize("encoding", ["binary", "ternary", "bitwise"])
@pytest.mark.parametrize("max_count", [1, 3, 8, 15])
def test_expand_counts_reconstructs_counts_exactly(encoding, max_count):
    counts = torch.randint(-max_count, max_count + 1, (3, 5, 7)).float()
    events = expand_counts(counts, encoding, max_count)
    if encoding == "bitwise":
        assert events.shape == (math.ceil(math.log2(max_count + 1)), *counts.shape)
        assert set(events.unique().tolist()) <= {0.0, 1.0}
        weights = (2.0 ** torch.arange(events.shape[0])).view(-1, 1, 1, 1)
        rebuilt = torch.sign(counts) * (weights * events).sum(0)
    elif encoding == "binary":
        assert events.shape == (max_count, *counts.shape)
        assert set(events.unique().tolist()) <= {0.0, 1.0}
        rebuilt = torch.sign(counts) * events.sum(0)
    else:
        assert events.shape == (max_count, *counts.shape)
        assert set(events.unique().tolist()) <= {-1.0, 0.0, 1.0}
        rebuilt = events.sum(0)
    assert torch.equal(rebuilt, counts)
    # Events fill the earliest virtual steps: a count of c fires on steps 0..|c|-1 (binary/ternary).
    if encoding != "bitwise":
        assert torch.equal(events.abs().sum(0), counts.abs())


def test_expand_counts_rejects_bad_input():
    with pytest.raises(ValueError, match="encoding"):
        expand_counts(torch.zeros(3), "unary", 4)
    with pytest.raises(ValueError, match="max_count"):
        expand_counts(torch.zeros(3), "binary", 0)
    with pytest.raises(ValueError, match="integers"):
        expand_counts(torch.tensor([5.0]), "binary", 4)
    with pytest.raises(ValueError, match="integers"):
        expand_counts(torch.tensor([0.5]), "ternary", 4)


def test_adaptive_neuron_rule_gradient_and_fp32_threshold():
    torch.manual_seed(0)
    neuron = AdaptiveNeuron(fan_out=5, k=3.0, max_spikes=4)
    x = (torch.randn(2, 6, 16) * torch.tensor([0.1, 1.0, 10.0]).repeat_interleave(2).view(1, 6, 1)).requires_grad_()
    seen = []
    neuron.observers.append(lambda n, counts, mask: seen.append(counts))
    y, state = neuron(x)
    assert state is None and not neuron.stateful
    threshold = x.detach().abs().mean(-1, keepdim=True) / 3.0
    counts = torch.clamp(torch.round(x.detach() / threshold), -4, 4)
    assert torch.equal(seen[0], counts)
    torch.testing.assert_close(y, threshold * counts)
    assert seen[0].abs().max() == 4  # some channels saturate at max_spikes
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, grad)  # straight-through, clamp included
    # bf16 input: the threshold math runs in fp32 and the output comes back in bf16.
    y16, _ = neuron(x.detach().bfloat16())
    assert y16.dtype == torch.bfloat16
    xb = x.detach().bfloat16().float()
    tb = xb.abs().mean(-1, keepdim=True) / 3.0
    torch.testing.assert_close(y16.float(), (tb * torch.clamp(torch.round(xb / tb), -4, 4)).bfloat16().float())


def test_adaptive_neuron_all_zero_token_and_pads_do_not_fire():
    neuron = AdaptiveNeuron(fan_out=3)
    x = torch.randn(2, 4, 8)
    x[0, 1] = 0.0
    mask = torch.tensor([[True, True, True, True], [False, False, True, True]])
    seen = []
    neuron.observers.append(lambda n, counts, m: seen.append((counts, m)))
    y, _ = neuron(x, mask=mask)
    assert torch.isfinite(y).all()
    counts, observed_mask = seen[0]
    assert observed_mask is mask
    assert counts[0, 1].abs().sum() == 0 and counts[1, :2].abs().sum() == 0 and y[1, :2].abs().sum() == 0


@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_lif_neuron_matches_reference_and_carries_its_membrane(reset):
    torch.manual_seed(1)
    neuron = LIFNeuron(fan_out=4, tau=2.0, threshold=0.5, reset=reset)
    x = torch.randn(2, 9, 6)
    spikes, membrane = neuron(x)
    ref_spikes, ref_membrane = reference_lif(x, 2.0, 0.5, reset)
    assert torch.equal(spikes, ref_spikes) and spikes.sum() > 0
    torch.testing.assert_close(membrane, ref_membrane)
    first, state = neuron(x[:, :4])
    second, state = neuron(x[:, 4:], state)
    assert torch.equal(torch.cat([first, second], 1), spikes)
    torch.testing.assert_close(state, membrane)
    # The ATan surrogate lets a gradient through although the spikes are binary.
    xg = x.clone().requires_grad_()
    neuron(xg)[0].sum().backward()
    assert xg.grad.abs().sum() > 0


def test_gated_neuron_matches_reference_state_and_gradients():
    torch.manual_seed(2)
    neuron = GatedNeuron(channels=6, fan_out=4, bits=2, threshold=0.25, forget_init=0.3)
    torch.testing.assert_close(torch.sigmoid(neuron.forget_logit), torch.full((6,), 0.3))
    assert neuron.forget_logit.dtype == torch.float32 and neuron.max_count == 3
    x = torch.randn(2, 9, 6)
    seen = []
    neuron.observers.append(lambda n, counts, mask: seen.append(counts))
    y, (current, acc) = neuron(x)
    counts = reference_gated(x, torch.full((6,), 0.3), 0.25, 3)
    assert torch.equal(seen[0], counts) and counts.abs().max() <= 3
    torch.testing.assert_close(y, 0.25 * counts)
    first, state = neuron(x[:, :5])
    second, state = neuron(x[:, 5:], state)
    assert torch.equal(torch.cat([first, second], 1), y)
    torch.testing.assert_close(state[1], acc)
    xg = x.clone().requires_grad_()
    neuron(xg)[0].sum().backward()
    assert xg.grad.abs().sum() > 0 and neuron.forget_logit.grad.abs().sum() > 0


def test_identity_neuron_observers_see_the_dense_input():
    neuron = IdentityNeuron(fan_out=2)
    x = torch.randn(1, 3, 4)
    seen = []
    neuron.observers.append(lambda n, counts, mask: seen.append(counts))
    y, state = neuron(x)
    assert torch.equal(y, x) and torch.equal(seen[0], x) and state is None and neuron.max_count is None


@pytest.mark.parametrize(("kind", "cls", "max_count", "stateful"), [
    ("adaptive", AdaptiveNeuron, 8, False), ("lif", LIFNeuron, 1, True),
    ("gated", GatedNeuron, 7, True), ("none", IdentityNeuron, None, False),
])
def test_build_neuron_kinds(kind, cls, max_count, stateful):
    config = SpikeLMConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, head_size=8, neuron=kind)
    neuron = build_neuron(config, fan_out=12)
    assert isinstance(neuron, cls) and isinstance(neuron, SpikingNeuron)
    assert (neuron.kind, neuron.max_count, neuron.stateful, neuron.fan_out) == (kind, max_count, stateful, 12)
    assert neuron.observers == []


def lsq_reference(x, scale, max_spikes, clipped, grad_scale, resolution=1):
    """LSQ written with plain autograd ops: y = (a s / r) q(clamp(r x / (a s))), a = mean|x| per token (no gradient),
    q = round, 0 where |x| < a s / 2 (the silent set), s's gradient scaled by grad_scale; the x gradient is the STE
    (unchanged, clamp included) or the clipped STE."""
    mean_abs = x.detach().abs().mean(-1, keepdim=True).clamp(min=AdaptiveNeuron.eps)
    s = scale * grad_scale + (scale - scale * grad_scale).detach()  # value s, gradient times grad_scale
    step = mean_abs * s / resolution
    source = x if clipped else x.detach()
    u = torch.clamp(source / step, -max_spikes, max_spikes)
    q = torch.round(u).masked_fill((x.detach() / step.detach()).abs() < resolution / 2, 0.0)
    y = (q - u).detach() + u  # q with a straight-through gradient
    y = y * step
    return y if clipped else y + x - x.detach()


@pytest.mark.parametrize("mode", ["site", "channel"])
@pytest.mark.parametrize("surrogate", ["ste", "clipped"])
@pytest.mark.parametrize("resolution", [1, 4])
def test_learned_scale_matches_lsq_reference_values_and_gradients(mode, surrogate, resolution):
    torch.manual_seed(0)
    max_spikes = 2 * resolution  # two thresholds
    neuron = AdaptiveNeuron(fan_out=5, k=0.4, max_spikes=max_spikes, scale=mode, channels=16, surrogate=surrogate,
                            resolution=resolution)
    with torch.no_grad():  # distinct per-channel multipliers, so a per-channel sum in the wrong order would show
        neuron.step_scale.copy_(torch.linspace(0.3, 3.0, neuron.step_scale.numel()))
    # heavy tails: some channels clip at max_spikes, many round to zero
    x = (torch.randn(3, 7, 16) * torch.rand(3, 7, 16).pow(4) * 6).requires_grad_()
    seen = []
    neuron.observers.append(lambda n, counts, mask: seen.append(counts))
    y, _ = neuron(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    scale_ref = neuron.step_scale.detach().clone().requires_grad_()
    y_ref = lsq_reference(x_ref, scale_ref, max_spikes, surrogate == "clipped",
                          1.0 / math.sqrt(x.numel() / scale_ref.numel() * max_spikes), resolution)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(neuron.step_scale.grad, scale_ref.grad)
    counts = seen[0]
    assert torch.equal(counts, torch.round(counts)) and counts.abs().max() == max_spikes  # integers, some clipped
    assert (counts == 0).float().mean() > 0.3
    threshold = x.detach().abs().mean(-1, keepdim=True) * neuron.step_scale.detach()
    assert torch.equal(counts == 0, x.detach().abs() < threshold / 2)  # the silent set moves with the multiplier
    if resolution > 1:
        assert (counts.abs() == 1).sum() == 0 and (counts.abs() == resolution + 1).any()  # fine steps above V_th / 2
    with torch.no_grad():
        torch.testing.assert_close(neuron(x.detach())[0], y.detach())  # inference = training's forward
    clipped_any = (x.detach() / threshold).abs() > 2
    assert clipped_any.any()
    if surrogate == "clipped":
        assert torch.equal(x.grad[clipped_any], torch.zeros_like(x.grad[clipped_any]))
    else:
        assert torch.equal(x.grad, grad)


@pytest.mark.parametrize("resolution", [1, 4])
def test_learned_scale_starts_as_the_fixed_rule_and_infers_like_it_trains(resolution):
    torch.manual_seed(1)
    fixed = AdaptiveNeuron(fan_out=4, k=0.4, max_spikes=32, resolution=resolution)
    learned = AdaptiveNeuron(fan_out=4, k=0.4, max_spikes=32, scale="channel", channels=8, resolution=resolution)
    torch.testing.assert_close(learned.step_scale.detach(), torch.full((8,), 2.5))
    x = torch.randn(2, 5, 8)
    counts = {}
    for name, neuron in (("fixed", fixed), ("learned", learned)):
        neuron.observers.append(lambda n, c, m, name=name: counts.setdefault(name, []).append(c))
        with torch.no_grad():
            y_eval, _ = neuron(x)
        y_train, _ = neuron(x.clone().requires_grad_())
        torch.testing.assert_close(y_eval, y_train.detach())
    assert torch.equal(counts["fixed"][0], counts["learned"][0])
    assert not learned.fires_like(AdaptiveNeuron(fan_out=4, k=0.4, scale="channel", channels=8))
    with pytest.raises(ValueError, match="channels"):
        AdaptiveNeuron(fan_out=4, scale="channel")


def test_phase_in_blends_dense_input_and_spikes():
    torch.manual_seed(2)
    neuron = AdaptiveNeuron(fan_out=4, k=0.4)
    x = torch.randn(2, 3, 8, requires_grad=True)
    spikes, _ = neuron(x.detach())
    seen = []
    neuron.observers.append(lambda n, c, m: seen.append(c))
    neuron.mix = 0.25
    y, _ = neuron(x)
    torch.testing.assert_close(y, x + 0.25 * (spikes - x))
    assert torch.equal(seen[0], torch.round(seen[0])) and (seen[0] == 0).any()  # observers still see counts
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # STE: d(x + mix (q - x))/dx = 1


def test_model_training_progress_phases_spikes_in():
    from spikelm.model.modeling import SpikeLMForCausalLM

    config = SpikeLMConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, head_size=8, adaptive_k=0.4,
                           spike_phase_in=0.5)
    model = SpikeLMForCausalLM(config)
    neurons = [m for m in model.modules() if isinstance(m, AdaptiveNeuron)]
    assert neurons and all(n.mix == 1.0 for n in neurons)  # never told: full spikes
    for progress, mix in ((0.0, 0.0), (0.1, 0.2), (0.5, 1.0), (0.9, 1.0)):
        model.set_training_progress(progress)
        assert all(n.mix == pytest.approx(mix) for n in neurons)
    plain = SpikeLMForCausalLM(SpikeLMConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, head_size=8))
    plain.set_training_progress(0.0)
    assert all(n.mix == 1.0 for n in plain.modules() if isinstance(n, AdaptiveNeuron))


def test_learned_scale_model_saves_and_loads_its_multipliers(tmp_path):
    from spikelm.model.modeling import SpikeLMForCausalLM

    config = SpikeLMConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, head_size=8, adaptive_k=0.4,
                           adaptive_scale="channel")
    model = SpikeLMForCausalLM(config)
    site = model.model.layers[0].channel_mix.value.neuron
    assert site.step_scale.shape == (config.intermediate_size,)  # per input channel of the site
    torch.testing.assert_close(site.step_scale.detach(), torch.full_like(site.step_scale, 2.5))
    with torch.no_grad():
        site.step_scale.mul_(torch.linspace(0.5, 2.0, site.step_scale.numel()))
    model.save_pretrained(tmp_path)
    loaded = SpikeLMForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.model.layers[0].channel_mix.value.neuron.step_scale, site.step_scale)
    ids = torch.randint(0, 32, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)


@pytest.mark.parametrize(("field", "value"), [("adaptive_scale", "token"), ("adaptive_surrogate", "soft"),
                                              ("spike_phase_in", 1.0), ("spike_phase_in", -0.1)])
def test_config_rejects_bad_neuron_options(field, value):
    with pytest.raises(ValueError, match=f"SpikeLMConfig.{field}"):
        SpikeLMConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, head_size=8, **{field: value})


def test_channel_mean_scale_keeps_the_mean_threshold_and_moves_precision_between_channels():
    torch.manual_seed(3)
    neuron = AdaptiveNeuron(fan_out=4, k=0.4, max_spikes=8, scale="channel_mean", channels=8)
    with torch.no_grad():
        neuron.step_scale.copy_(torch.linspace(1.0, 8.0, 8))  # mean 4.5: rescaled to mean 2.5 = 1/k
    x = torch.randn(3, 5, 8, requires_grad=True)
    seen = []
    neuron.observers.append(lambda n, c, m: seen.append(c))
    y, _ = neuron(x)
    effective = torch.linspace(1.0, 8.0, 8) * (2.5 / 4.5)
    mean_abs = x.detach().abs().mean(-1, keepdim=True)
    counts = torch.clamp(torch.round(x.detach() / (mean_abs * effective)), -8, 8)
    assert torch.equal(seen[0], counts)
    torch.testing.assert_close(y, counts * mean_abs * effective)
    # the gradient is LSQ's through the rescaling: a uniform change of all multipliers changes nothing
    y.backward(torch.randn_like(y))
    grad = neuron.step_scale.grad
    assert grad.abs().sum() > 0
    torch.testing.assert_close((grad * neuron.step_scale.detach()).sum(), torch.tensor(0.0), atol=1e-5, rtol=0)


def test_adaptive_site_k_overrides_k_at_the_named_sites(tmp_path):
    from spikelm.model.modeling import SpikeLMForCausalLM
    from spikelm.train.recipe import ModelSection

    config = SpikeLMConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, head_size=8, adaptive_k=0.4,
                           adaptive_scale="site", adaptive_site_k={"channel_mix.value": 4.0})
    model = SpikeLMForCausalLM(config)
    ks = {n.site: (n.k, float(n.step_scale.detach())) for n in model.modules() if isinstance(n, AdaptiveNeuron)}
    assert ks["layers.1.channel_mix.value"] == (4.0, 0.25) and ks["layers.0.channel_mix.value"][0] == 4.0
    assert all(k == (0.4, pytest.approx(2.5)) for site, k in ks.items() if not site.endswith("channel_mix.value"))
    model.save_pretrained(tmp_path)
    loaded = SpikeLMForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[0].channel_mix.value.neuron.k == 4.0
    assert loaded.model.layers[0].channel_mix.key.neuron.k == 0.4
    with pytest.raises(ValueError, match="adaptive_site_k: unknown site 'mlp.value'"):
        SpikeLMConfig(adaptive_site_k={"mlp.value": 3.0})
    with pytest.raises(ValueError, match="adaptive_site_k"):
        SpikeLMConfig(adaptive_site_k={"channel_mix.value": 0})
    section = ModelSection(overrides={"adaptive_site_k": {"time_mix.output": 2.0}})
    assert section.build_config(32).adaptive_site_k == {"time_mix.output": 2.0}


@pytest.mark.parametrize("surrogate", ["ste", "clipped"])
def test_resolution_keeps_the_silent_set_and_quantises_active_inputs_finer(surrogate):
    torch.manual_seed(4)
    coarse = AdaptiveNeuron(fan_out=4, k=0.4, max_spikes=8)
    fine = AdaptiveNeuron(fan_out=4, k=0.4, max_spikes=8, resolution=4, surrogate=surrogate)
    x = (torch.randn(3, 6, 32) * torch.rand(3, 6, 32).pow(3) * 4).requires_grad_()
    seen = {}
    for name, neuron in (("coarse", coarse), ("fine", fine)):
        neuron.observers.append(lambda n, c, m, name=name: seen.setdefault(name, c))
    y_coarse, _ = coarse(x.detach())
    y, _ = fine(x)
    threshold = x.detach().abs().mean(-1, keepdim=True) / 0.4
    expected = torch.clamp(torch.round(4 * x.detach() / threshold), -8, 8)
    expected[x.detach().abs() < threshold / 2] = 0
    assert torch.equal(seen["fine"], expected)
    assert torch.equal(seen["fine"] == 0, seen["coarse"] == 0)  # the same zeros, hence the same sparsity
    assert seen["fine"].abs().max() == 8  # some clipped
    torch.testing.assert_close(y, expected * threshold / 4)
    active = seen["fine"] != 0
    # finer steps: the active inputs' error is at most a quarter step of r = 1 (where not clipped)
    unclipped = active & (seen["fine"].abs() < 8)
    assert ((y - x).detach()[unclipped].abs() <= threshold.expand_as(x)[unclipped] / 8 + 1e-6).all()
    assert (y - x).detach()[unclipped].abs().mean() < (y_coarse - x).detach()[unclipped].abs().mean()
    grad = torch.randn_like(y)
    y.backward(grad)
    if surrogate == "ste":
        assert torch.equal(x.grad, grad)
    else:
        clipped = (4 * x.detach() / threshold).round().abs() > 8
        assert clipped.any() and torch.equal(x.grad, grad * ~clipped)
    with torch.no_grad():
        y_eval, _ = fine(x)
    torch.testing.assert_close(y_eval, y.detach())


def test_zero_target_raises_thresholds_until_the_floor_holds():
    """``adaptive_zero_target``: the hinge on the smooth zero fraction reaches only the learned multipliers, and
    descending it alone raises the model's real zero fraction to the floor."""
    from spikelm.model.modeling import SpikeLMForCausalLM

    torch.manual_seed(4)
    config = SpikeLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, head_size=16, adaptive_k=0.4,
                           adaptive_scale="channel", adaptive_resolution=4, max_spikes=64, adaptive_zero_target=0.85)
    model = SpikeLMForCausalLM(config).train()
    assert model.zero_target_loss() is None  # nothing tracked before a training forward
    ids = torch.randint(0, 64, (4, 32))
    scales = [p for name, p in model.named_parameters() if name.endswith("step_scale")]
    optimizer = torch.optim.Adam(scales, lr=0.05)

    def real_zeros() -> float:
        seen = []
        for neuron in (m for m in model.modules() if isinstance(m, AdaptiveNeuron)):
            neuron.observers.append(lambda n, counts, mask: seen.append(counts))
        with torch.no_grad():
            model(input_ids=ids)
        for neuron in (m for m in model.modules() if isinstance(m, AdaptiveNeuron)):
            neuron.observers.clear()
        return sum(float((c == 0).sum()) for c in seen) / sum(c.numel() for c in seen)

    before = real_zeros()
    assert before < 0.8
    for step in range(60):
        model(input_ids=ids)
        term, soft = model.zero_target_loss()
        if step == 0:
            others = [p for name, p in model.named_parameters() if not name.endswith("step_scale")]
            grads = torch.autograd.grad(term, others, retain_graph=True, allow_unused=True)
            assert all(g is None or not g.any() for g in grads)  # the activations and weights get nothing
            assert term.item() == pytest.approx(0.85 - soft.item(), rel=1e-6) and abs(float(soft) - before) < 0.05
        optimizer.zero_grad()
        term.backward()
        optimizer.step()
    assert real_zeros() > 0.83
    with pytest.raises(ValueError, match="adaptive_zero_target needs neuron 'adaptive' with a learned"):
        SpikeLMConfig(adaptive_zero_target=0.8)
    with pytest.raises(ValueError, match="must be a zero fraction in"):
        SpikeLMConfig(adaptive_scale="channel", adaptive_zero_target=1.0)
