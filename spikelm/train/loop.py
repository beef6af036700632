"""The training loop of ``spikelm train``: recipe -> tokenizer, data, model, DeepSpeed engine -> one explicit loop.

``train`` runs one rank of the job (the command in ``spikelm.commands.train`` launches the ranks). Everything a run
writes lives in its run directory: ``recipe.yaml``, ``metrics.jsonl``, ``tb/``, ``checkpoints/``, ``export/``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from spikelm.errors import SpikeLMError
from spikelm.measure.sparsity import SparsityMonitor
from spikelm.train.checkpoint import (
    check_model_shape,
    find_latest_checkpoint,
    load_checkpoint,
    needs_universal,
    read_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from spikelm.train.recipe import Recipe
from spikelm.train.schedule import lr_at


class TrainingDiverged(SpikeLMError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------------ pieces


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; ``logits`` ``[B, T, V]`` (reduced in fp32), ``targets`` ``[B, T]``."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay only on matrices of projections; norms, biases, decays and neuron parameters get none.

    Embeddings are matrices too but are tied to the head; decaying them is standard (GPT-2, nanoGPT) and kept.
    """
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per row) and TensorBoard scalars, written by rank 0 only."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            # Rows written after the checkpoint we resume from describe steps that will be re-run: drop them.
            rows = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if json.loads(r).get("step", 0) <= resume_step]
            self.path.write_text("".join(r + "\n" for r in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            prefix = row.get("kind", "train")
            for key, value in row.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("step", "time"):
                    self.tb.add_scalar(f"{prefix}/{key}", value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag checked at step boundaries, so the loop can checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers, the loop still runs
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second Ctrl-C: give up on the checkpoint
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _all_ranks_any(flag: bool, world_size: int) -> bool:
    if world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.all_reduce(value)
    return bool(value.item() > 0)


def _mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    value = value.detach().float().reshape(1).cpu()
    if world_size > 1:
        torch.distributed.all_reduce(value)
        value /= world_size
    return float(value.item())


def _sparsity_monitor(model: torch.nn.Module) -> Any:
    """A ``SparsityMonitor(model)``, or ``None`` if it cannot watch this model (training never needs it)."""
    try:
        return SparsityMonitor(model)
    except Exception as err:  # a monitor problem must not stop training
        print(f"spikelm train: sparsity monitor unavailable ({err})", file=sys.stderr)
        return None


def _sparsity_summary(monitor: Any) -> dict[str, Any]:
    """Whole-model and per-layer zero fraction of the spike counts seen by ``monitor`` (empty if unavailable)."""
    try:
        report = monitor.report().to_dict()
        total = report["total"]["zero_fraction"]
        layers = {layer["name"]: layer["zero_fraction"] for layer in report.get("layers", [])}
    except Exception as err:  # the monitor is optional; never let it stop training
        print(f"spikelm train: no sparsity report ({type(err).__name__}: {err})", file=sys.stderr)
        return {}
    return {"zero_fraction": float(total), "layer_zero_fraction": layers}


def _grad_norm(model: torch.nn.Module) -> float | None:
    """Norm of the full gradients held in ``.grad`` (ZeRO 0, where DeepSpeed does not record the norm)."""
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else None


def unigram_entropy(blocks: Any, vocab_size: int, max_tokens: int = 10_000_000) -> float | None:
    """Entropy in nats of the token frequencies of (the first ``max_tokens`` of) a map-style split, else ``None``.

    The loss of a model that ignores context entirely; a model that learns anything beats it.
    """
    tokens = getattr(blocks, "tokens", None)
    if tokens is None:
        return None
    counts = torch.bincount(torch.from_numpy(tokens[:max_tokens].astype("int64")), minlength=vocab_size).double()
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log()).sum())


def _sample(model: Any, tokenizer: Any, prompt: str, new_tokens: int, seed: int, device: torch.device) -> str:
    """A short sampled continuation; uses a forked RNG so sampling never changes the training RNG stream."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    if ids.numel() == 0:
        return ""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=True, temperature=0.8, top_k=40,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------ the run


def train(recipe: Recipe, run_dir: Path, *, resume: Path | None = None, no_resume: bool = False,
          stop_at_step: int | None = None, cache_dir: Path | None = None, progress: bool = True) -> int:
    """Train ``recipe`` in this process (one rank of the job); returns the exit code (0 done, 130 stopped)."""
    import deepspeed
    from tqdm.auto import tqdm

    from spikelm.measure.evaluation import evaluate_lm, heldout_batches
    from spikelm.model.modeling import SpikeLMForCausalLM
    from spikelm.train import data as spikedata

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    cache_dir = cache_dir or Path(os.environ.get("SPIKELM_CACHE", Path.home() / ".cache" / "spikelm"))

    # Tokenizer and data (both build their caches on rank 0 first; the other ranks then read them).
    tokenizer = spikedata.prepare_tokenizer(recipe.tokenizer, recipe.data, cache_dir)
    train_blocks, heldout_blocks = spikedata.build_datasets(recipe.data, tokenizer, recipe.train.block_size,
                                                            cache_dir)
    config = recipe.model_config(len(tokenizer))
    spikedata.check_vocab(tokenizer, config)

    # Resume point, read before building anything heavy so a mismatched recipe fails fast.
    checkpoint = None if no_resume else (resume or find_latest_checkpoint(run_dir))
    universal = False
    ds_config = recipe.deepspeed_config(world_size)
    if checkpoint is not None:
        saved = read_trainer_state(checkpoint)
        check_model_shape(saved["model_config"], config.to_dict(), checkpoint)
        universal = needs_universal(saved, world_size, recipe.deepspeed.zero_stage)
        if universal:
            # A new world size or ZeRO stage: DeepSpeed re-partitions the state from its universal format.
            ds_config.setdefault("checkpoint", {})["load_universal"] = True

    torch.manual_seed(recipe.seed)
    model = SpikeLMForCausalLM(config)
    if recipe.deepspeed.activation_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optim = recipe.optim
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                                  eps=optim.eps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    loader = spikedata.BatchLoader(train_blocks, recipe.train.micro_batch_size, rank=rank, world_size=world_size,
                                   seed=recipe.seed)
    total_steps = recipe.train.total_steps(world_size)
    tokens_per_step = recipe.train.tokens_per_step(world_size)
    step, tokens_seen = 0, 0
    if checkpoint is not None:
        trainer_state, rank_state = load_checkpoint(engine, checkpoint, rank=rank, world_size=world_size,
                                                    universal=universal)
        step, tokens_seen = trainer_state["step"], trainer_state["tokens_seen"]
        loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"])
        say(f"resumed from {checkpoint} at step {step}")

    if is_main:
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 partitions parameters
    say(f"spikelm train: {recipe.name}: {n_params / 1e6:.2f}M parameters, vocab {config.vocab_size}, "
        f"{world_size} rank(s) on {device.type}, ZeRO {recipe.deepspeed.zero_stage}, {recipe.precision}")
    say(f"global batch = {recipe.train.micro_batch_size} micro x {recipe.train.grad_accum} accum x {world_size} "
        f"ranks = {recipe.train.micro_batch_size * recipe.train.grad_accum * world_size} sequences = "
        f"{tokens_per_step} tokens/step; {total_steps} steps = {total_steps * tokens_per_step / 1e6:.2f}M tokens")
    n_train = f"{len(train_blocks)} blocks" if hasattr(train_blocks, "__len__") else "streaming"
    say(f"train data: {n_train}; held-out: {len(heldout_blocks)} blocks; run directory: {run_dir}")
    entropy = unigram_entropy(train_blocks, config.vocab_size) if is_main else None
    if entropy is not None:
        say(f"unigram entropy of the training tokens: {entropy:.3f} nats/token (the loss to beat)")

    metrics = MetricsLog(run_dir, enabled=is_main, tensorboard=recipe.logging.tensorboard, resume_step=step)
    eval_batches = heldout_batches(heldout_blocks, recipe.train.micro_batch_size, recipe.eval.max_batches,
                                   rank=rank, world_size=world_size)

    def save(at_step: int) -> Path:
        trainer_state = {"step": at_step, "tokens_seen": tokens_seen, "world_size": world_size,
                         "zero_stage": recipe.deepspeed.zero_stage,
                         "recipe": recipe.to_dict(), "model_config": config.to_dict()}
        rank_state = {"rng": rng_state(), "loader": loader.state_dict()}
        return save_checkpoint(engine, run_dir, at_step, trainer_state, rank_state, rank=rank,
                               keep_last=recipe.checkpoint.keep_last)

    def evaluate(at_step: int) -> dict[str, Any]:
        engine.eval()
        monitor = _sparsity_monitor(engine.module)
        with monitor if monitor is not None else contextlib.nullcontext():
            result = evaluate_lm(engine, eval_batches, tokenizer, device=device)
        row: dict[str, Any] = {"kind": "eval", "step": at_step, **result.to_dict()}
        if monitor is not None:
            row.update(_sparsity_summary(monitor))
        if recipe.eval.sample_prompt and recipe.eval.sample_tokens:
            # Every rank generates (ZeRO-3 gathers parameters collectively); rank 0 prints.
            row["sample"] = _sample(engine.module, tokenizer, recipe.eval.sample_prompt, recipe.eval.sample_tokens,
                                    recipe.seed, device)
        engine.train()
        bpb = f"{result.bits_per_byte:.3f}" if result.bits_per_byte is not None else "n/a"
        message = f"eval step {at_step}: loss {result.loss:.4f}  ppl {result.perplexity:.2f}  bits/byte {bpb}"
        if "zero_fraction" in row:
            message += f"  zero fraction {row['zero_fraction']:.3f}"
        (tqdm.write if is_main else (lambda *_: None))(message + (f"\n  sample: {row['sample']!r}" if "sample" in row
                                                                  else ""))
        metrics.write(row)
        return row

    bar = tqdm(total=total_steps, initial=step, disable=not (is_main and progress), unit="step", dynamic_ncols=True)
    last_time, last_tokens = time.perf_counter(), tokens_seen
    stopped_by: str | None = None
    try:
        with StopSignal() as stop:
            while step < total_steps:
                lr = lr_at(step, lr=optim.lr, min_lr=optim.min_lr, warmup_steps=optim.warmup_steps,
                           total_steps=total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss, grad_norm = 0.0, None
                log_now = (step + 1) % recipe.logging.every_steps == 0 or step + 1 == total_steps
                for _ in range(recipe.train.grad_accum):
                    batch = next(loader).to(device)  # [micro, block_size + 1]
                    inputs, targets = batch[:, :-1], batch[:, 1:]
                    loss = lm_loss(engine(input_ids=inputs).logits, targets)
                    micro_loss = _mean_over_ranks(loss, world_size)
                    if not math.isfinite(micro_loss):
                        raise TrainingDiverged(
                            f"the loss became {micro_loss} at step {step + 1} (lr {lr:.3g}); stopped before updating "
                            "the weights. The last good checkpoint is kept; lower optim.lr or raise "
                            "optim.warmup_steps and resume")
                    engine.backward(loss)
                    if log_now and engine.is_gradient_accumulation_boundary() and recipe.deepspeed.zero_stage == 0:
                        # Gradients are all-reduced by the boundary backward and cleared by the step.
                        grad_norm = _grad_norm(engine.module)
                    engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
                    step_loss += micro_loss / recipe.train.grad_accum
                step += 1
                tokens_seen += tokens_per_step
                bar.update(1)
                if log_now:
                    if grad_norm is None and engine.get_global_grad_norm() is not None:
                        grad_norm = float(engine.get_global_grad_norm())  # ZeRO >= 1 records it in step()
                    now = time.perf_counter()
                    tokens_per_s = (tokens_seen - last_tokens) / max(now - last_time, 1e-9)
                    last_time, last_tokens = now, tokens_seen
                    metrics.write({"kind": "train", "step": step, "loss": step_loss, "lr": lr, "tokens": tokens_seen,
                                   "tokens_per_s": tokens_per_s, "grad_norm": grad_norm, "time": time.time()})
                    bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                else:
                    metrics.write({"kind": "train", "step": step, "loss": step_loss, "lr": lr,
                                   "tokens": tokens_seen})
                if recipe.eval.every_steps and step % recipe.eval.every_steps == 0 and step < total_steps:
                    evaluate(step)
                    last_time = time.perf_counter()  # do not count eval time against training throughput
                if recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0:
                    save(step)
                if _all_ranks_any(stop.received is not None or step == stop_at_step, world_size):
                    stopped_by = "signal" if stop.received is not None else f"--stop-at-step {stop_at_step}"
                    break
    finally:
        bar.close()

    if stopped_by is not None:
        if recipe.checkpoint.every_steps == 0 or step % recipe.checkpoint.every_steps:
            save(step)
        say(f"spikelm train: stopped by {stopped_by} after step {step}; checkpoint saved. Run the same command "
            "again to resume.")
        metrics.close()
        return 130 if stopped_by == "signal" else 0

    final_eval = evaluate(step)
    if not recipe.checkpoint.every_steps or step % recipe.checkpoint.every_steps:
        save(step)
    if recipe.export.enabled:
        export_dir = export(engine, tokenizer, run_dir, rank=rank)
        say(f"exported the model and tokenizer to {export_dir}")
    metrics.close()
    say(f"done: {step} steps, {tokens_seen / 1e6:.2f}M tokens, held-out loss {final_eval['loss']:.4f}")
    return 0


def fp32_state_dict(engine: Any, *, rank: int) -> dict[str, torch.Tensor] | None:
    """The model's full fp32 weights on rank 0 (``None`` elsewhere); collective under ZeRO and bf16.

    Where DeepSpeed keeps fp32 master weights (bf16 training, ZeRO 1-3) these are the masters, gathered from their
    partitions, not the bf16 copies the forward pass uses: exporting those would round every weight to 8 bits of
    mantissa. Without a master copy (fp32, ZeRO 0) the parameter itself is the fp32 weight.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    masters: dict[int, torch.Tensor] = {}
    state_dict: dict[str, torch.Tensor] = {}
    # Every rank walks the same parameters in the same order: each gather is a collective. Tied names share one.
    for name, param in engine.module.named_parameters(remove_duplicate=False):
        if id(param) not in masters:
            master = safe_get_full_fp32_param(param)
            masters[id(param)] = (param.detach() if master is None else master).float().cpu()
        state_dict[name] = masters[id(param)]
    for name, buffer in engine.module.named_buffers():
        state_dict[name] = buffer.detach().float().cpu()
    return state_dict if rank == 0 else None


def export(engine: Any, tokenizer: Any, run_dir: Path, *, rank: int) -> Path:
    """Write ``run_dir/export`` (fp32 master weights as safetensors + tokenizer) atomically; collective."""
    state_dict = fp32_state_dict(engine, rank=rank)
    final = run_dir / "export"
    if rank == 0:
        tmp = run_dir / ".export.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        module = engine.module
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # The weights are saved in fp32 even after bf16 training; say so, or Auto classes would load them as bf16.
        config_path = tmp / "config.json"
        saved_config = json.loads(config_path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in saved_config:
                saved_config[key] = "float32"
        config_path.write_text(json.dumps(saved_config, indent=2, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    return final


__all__ = ["train", "export", "fp32_state_dict", "unigram_entropy", "lm_loss", "param_groups",
           "TrainingDiverged"]
