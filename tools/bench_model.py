"""Benchmark a ``tiny`` SpikeLM against transformers' ``RwkvForCausalLM`` on this CPU, in one run.

Prints training tokens/s (forward + backward) and generation tokens/s (a bare decoding loop, one token at a time
with the recurrent state after a prefill, and ``model.generate`` greedy, as a user runs it) for both models with the
same width, depth, FFN width and vocabulary, their ratios, and SpikeLM's per-token generation time at several
context lengths (it should stay flat: the state has a fixed size).

    python tools/bench_model.py                      # defaults: 1 thread, batch 4 x 256 tokens
    python tools/bench_model.py --threads 2 --contexts 100,500,1000,2000
    python tools/bench_model.py --only-event             # only the event-driven decoding table (45m, 216m)
    python tools/bench_model.py --only-event --event-sizes 45m --event-batches ''   # only 45m's prefill rows

The event-driven table (``--event-sizes``, default 45m,216m) times per-token decoding at batch 1 and 4 for SpikeLM
with dense synapses, event-driven synapses (fp32, and the model in bf16) and ``RwkvForCausalLM`` of the same shape,
the prefill of a 512-token prompt, each model's peak RSS (a fresh process per model) and the zero fraction, and
checks greedy generations against the dense path.

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


DEFAULT_NEURON = {"adaptive_k": 0.4, "adaptive_resolution": 4, "max_spikes": 256}  # recipes/shakespeare-tiny.yaml


def rwkv_twin(config: SpikeLMConfig, vocab: int) -> RwkvForCausalLM:
    """``RwkvForCausalLM`` of the same width, depth, FFN width and vocabulary."""
    return RwkvForCausalLM(RwkvConfig(vocab_size=vocab, hidden_size=config.hidden_size,
                                      num_hidden_layers=config.num_hidden_layers,
                                      attention_hidden_size=config.hidden_size,
                                      intermediate_size=config.intermediate_size, context_length=4096,
                                      tie_word_embeddings=True)).eval()


def spiking_model(preset: str, vocab: int, dtype: torch.dtype = torch.float32) -> SpikeLMForCausalLM:
    """A random-init SpikeLM at ``preset`` with the default recipe's neuron settings (seed 0), in ``dtype`` (fp32
    recurrence parameters kept fp32 as ``from_pretrained`` does)."""
    torch.manual_seed(0)
    model = SpikeLMForCausalLM(SpikeLMConfig.from_preset(preset, vocab_size=vocab, **DEFAULT_NEURON)).eval()
    if dtype != torch.float32:
        model.to(dtype)
        keep = model._keep_in_fp32_modules_strict
        for name, parameter in model.named_parameters():
            if any(part in name for part in keep):
                parameter.data = parameter.data.float()
    return model


VARIANTS = ("dense", "event", "event-bf16", "rwkv")


def peak_rss_mb(preset: str, variant: str, vocab: int, batch: int) -> float:
    """Peak RSS (MB) of a fresh process while it builds one model (in its dtype from the start), prefills 16 tokens
    and decodes 8, less the process's RSS after the imports (the same for every model). Linux only."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
torch.set_num_threads(1)
import bench_model as b
from spikelm import SpikeLMConfig

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
variant, preset = {variant!r}, {preset!r}
if variant == "rwkv":
    model = b.rwkv_twin(SpikeLMConfig.from_preset(preset, vocab_size={vocab}), {vocab})
    make = b.rwkv_decoder
else:
    if variant == "event-bf16":
        torch.set_default_dtype(torch.bfloat16)
    model = b.spiking_model(preset, {vocab}, torch.bfloat16 if variant == "event-bf16" else torch.float32)
    torch.set_default_dtype(torch.float32)
    model.set_event_decoding(variant != "dense")
    make = b.spikelm_decoder
make(model, torch.randint(0, {vocab}, ({batch}, 16)), 8)()
print(status("VmHWM") - base)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def greedy_agreement(reference: SpikeLMForCausalLM, other: SpikeLMForCausalLM, prompt: torch.Tensor,
                     steps: int) -> str:
    """How many of ``steps`` greedy tokens ``other`` shares with ``reference`` before the first difference."""
    with torch.inference_mode():
        kwargs = {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False, "pad_token_id": 0}
        a = reference.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)[:, prompt.shape[1]:]
        b = other.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)[:, prompt.shape[1]:]
    same = (a == b).all(0).int()
    first = steps if bool(same.all()) else int(same.argmin())
    return "identical" if first == steps else f"same for {first} of {steps} tokens"


