"""Benchmark a ``tiny`` SpikeLM against transformers' ``RwkvForCausalLM`` on this CPU, in one run.

Prints training tokens/s (forward + backward) and generation tokens/s (a bare decoding loop, one token at a time
with the recurrent state after a prefill, and ``model.generate`` greedy, as a user runs it) for both models with the
same width, depth, FFN width and vocabulary, their ratios, and SpikeLM's per-token generation time at several
context lengths (it should stay flat: the state has a fixed size).

    python tools/bench_model.py                      # defaults: 1 thread, batch 4 x 256 tokens
    python tools/bench_model.py --threads 2 --contexts 100,500,1000,2000
    python tools/bench_model.py --event-sizes 45m,216m   # also event-driven decoding at larger sizes

Not a test: timings depend on the machine and its load. Both models run under the same ``torch.set_num_threads``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import RwkvConfig, RwkvForCausalLM

from spikelm import SpikeLMConfig, SpikeLMForCausalLM


def median_seconds(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median wall time of each function over ``repeats`` runs, after one warm-up run each.

    The functions take turns within each repetition, so a change in machine load hits all of them alike.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    return step


def spikelm_decoder(model: SpikeLMForCausalLM, prompt: torch.Tensor, steps: int) -> Callable[[], None]:
    """Prefill ``prompt`` once, then each call decodes ``steps`` greedy tokens from a copy of that state."""
    with torch.inference_mode():
        prefill = model(prompt, use_cache=True, logits_to_keep=1)

    def decode() -> None:
        with torch.inference_mode():
            cache = prefill.past_key_values
            saved = cache.layers, cache.seen_tokens
            token = prefill.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                out = model(token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            cache.layers, cache.seen_tokens = saved  # the model replaces per-layer states, so this restores them

    return decode


def rwkv_decoder(model: RwkvForCausalLM, prompt: torch.Tensor, steps: int) -> Callable[[], None]:
    with torch.inference_mode():
        prefill = model(prompt, use_cache=True)

    def decode() -> None:
        with torch.inference_mode():
            state = [s.clone() for s in prefill.state]  # RwkvModel writes its state in place
            token = prefill.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                out = model(token, state=state, use_cache=True)
                state = out.state
                token = out.logits[:, -1:].argmax(-1)

    return decode


def hf_generate(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> Callable[[], None]:
    """``model.generate`` greedy for exactly ``steps`` new tokens: what a user of the HF API sees per token."""
    def run() -> None:
        with torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False, pad_token_id=0)

    return run


def build_models(args: argparse.Namespace) -> tuple[SpikeLMForCausalLM, SpikeLMForCausalLM, RwkvForCausalLM]:
    torch.manual_seed(0)
    spikelm6 = SpikeLMForCausalLM(SpikeLMConfig.from_preset("tiny", vocab_size=args.vocab, time_mix="rwkv6"))
    spikelm4 = SpikeLMForCausalLM(SpikeLMConfig.from_preset("tiny", vocab_size=args.vocab, time_mix="rwkv4"))
    c = spikelm6.config
    rwkv = RwkvForCausalLM(RwkvConfig(vocab_size=args.vocab, hidden_size=c.hidden_size,
                                      num_hidden_layers=c.num_hidden_layers, attention_hidden_size=c.hidden_size,
                                      intermediate_size=c.intermediate_size, context_length=4096,
                                      tie_word_embeddings=True))
    return spikelm6, spikelm4, rwkv


def event_decoding(args: argparse.Namespace, gen: torch.Generator) -> None:
    """Per-token decoding at larger presets: dense synapses vs event-driven ones vs ``RwkvForCausalLM``.

    The spiking models use ``adaptive_k = 0.4`` (the default recipe's setting; ~70% of spike counts are zero, also
    at initialisation). At these sizes a decoding step streams its weights from main memory, so reading only the
    synapses of inputs that spiked saves time in proportion to the zeros.
    """
    from spikelm.measure.sparsity import SparsityMonitor

    print("\nper-token decoding at larger sizes (adaptive_k 0.4): dense vs event-driven synapses vs RwkvForCausalLM")
    for preset in args.event_sizes.split(","):
        torch.manual_seed(0)
        dense = SpikeLMForCausalLM(SpikeLMConfig.from_preset(preset, vocab_size=args.vocab, adaptive_k=0.4)).eval()
        event = SpikeLMForCausalLM(dense.config).eval()
        event.load_state_dict(dense.state_dict())
        event.set_event_decoding(True)
        c = dense.config
        rwkv = RwkvForCausalLM(RwkvConfig(vocab_size=args.vocab, hidden_size=c.hidden_size,
                                          num_hidden_layers=c.num_hidden_layers, attention_hidden_size=c.hidden_size,
                                          intermediate_size=c.intermediate_size, context_length=4096,
                                          tie_word_embeddings=True)).eval()
        prompt = torch.randint(0, args.vocab, (1, args.gen_prompt), generator=gen)
        with torch.inference_mode(), SparsityMonitor(dense) as monitor:
            dense(prompt)
        zeros = monitor.report().to_dict()["total"]["zero_fraction"]
        steps = 16
        seconds = median_seconds({"dense": spikelm_decoder(dense, prompt, steps),
                                  "event": spikelm_decoder(event, prompt, steps),
                                  "rwkv": rwkv_decoder(rwkv, prompt, steps)}, args.repeats)
        ms = {name: 1000 * value / steps for name, value in seconds.items()}
        print(f"  {preset:5s} ({c.num_hidden_layers} x {c.hidden_size}, {zeros:.0%} zero spikes): SpikeLM dense "
              f"{ms['dense']:.1f} ms/token, event-driven {ms['event']:.1f} ms/token, RwkvForCausalLM "
              f"{ms['rwkv']:.1f} ms/token -> vs RwkvForCausalLM: dense x{ms['rwkv'] / ms['dense']:.2f}, "
              f"event-driven x{ms['rwkv'] / ms['event']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # One thread by default: on a shared 2-core machine, 2 OpenMP threads per process oversubscribe the cores and the
    # timings become noise (10x slower, erratic); use --threads 2 on an idle machine.
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every model (default 1)")
    parser.add_argument("--batch", type=int, default=4, help="training batch size")
    parser.add_argument("--seq", type=int, default=256, help="training sequence length")
    parser.add_argument("--vocab", type=int, default=512, help="vocabulary size of both models")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--gen-steps", type=int, default=64, help="tokens decoded per generation timing")
    parser.add_argument("--gen-prompt", type=int, default=16, help="prompt length before generation timing")
    parser.add_argument("--contexts", default="100,500,1000,2000", help="context lengths for the flatness check")
    parser.add_argument("--event-sizes", default="", metavar="PRESETS",
                        help="also time event-driven decoding at these presets, e.g. 45m,216m (default: none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spikelm6, spikelm4, rwkv = build_models(args)
    models = {"SpikeLM tiny rwkv6 (adaptive)": spikelm6, "SpikeLM tiny rwkv4 (adaptive)": spikelm4,
              "RwkvForCausalLM (CPU path)": rwkv}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    c = spikelm6.config
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; hidden {c.hidden_size}, layers "
          f"{c.num_hidden_layers}, ffn {c.intermediate_size}, vocab {args.vocab}")

    gen = torch.Generator().manual_seed(0)
    train_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    prompt = torch.randint(0, args.vocab, (1, args.gen_prompt), generator=gen)
    for model in models.values():
        model.train()
    train_s = median_seconds({name: train_step(model, train_ids) for name, model in models.items()}, args.repeats)
    train_tps = {name: args.batch * args.seq / s for name, s in train_s.items()}
    for model in models.values():
        model.eval()
    decoders = {name: (rwkv_decoder if isinstance(model, RwkvForCausalLM) else spikelm_decoder)(model, prompt,
                                                                                              args.gen_steps)
                for name, model in models.items()}
    gen_tps = {name: args.gen_steps / s for name, s in median_seconds(decoders, args.repeats).items()}
    generators = {name: hf_generate(model, prompt, args.gen_steps) for name, model in models.items()}
    api_tps = {name: args.gen_steps / s for name, s in median_seconds(generators, args.repeats).items()}

    print(f"\n{'model':32s} {'params':>9s} {'train tok/s':>12s} {'decode tok/s':>13s} {'generate() tok/s':>17s}")
    for name in models:
        print(f"{name:32s} {params[name]:9d} {train_tps[name]:12.0f} {gen_tps[name]:13.1f} {api_tps[name]:17.1f}")
    base = "RwkvForCausalLM (CPU path)"
    for name in list(models)[:2]:
        print(f"{name} / RwkvForCausalLM: training x{train_tps[name] / train_tps[base]:.2f}, "
              f"decode loop x{gen_tps[name] / gen_tps[base]:.2f}, generate() x{api_tps[name] / api_tps[base]:.2f}")

    print("\nSpikeLM tiny rwkv6: per-token generation time vs context length (prefill, then decode)")
    steps = 32
    lengths = [int(n) for n in args.contexts.split(",")]
    by_length = {
        str(length): spikelm_decoder(spikelm6, torch.randint(0, args.vocab, (1, length), generator=gen), steps)
        for length in lengths
    }
    for length, seconds in median_seconds(by_length, args.repeats).items():
        print(f"  context {int(length):5d}: {1000 * seconds / steps:6.2f} ms/token")
    if args.event_sizes:
        event_decoding(args, gen)


if __name__ == "__main__":
    main()
