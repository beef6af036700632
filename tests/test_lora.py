"""LoRA fine-tuning through peft: trains, generates with the adapter unmerged exactly as after merging."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from spikelm import SpikeLMConfig, SpikeLMForCausalLM
from spikelm.model.neurons import Synapses

VOCAB = 97


def lora_model(time_mix: str, neuron: str):
    torch.manual_seed(0)
    config = SpikeLMConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, head_size=16, decay_lora_rank=8,
                           intermediate_size=96, time_mix=time_mix, neuron=neuron, adaptive_k=0.4)
    base = SpikeLMForCausalLM(config)
    # "linear" is every spike site's synapses (layers.i.time_mix.key.linear, ...); decay_up is rwkv6's decay LoRA.
    targets = ["linear", "decay_up"] if time_mix == "rwkv6" else ["linear"]
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))


def train(model, ids: torch.Tensor, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def greedy(model, prompt: torch.Tensor, new_tokens: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation through ``generate`` (one-token calls after the prefill) and its per-step scores."""
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, dim=1)


@pytest.mark.parametrize(("time_mix", "neuron"), [("rwkv6", "adaptive"), ("rwkv4", "gated"), ("rwkv6", "none")])
def test_lora_trains_and_generates_unmerged_as_merged(time_mix, neuron):
    model = lora_model(time_mix, neuron)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    losses = train(model, ids, 10)
    assert losses[-1] < losses[0] - 0.1  # the adapter learns (B starts at zero, so the first step moves only B)
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)

    model.eval()
    prompt = ids[:2, :6]
    with model.disable_adapter():
        base_tokens, _ = greedy(model, prompt)
    tokens, scores = greedy(model, prompt)
    assert not torch.equal(tokens, base_tokens)  # the adapter matters in one-token decoding
    merged = model.merge_and_unload()
    assert type(merged) is SpikeLMForCausalLM and not any("lora_" in name for name, _ in merged.named_parameters())
    merged_tokens, merged_scores = greedy(merged, prompt)
    assert torch.equal(tokens, merged_tokens)
    torch.testing.assert_close(scores, merged_scores, rtol=1e-4, atol=1e-4)


def test_event_decoding_runs_under_an_unmerged_adapter():
    model = lora_model("rwkv6", "adaptive")
    train(model, torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(2)), 4)
    model.eval()
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    dense_tokens, dense_scores = greedy(model, prompt)
    model.base_model.model.set_event_decoding(True)
    event_tokens, event_scores = greedy(model, prompt)
    synapses = [m for m in model.modules() if isinstance(m, Synapses)]
    assert synapses and all(m.event_driven and m.is_input_major() for m in synapses)
    assert torch.equal(event_tokens, dense_tokens)
    torch.testing.assert_close(event_scores, dense_scores, rtol=1e-4, atol=1e-4)
    # peft merges through weight.data (no version bump): re-enabling event decoding rebuilds the input-major copies.
    merged = model.merge_and_unload()
    merged.set_event_decoding(True)
    merged_tokens, merged_scores = greedy(merged, prompt)
    assert torch.equal(merged_tokens, dense_tokens)
    torch.testing.assert_close(merged_scores, dense_scores, rtol=1e-4, atol=1e-4)
