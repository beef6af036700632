"""An exported SpikeLM scores continuations through the plain ``AutoModelForCausalLM`` API the way evaluation
harnesses (lm-eval-harness ``loglikelihood``) do: the score of a continuation is the sum of the log-probabilities of
its tokens given the context, and whether each of them is the greedy choice. Requests of different lengths are
batched with padding (right padding without a mask, as the harness does; right or left padding with an
``attention_mask``), and every score must equal the score of the request run alone.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import spikelm  # noqa: F401  (registers model_type "spikelm" with the Auto classes)
from spikelm.model.config import SpikeLMConfig
from spikelm.model.modeling import SpikeLMForCausalLM

VOCAB = 96
PAD = 0


def _export(directory: Path, time_mix: str, neuron: str) -> torch.nn.Module:
    """A tiny random model saved with ``save_pretrained`` and loaded back through ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = SpikeLMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, head_size=16, decay_lora_rank=8,
                           intermediate_size=64, time_mix=time_mix, neuron=neuron, context_length=64,
                           tie_word_embeddings=True)
    model = SpikeLMForCausalLM(config)
    with torch.no_grad():  # the default init is small; a wider spread makes spikes and scores less uniform
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def _requests(seed: int = 0, count: int = 6) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) pairs of mixed lengths, ids clear of the special tokens 0..3."""
    rng = random.Random(seed)
    return [([rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 9))],
             [rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 4))]) for _ in range(count)]


@torch.no_grad()
def score(model: torch.nn.Module, requests: list[tuple[list[int], list[int]]], padding: str,
          use_mask: bool = True) -> list[tuple[float, bool]]:
    """Harness-style loglikelihood of each continuation, all requests in one padded batch ``[B, L]``.

    The model sees ``(context + continuation)[:-1]``; the logits at the last ``len(continuation)`` real positions
    predict the continuation tokens. ``padding`` is ``"right"`` or ``"left"``; with ``use_mask`` the
    ``attention_mask`` marks the pads.
    """
    sequences = [(context + continuation)[:-1] for context, continuation in requests]
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(requests), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    starts = []
    for row, seq in enumerate(sequences):
        start = 0 if padding == "right" else width - len(seq)
        input_ids[row, start:start + len(seq)] = torch.tensor(seq)
        mask[row, start:start + len(seq)] = 1
        starts.append(start)
    logits = model(input_ids=input_ids, attention_mask=mask if use_mask else None, use_cache=False).logits
    log_probs = torch.log_softmax(logits.double(), dim=-1)  # [B, L, V]
    results = []
    for row, ((_, continuation), seq) in enumerate(zip(requests, sequences, strict=True)):
        end = starts[row] + len(seq)
        positions = torch.arange(end - len(continuation), end)
        target = torch.tensor(continuation)
        row_log_probs = log_probs[row, positions]  # [len(continuation), V]
        total = float(row_log_probs.gather(-1, target[:, None]).sum())
        greedy = bool((row_log_probs.argmax(-1) == target).all())
        results.append((total, greedy))
    return results


CASES = [
    pytest.param("rwkv6", "adaptive", id="rwkv6-adaptive"),
    pytest.param("rwkv6", "lif", id="rwkv6-lif"),
    pytest.param("rwkv6", "gated", id="rwkv6-gated"),
    pytest.param("rwkv6", "none", id="rwkv6-dense"),
    pytest.param("rwkv4", "adaptive", id="rwkv4-adaptive"),
]


@pytest.mark.parametrize(("time_mix", "neuron"), CASES)
def test_batched_padded_scoring_equals_unbatched(tmp_path, time_mix, neuron):
    model = _export(tmp_path, time_mix, neuron)
    requests = _requests()
    alone = [score(model, [request], "right")[0] for request in requests]
    assert all(total < 0 for total, _ in alone)
    # The scores must depend on the request, or the comparison below could not catch a mix-up of rows.
    assert len({round(total, 6) for total, _ in alone}) == len(requests)
    for padding, use_mask in (("right", False), ("right", True), ("left", True)):
        batched = score(model, requests, padding, use_mask)
        for i, ((total, greedy), (ref_total, ref_greedy)) in enumerate(zip(batched, alone, strict=True)):
            assert total == pytest.approx(ref_total, abs=1e-4), f"request {i}, {padding} padding, mask={use_mask}"
            assert greedy == ref_greedy, f"request {i}, {padding} padding, mask={use_mask}"


def test_left_padding_without_a_mask_changes_scores(tmp_path):
    """The check above can fail: left pads that the model is not told about are read as tokens."""
    model = _export(tmp_path, "rwkv6", "adaptive")
    requests = _requests(seed=1)
    alone = [score(model, [request], "right")[0][0] for request in requests]
    unmasked = [total for total, _ in score(model, requests, "left", use_mask=False)]
    assert max(abs(a - b) for a, b in zip(alone, unmasked, strict=True)) > 1e-3


def test_scores_match_the_model_loss(tmp_path):
    """Summed continuation log-probabilities agree with the model's own shifted LM loss over the same tokens."""
    model = _export(tmp_path, "rwkv6", "adaptive")
    context, continuation = [5, 17, 33, 8], [41, 42, 60]
    total, _ = score(model, [(context, continuation)], "right")[0]
    ids = torch.tensor([context + continuation])
    labels = ids.clone()
    labels[:, : len(context)] = -100  # only continuation tokens count
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    assert total == pytest.approx(-float(loss) * len(continuation), abs=1e-4)