def event_table(args: argparse.Namespace, gen: torch.Generator) -> None:
    """Per-token decoding (batch 1 and 4), prefill and memory at larger presets: SpikeLM with dense synapses,
    event-driven (fp32, and a bf16 model), and ``RwkvForCausalLM`` of the same shape, timed in one run.

    Random-init models with the default recipe's neuron settings (``adaptive_k`` 0.4, resolution 4, a clip of 256):
    the zero fraction is measured on the same prompt the timings start from (a trained model gave 75%).
    """
    from spikelm.measure.sparsity import SparsityMonitor

    steps = 8
    print(f"\nlarger presets, default recipe's neurons; {torch.get_num_threads()} thread(s), vocab {args.vocab}, "
          f"{steps} tokens per timing, median of {args.repeats}")
    header = (f"{'preset':6s} {'batch':>5s} {'model':18s} {'ms/token':>9s} {'tokens/s':>9s} {'vs RWKV':>8s} "
              f"{'model RSS MB':>12s} {'zeros':>6s}")
    rows = [header, "-" * len(header)]
    notes = []
    for preset in args.event_sizes.split(","):
        models = {"dense": spiking_model(preset, args.vocab), "event": spiking_model(preset, args.vocab),
                  "event-bf16": spiking_model(preset, args.vocab, torch.bfloat16)}
        models["dense"].set_event_decoding(False)
        models["event"].set_event_decoding(True)
        models["event-bf16"].set_event_decoding(True)
        rwkv = rwkv_twin(models["dense"].config, args.vocab)
        long_prompt = torch.randint(0, args.vocab, (1, max(args.prefill, 16)), generator=gen)
        with torch.inference_mode(), SparsityMonitor(models["dense"]) as monitor:
            models["dense"](long_prompt)
        zeros = monitor.report().to_dict()["total"]["zero_fraction"]
        for batch in args.event_batches:
            prompt = torch.randint(0, args.vocab, (batch, 16), generator=gen)
            fns = {name: spikelm_decoder(model, prompt, steps) for name, model in models.items()}
            fns["rwkv"] = rwkv_decoder(rwkv, prompt, steps)
            ms = {name: 1000 * s / steps for name, s in median_seconds(fns, args.repeats).items()}
            for name in VARIANTS:
                rss = peak_rss_mb(preset, name, args.vocab, batch) if args.rss else float("nan")
                rows.append(f"{preset:6s} {batch:5d} {name:18s} {ms[name]:9.2f} {1000 * batch / ms[name]:9.1f} "
                            f"{ms['rwkv'] / ms[name]:7.2f}x {rss:12.0f} {zeros if name != 'rwkv' else 0:6.1%}")
        # Prefill: the whole prompt in one call (SpikeLM's chunked scan; RwkvForCausalLM's CPU path loops over
        # tokens inside its WKV), batch 1.
        prefill = {name: (lambda m=model, p=long_prompt: m(p, use_cache=True, logits_to_keep=1))
                   for name, model in models.items() if name != "event-bf16"}
        prefill["rwkv"] = lambda r=rwkv, p=long_prompt: r(p, use_cache=True)
        with torch.inference_mode():
            seconds = median_seconds(prefill, max(1, args.repeats // 2)) if args.prefill else {}
        for name, s in seconds.items():
            rows.append(f"{preset:6s} {'pre':>5s} {name + f' {args.prefill} tok':18s} {1000 * s / args.prefill:9.3f} "
                        f"{args.prefill / s:9.1f} {seconds['rwkv'] / s:7.2f}x {'':>12s} {'':>6s}")
        prompt = torch.randint(0, args.vocab, (1, 8), generator=gen)
        notes.append(f"{preset}: greedy 32 tokens vs dense fp32: event fp32 "
                     f"{greedy_agreement(models['dense'], models['event'], prompt, 32)}, bf16 model event "
                     f"{greedy_agreement(models['dense'], models['event-bf16'], prompt, 32)}")
        del models, rwkv
    print("\n".join(rows))
    print("\n".join(notes))


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
    parser.add_argument("--event-sizes", default="45m,216m", metavar="PRESETS",
                        help="presets of the event-driven decoding table (default 45m,216m; '' skips it)")
    parser.add_argument("--prefill", type=int, default=512,
                        help="prompt length of the prefill timing (default 512; 0 skips it)")
    parser.add_argument("--event-batches", default="1,4", metavar="SIZES",
                        help="batch sizes of the event table's per-token rows (default 1,4; '' skips them)")
    parser.add_argument("--no-rss", dest="rss", action="store_false",
                        help="skip the peak-RSS column (one fresh process per model)")
    parser.add_argument("--only-event", action="store_true", help="only the event-driven decoding table")
    args = parser.parse_args()
    args.event_batches = [int(size) for size in args.event_batches.split(",") if size]
    torch.set_num_threads(args.threads)
    if args.only_event:
        event_table(args, torch.Generator().manual_seed(0))
        return
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
        event_table(args, gen)


if __name__ == "__main__":
    main()
