"""Training throughput of a recipe's model in SpikeLM's DeepSpeed stack next to a plain PyTorch loop.

Both loops train the same model (same init), on the same batches, with the same AdamW, LR, accumulation and gradient
clipping; the only difference is the DeepSpeed engine (``engine(batch)``, ``engine.backward``, ``engine.step``) versus
``loss.backward()``, ``clip_grad_norm_``, ``optimizer.step()``. They run in alternating rounds in one process so that
a busy shared machine slows both alike; the median round of each is reported.

    python tools/bench_train.py                                  # the shakespeare-tiny recipe, on CPU
    python tools/bench_train.py --recipe recipes/spikegpt-216m.yaml --synthetic --set train.micro_batch_size=8

On a GPU it also prints model FLOPs utilisation: 6 x parameters x tokens/s over the GPU's peak (``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "shakespeare-tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of each loop")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each loop before the rounds")
    parser.add_argument("--synthetic", action="store_true",
                        help="random tokens instead of the recipe's data (no tokenizer/data build; big recipes)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="GPU peak for MFU (default: 989 for H100 in bf16, 312 for A100 in bf16, else none)")
    return parser.parse_args(argv)


def _peak_tflops(args: argparse.Namespace, precision: str) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    dense = {"H100": (989.0, 494.0), "H200": (989.0, 494.0), "A100": (312.0, 156.0)}  # (bf16, tf32) dense
    for key, (bf16, tf32) in dense.items():
        if key in name:
            return bf16 if precision == "bf16" else tf32
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    if args.threads:
        torch.set_num_threads(args.threads)

    from spikelm.train.dist import prepare_environment
    from spikelm.train.loop import param_groups
    from spikelm.train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    prepare_environment()
    import deepspeed

    from spikelm.model.modeling import SpikeLMForCausalLM, lm_cross_entropy

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    train = recipe.train
    total_micro = (args.warmup + args.rounds * args.steps) * train.grad_accum
    if args.synthetic:
        vocab = recipe.tokenizer.vocab_size
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, vocab, (train.micro_batch_size, train.block_size + 1), generator=generator)
                   for _ in range(total_micro)]
    else:
        from spikelm.train.loader import batch_loader
        from spikelm.train.packing import build_datasets
        from spikelm.train.tokenizer_cache import prepare_tokenizer

        cache = Path(os.environ.get("SPIKELM_CACHE", Path.home() / ".cache" / "spikelm"))
        tokenizer = prepare_tokenizer(recipe.tokenizer, recipe.data, cache)
        blocks, _ = build_datasets(recipe.data, tokenizer, train.block_size, cache)
        loader = batch_loader(blocks, train.micro_batch_size, seed=recipe.seed)
        vocab = len(tokenizer)
        batches = [next(loader) for _ in range(total_micro)]
    config = recipe.model_config(vocab)
    dtype = torch.bfloat16 if recipe.precision == "bf16" else torch.float32

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(recipe.seed)
        model = SpikeLMForCausalLM(config)
        if recipe.deepspeed.activation_checkpointing:
            model.gradient_checkpointing_enable()
        optim = recipe.optim
        return model, torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                                        eps=optim.eps)

    # Plain PyTorch keeps fp32 weights and runs bf16 recipes under autocast; DeepSpeed keeps bf16 weights with fp32
    # master copies. Both do bf16 matmuls with fp32 optimizer maths.
    plain_model, plain_opt = build()
    plain_model.to(device).train()
    engine_model, engine_opt = build()
    engine, _, _, _ = deepspeed.initialize(model=engine_model, optimizer=engine_opt,
                                           config=recipe.deepspeed_config(1))
    cursor = {"plain": 0, "engine": 0}

    def plain_step() -> float:
        loss_sum = 0.0
        for _ in range(train.grad_accum):
            batch = batches[cursor["plain"]].to(device, non_blocking=True)
            cursor["plain"] += 1
            with torch.autocast(device.type, dtype=dtype, enabled=dtype == torch.bfloat16):
                logits = plain_model(input_ids=batch[:, :-1]).logits
            loss = lm_cross_entropy(logits, batch[:, 1:]) / train.grad_accum
            loss.backward()
            loss_sum += loss.item()
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(plain_model.parameters(), train.grad_clip)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        return loss_sum

    def engine_step() -> float:
        loss_sum = 0.0
        for _ in range(train.grad_accum):
            batch = batches[cursor["engine"]].to(device, non_blocking=True)
            cursor["engine"] += 1
            loss = lm_cross_entropy(engine(input_ids=batch[:, :-1]).logits, batch[:, 1:])
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item() / train.grad_accum
        return loss_sum

    def timed(step_fn, steps: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step_fn()
        if cuda:
            torch.cuda.synchronize()
        return steps * train.tokens_per_step(1) / (time.perf_counter() - start)

    timed(plain_step, args.warmup)
    timed(engine_step, args.warmup)
    plain_rates, engine_rates = [], []
    for _ in range(args.rounds):
        plain_rates.append(timed(plain_step, args.steps))
        engine_rates.append(timed(engine_step, args.steps))
    plain, ds = statistics.median(plain_rates), statistics.median(engine_rates)
    n_params = sum(p.numel() for p in plain_model.parameters())
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"recipe {recipe.name}: {n_params / 1e6:.2f}M parameters, {recipe.precision}, "
          f"ZeRO {recipe.deepspeed.zero_stage}, {train.micro_batch_size} x {train.block_size} tokens x "
          f"{train.grad_accum} accum per step, on {where}")
    print(f"plain PyTorch loop : {plain:12,.0f} tokens/s  (rounds: {', '.join(f'{r:,.0f}' for r in plain_rates)})")
    print(f"DeepSpeed engine   : {ds:12,.0f} tokens/s  (rounds: {', '.join(f'{r:,.0f}' for r in engine_rates)})")
    print(f"DeepSpeed overhead : {100 * (1 - ds / plain):+.1f}%  (goal: under 10%)")
    peak = _peak_tflops(args, recipe.precision)
    if peak:
        # 6 FLOPs per parameter per token (forward 2, backward 4); the WKV scan and neurons are not counted.
        print(f"model FLOPs utilisation (DeepSpeed): {100 * 6 * n_params * ds / (peak * 1e12):.1f}% of {peak:.0f} "
              "TFLOP/s")
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
