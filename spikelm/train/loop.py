"""The training loop of ``spikelm train``: recipe -> tokenizer, data, model, DeepSpeed engine -> one explicit loop.

``train`` runs one rank of the job (the command in ``spikelm.commands.train`` launches the ranks). Everything a run
writes lives in its run directory: ``recipe.yaml``, ``metrics.jsonl``, ``tb/``, ``checkpoints/``, ``export/``.

Why one file of ~450 lines: the loop and its named pieces (``setup``, ``train_step``, ``flush``, ``evaluate``,
``save``, ``finish``) share one ``Run`` and are read together; reporting lives in ``metrics.py``, the export in
``export.py``, starting from a model and distillation in ``start.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from spikelm.errors import SpikeLMError
from spikelm.model.modeling import lm_cross_entropy
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
from spikelm.train.export import export
from spikelm.train.metrics import MetricsLog, Throughput, sparsity_monitor, sparsity_summary, unigram_entropy
from spikelm.train.recipe import Recipe
from spikelm.train.schedule import lr_at
from spikelm.train.start import distill_loss, export_config, load_initial_weights, load_teacher


class TrainingDiverged(SpikeLMError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------------ pieces


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


def _grad_norm(model: torch.nn.Module) -> torch.Tensor | None:
    """Norm of the full gradients held in ``.grad`` (ZeRO 0, where DeepSpeed does not record the norm), on the
    device (``flush`` reads it back)."""
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else None


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


@dataclass
class Run:
    """One rank's training state: what ``setup`` builds and the loop, ``evaluate`` and ``save`` share."""

    recipe: Recipe
    run_dir: Path
    rank: int
    world_size: int
    device: torch.device
    tokenizer: Any
    config: Any
    engine: Any
    optimizer: torch.optim.Optimizer
    loader: Any
    eval_batches: Any
    metrics: MetricsLog
    total_steps: int
    tokens_per_step: int
    step: int = 0
    tokens_seen: int = 0
    saved_step: int = -1  # the step of the last checkpoint written or resumed from
    pending: list[dict[str, Any]] = field(default_factory=list)  # train rows whose loss is still on the device
    last_loss: float = math.nan  # of the last step read back by ``flush``
    teacher: Any = None  # the frozen model of distill.teacher, if any

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, message: str) -> None:
        if self.is_main:
            print(message)


def train(recipe: Recipe, run_dir: Path, *, resume: Path | None = None, no_resume: bool = False,
          stop_at_step: int | None = None, cache_dir: Path | None = None, progress: bool = True) -> int:
    """Train ``recipe`` in this process (one rank of the job); returns the exit code (0 done, 130 stopped)."""
    from tqdm.auto import tqdm

    run = setup(recipe, run_dir, resume=resume, no_resume=no_resume, cache_dir=cache_dir)
    try:
        return _train_loop(run, stop_at_step, progress, tqdm)
    finally:
        run.loader.close()  # the prefetch thread, also on an error or a signal


def _train_loop(run: Run, stop_at_step: int | None, progress: bool, tqdm: Any) -> int:
    recipe = run.recipe
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not (run.is_main and progress), unit="step",
               dynamic_ncols=True)
    throughput = Throughput(run.tokens_seen)
    stopped_by: str | None = None
    with StopSignal() as stop, contextlib.closing(bar):
        while run.step < run.total_steps:
            log_now = (run.step + 1) % recipe.logging.every_steps == 0 or run.step + 1 == run.total_steps
            grad_norm = train_step(run, with_grad_norm=log_now)
            bar.update(1)
            evaluate_now = recipe.eval.every_steps and run.step % recipe.eval.every_steps == 0
            save_now = recipe.checkpoint.every_steps and run.step % recipe.checkpoint.every_steps == 0
            signalled = False
            if log_now or evaluate_now or save_now:  # the only steps that read values back from the device
                signalled = flush(run, grad_norm=grad_norm, stop=stop.received is not None,
                                  throughput=throughput if log_now else None)
                if log_now:
                    bar.set_postfix(loss=f"{run.last_loss:.4f}")
            if evaluate_now and run.step < run.total_steps:
                evaluate(run, write=bar.write)
                throughput.restart()  # eval time does not count against training throughput
            if save_now:
                save(run)
            if signalled or run.step == stop_at_step:
                stopped_by = "signal" if signalled else f"--stop-at-step {stop_at_step}"
                break
    return finish(run, stopped_by, write=bar.write)


def setup(recipe: Recipe, run_dir: Path, *, resume: Path | None, no_resume: bool, cache_dir: Path | None) -> Run:
    """Process group, tokenizer, data, model, DeepSpeed engine and optimizer; then the resume point, if any."""
    import deepspeed

    from spikelm.measure.evaluation import heldout_batches
    from spikelm.model.modeling import SpikeLMForCausalLM
    from spikelm.train.loader import batch_loader
    from spikelm.train.packing import build_datasets
    from spikelm.train.tokenizer_cache import check_vocab, prepare_tokenizer

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    cache_dir = cache_dir or Path(os.environ.get("SPIKELM_CACHE", Path.home() / ".cache" / "spikelm"))

    # Tokenizer and data (both build their caches on rank 0 first; the other ranks then read them). A model
    # started from an export keeps the export's tokenizer.
    init_from = Path(recipe.init.from_).expanduser() if recipe.init.from_ else None
    if init_from is not None:
        export_config(init_from, "init.from")  # before its tokenizer is read: a clear error for a wrong directory
    tok_cfg = recipe.tokenizer if init_from is None else replace(recipe.tokenizer, path=str(init_from))
    tokenizer = prepare_tokenizer(tok_cfg, recipe.data, cache_dir)
    train_blocks, heldout_blocks = build_datasets(recipe.data, tokenizer, recipe.train.block_size, cache_dir)
    config = recipe.model_config(len(tokenizer))
    check_vocab(tokenizer, config)

    # Resume point, read before building anything heavy so a mismatched recipe fails fast.
    checkpoint = None if no_resume else (resume or find_latest_checkpoint(run_dir))
    universal = False
    ds_config = recipe.deepspeed_config(world_size)
    if checkpoint is not None:
        saved = read_trainer_state(checkpoint)
        check_model_shape(saved["model_config"], config.to_dict(), checkpoint)
        if recipe.data.streaming and saved.get("world_size", world_size) != world_size:
            raise SpikeLMError(f"checkpoint {checkpoint}: a streaming run resumes with the world size it was saved "
                               f"with ({saved['world_size']} processes, this is {world_size}): each rank streams its "
                               "own shards of the data")
        universal = needs_universal(saved, world_size, recipe.deepspeed.zero_stage)
        if universal:
            # A new world size or ZeRO stage: DeepSpeed re-partitions the state from its universal format.
            ds_config.setdefault("checkpoint", {})["load_universal"] = True

    torch.manual_seed(recipe.seed)
    model = SpikeLMForCausalLM(config)
    model.set_event_decoding(False)  # the sample generations keep the standard layout (ZeRO partitions the weights)
    if init_from is not None and checkpoint is None:  # a resumed run continues from its checkpoint instead
        load_initial_weights(model, init_from, config)
    if recipe.deepspeed.activation_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optim = recipe.optim
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                                  eps=optim.eps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    loader = batch_loader(train_blocks, recipe.train.micro_batch_size, rank=rank, world_size=world_size,
                          seed=recipe.seed, prefetch=recipe.data.prefetch_batches)
    step, tokens_seen = 0, 0
    if checkpoint is not None:
        trainer_state, rank_state = load_checkpoint(engine, checkpoint, rank=rank, world_size=world_size,
                                                    universal=universal)
        step, tokens_seen = trainer_state["step"], trainer_state["tokens_seen"]
        try:
            loader.load_state_dict(rank_state["loader"])
        except SpikeLMError as err:  # nothing is written before this point: the checkpoint stays as it was
            raise SpikeLMError(f"checkpoint {checkpoint}: {err}") from None
        set_rng_state(rank_state["rng"])

    run = Run(recipe=recipe, run_dir=run_dir, rank=rank, world_size=world_size, device=device, tokenizer=tokenizer,
              config=config, engine=engine, optimizer=optimizer, loader=loader,
              eval_batches=heldout_batches(heldout_blocks, recipe.train.micro_batch_size, recipe.eval.max_batches,
                                           rank=rank, world_size=world_size),
              metrics=MetricsLog(run_dir, enabled=rank == 0, tensorboard=recipe.logging.tensorboard,
                                 resume_step=step),
              total_steps=recipe.train.total_steps(world_size),
              tokens_per_step=recipe.train.tokens_per_step(world_size),
              step=step, tokens_seen=tokens_seen, saved_step=step if checkpoint is not None else -1)
    if checkpoint is not None:
        run.say(f"resumed from {checkpoint} at step {step}")
        changes = _recipe_changes(trainer_state.get("recipe", {}), recipe.to_dict())
        if changes:  # allowed (e.g. a lower lr after a divergence), but never silent: logged in metrics.jsonl
            listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
            run.say(f"spikelm train: the recipe differs from the checkpoint's: {listed} (recorded in metrics.jsonl)")
            run.metrics.write({"kind": "recipe_change", "step": step, "changes": changes, "time": time.time()})
    if init_from is not None:
        run.say(f"init.from: the tokenizer of {init_from} replaces the recipe's tokenizer section"
                + ("" if checkpoint is not None else f"; weights loaded from {init_from}"))
    if recipe.distill.teacher:
        run.teacher = load_teacher(Path(recipe.distill.teacher).expanduser(), config, recipe.precision, device)
        run.say(f"distill: teacher {recipe.distill.teacher}, alpha {recipe.distill.alpha}, temperature "
                f"{recipe.distill.temperature}")
    if run.is_main:
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    _describe(run, train_blocks, heldout_blocks)
    return run


def _describe(run: Run, train_blocks: Any, heldout_blocks: Any) -> None:
    """The run's size, batch, data and the loss to beat, printed once by rank 0."""
    recipe, model = run.recipe, run.engine.module
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 partitions parameters
    run.say(f"spikelm train: {recipe.name}: {n_params / 1e6:.2f}M parameters, vocab {run.config.vocab_size}, "
            f"{run.world_size} rank(s) on {run.device.type}, ZeRO {recipe.deepspeed.zero_stage}, {recipe.precision}")
    sequences = recipe.train.micro_batch_size * recipe.train.grad_accum * run.world_size
    run.say(f"global batch = {recipe.train.micro_batch_size} micro x {recipe.train.grad_accum} accum x "
            f"{run.world_size} ranks = {sequences} sequences = {run.tokens_per_step} tokens/step; {run.total_steps} "
            f"steps = {run.total_steps * run.tokens_per_step / 1e6:.2f}M tokens")
    asked = recipe.tokenizer.vocab_size
    if recipe.tokenizer.path is None and run.config.vocab_size < asked:
        run.say(f"note: the tokenizer has {run.config.vocab_size} tokens, fewer than tokenizer.vocab_size={asked}: "
                "the tokenizer's training text ran out of merges (more text: tokenizer.sample_chars or more data)")
    n_train = f"{len(train_blocks)} blocks" if hasattr(train_blocks, "__len__") else "streaming"
    run.say(f"train data: {n_train}; held-out: {len(heldout_blocks)} blocks; run directory: {run.run_dir}")
    entropy = unigram_entropy(train_blocks, run.config.vocab_size) if run.is_main else None
    if entropy is not None:
        run.say(f"unigram entropy of the training tokens: {entropy:.3f} nats/token (the loss to beat)")


def train_step(run: Run, *, with_grad_norm: bool) -> torch.Tensor | None:
    """One optimizer step over ``grad_accum`` micro-batches. Nothing is read back to the host: the step's mean loss
    stays on the device in ``run.pending`` until ``flush``. Returns the gradient norm when asked (a device tensor
    under ZeRO 0; DeepSpeed's own figure under ZeRO >= 1), else ``None``."""
    recipe, engine, optim = run.recipe, run.engine, run.recipe.optim
    lr = lr_at(run.step, lr=optim.lr, min_lr=optim.min_lr, warmup_steps=optim.warmup_steps,
               total_steps=run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.config.spike_phase_in > 0:
        engine.module.set_training_progress((run.step + 1) / run.total_steps)  # this step ends at full spikes
    step_loss, grad_norm, parts = torch.zeros((), device=run.device), None, {}
    for _ in range(recipe.train.grad_accum):
        batch = next(run.loader).to(run.device)  # [micro, block_size + 1]
        loss, micro_parts = _loss(run, batch)
        for name, value in micro_parts.items():
            parts[name] = parts.get(name, 0.0) + value.detach().float() / recipe.train.grad_accum
        engine.backward(loss)
        if with_grad_norm and engine.is_gradient_accumulation_boundary() and recipe.deepspeed.zero_stage == 0:
            grad_norm = _grad_norm(engine.module)  # all-reduced by the boundary backward, cleared by the step
        engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
        step_loss += loss.detach().float() / recipe.train.grad_accum
    if grad_norm is None and with_grad_norm and engine.get_global_grad_norm() is not None:
        grad_norm = engine.get_global_grad_norm()  # ZeRO >= 1 records it in step()
    run.step += 1
    run.tokens_seen += run.tokens_per_step
    run.pending.append({"kind": "train", "step": run.step, "loss": step_loss, "lr": lr, "tokens": run.tokens_seen,
                        **parts})
    return grad_norm


def flush(run: Run, *, grad_norm: Any = None, stop: bool = False, throughput: Throughput | None = None) -> bool:
    """Read the pending steps' losses back (one collective and one host read for all of them), stop on a
    non-finite loss, write their metrics rows; returns whether any rank received a stop signal.

    Runs at logging, evaluation and checkpoint steps and at the end, never elsewhere: every other step queues its
    work on the device without waiting for it. A NaN is therefore caught up to ``logging.every_steps`` steps late,
    but always before anything is saved, so the last checkpoint on disk is good.
    """
    rows = run.pending
    values = [row["loss"] for row in rows]
    # the loss's logged parts (distillation's ce and kl) travel in the same read-back
    parts = [(row, key) for row in rows for key, value in row.items() if key != "loss" and torch.is_tensor(value)]
    norm = torch.as_tensor(grad_norm if grad_norm is not None else 0.0, dtype=torch.float32, device=run.device)
    packed = torch.stack([*values, *(row[key] for row, key in parts), norm.reshape(()),
                          torch.tensor(float(stop), device=run.device)])
    if run.world_size > 1:
        torch.distributed.all_reduce(packed)  # on the run's device: NCCL has no CPU tensors
        packed[:-1] /= run.world_size  # losses, parts and the (identical) norm: mean; the stop flag stays a sum
    *read, norm_value, stops = packed.tolist()
    losses = read[:len(rows)]
    for (row, key), value in zip(parts, read[len(rows):], strict=True):
        row[key] = value
    run.pending = []
    for row, loss in zip(rows, losses, strict=True):
        if not math.isfinite(loss):
            kept = (f"the last good checkpoint (step {run.saved_step}) is kept" if run.saved_step >= 0 else
                    "no checkpoint was written yet")
            raise TrainingDiverged(
                f"the loss became {loss} at step {row['step']} (lr {row['lr']:.3g}); the run stopped at step "
                f"{run.step} without saving anything after it; {kept}. Lower optim.lr or raise optim.warmup_steps "
                "and run again")
        row["loss"] = run.last_loss = loss
    if throughput is not None and rows:  # a logging step: its row also gets throughput and gradient norm
        # Timed after the read-back, which waited for the device: the window holds the steps' whole work.
        rows[-1].update(tokens_per_s=throughput.tokens_per_s(run.tokens_seen),
                        grad_norm=norm_value if grad_norm is not None else None, time=time.time())
    for row in rows:
        run.metrics.write(row)
    return stops > 0


def _loss(run: Run, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one micro-batch ``[micro, block_size + 1]`` and its logged parts (with a teacher: the
    cross-entropy ``ce`` and ``kl``, the loss being their blend; with a zero target: ``ce``, the hinge ``zero_term``
    added to the loss and the smooth zero fraction ``soft_zeros``)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = run.engine(input_ids=inputs).logits
    zero_target = run.engine.module.zero_target_loss()  # None unless model.adaptive_zero_target is set
    if run.teacher is None:
        loss, parts = lm_cross_entropy(logits, targets), {}
    else:
        with torch.no_grad():
            teacher_logits = run.teacher(input_ids=inputs, use_cache=False).logits
        loss, ce, kl = distill_loss(logits, teacher_logits, targets, run.recipe.distill.alpha,
                                    run.recipe.distill.temperature)
        parts = {"ce": ce, "kl": kl}
    if zero_target is not None:
        term, soft_zeros = zero_target
        if not parts:
            parts["ce"] = loss.detach()
        loss = loss + term
        parts.update(zero_term=term.detach(), soft_zeros=soft_zeros)
    return loss, parts


def evaluate(run: Run, *, write: Any = print) -> dict[str, Any]:
    """Held-out loss, bits per byte and zero fraction (and a short sample) at the current step; every rank takes
    part, rank 0 prints through ``write`` and logs the row."""
    from spikelm.measure.evaluation import evaluate_lm

    engine, recipe = run.engine, run.recipe
    engine.eval()
    monitor = sparsity_monitor(engine.module)
    with monitor if monitor is not None else contextlib.nullcontext():
        result = evaluate_lm(engine, run.eval_batches, run.tokenizer, device=run.device)
    row: dict[str, Any] = {"kind": "eval", "step": run.step, **result.to_dict()}
    if monitor is not None:
        row.update(sparsity_summary(monitor))
    if recipe.eval.sample_prompt and recipe.eval.sample_tokens:
        # Every rank generates (ZeRO-3 gathers parameters collectively); rank 0 prints.
        row["sample"] = _sample(engine.module, run.tokenizer, recipe.eval.sample_prompt, recipe.eval.sample_tokens,
                                recipe.seed, run.device)
    engine.train()
    bpb = f"{result.bits_per_byte:.3f}" if result.bits_per_byte is not None else "n/a"
    message = (f"eval step {run.step}: loss {result.loss:.4f}  ppl {result.perplexity:.2f}  bits/byte {bpb}  "
               f"({result.tokens} held-out tokens)")
    if "zero_fraction" in row:
        message += f"  zero fraction {row['zero_fraction']:.3f}"
    if "sample" in row:
        message += f"\n  sample: {row['sample']!r}"
    if run.is_main:
        write(message)
    run.metrics.write(row)
    return row


def save(run: Run) -> None:
    """A checkpoint of the current step (atomic; pruned to ``checkpoint.keep_last``); collective."""
    if run.pending:
        flush(run)  # a NaN must never reach a checkpoint
    recipe = run.recipe
    trainer_state = {"step": run.step, "tokens_seen": run.tokens_seen, "world_size": run.world_size,
                     "zero_stage": recipe.deepspeed.zero_stage,
                     "recipe": recipe.to_dict(), "model_config": run.config.to_dict()}
    rank_state = {"rng": rng_state(), "loader": run.loader.state_dict()}
    save_checkpoint(run.engine, run.run_dir, run.step, trainer_state, rank_state, rank=run.rank,
                    keep_last=recipe.checkpoint.keep_last)
    run.saved_step = run.step


def finish(run: Run, stopped_by: str | None, *, write: Any = print) -> int:
    """After the loop: checkpoint what is not saved yet; when training is complete, the final eval and the export."""
    if run.pending:
        flush(run)
    if stopped_by is not None:
        if run.saved_step != run.step:
            save(run)
        run.say(f"spikelm train: stopped by {stopped_by} after step {run.step}; checkpoint saved. Run the same "
                "command again to resume.")
        run.metrics.close()
        return 130 if stopped_by == "signal" else 0
    logged = _logged_eval(run) if run.saved_step == run.step else None
    if logged is not None:  # a rerun of a finished run: its final evaluation is in metrics.jsonl already
        run.say(f"spikelm train: the run finished at step {run.step} already; nothing to train")
    final_eval = logged or evaluate(run, write=write)
    if run.saved_step != run.step:
        save(run)
    if run.recipe.export.enabled and not (logged is not None and (run.run_dir / "export").is_dir()):
        export_dir = export(run.engine, run.tokenizer, run.run_dir, rank=run.rank)
        run.say(f"exported the model and tokenizer to {export_dir}")
    run.metrics.close()
    run.say(f"done: {run.step} steps, {run.tokens_seen / 1e6:.2f}M tokens, held-out loss {final_eval['loss']:.4f}")
    return 0


def _logged_eval(run: Run) -> dict[str, Any] | None:
    """The eval row of the current step in ``metrics.jsonl`` (rank 0 reads it; every rank learns whether it exists)."""
    row = None
    if run.is_main and run.metrics.path.is_file():
        rows = [json.loads(line) for line in run.metrics.path.read_text().splitlines() if line.strip()]
        row = next((r for r in reversed(rows) if r.get("kind") == "eval" and r.get("step") == run.step), None)
    found = torch.tensor(float(row is not None), device=run.device)  # on the run's device: NCCL has no CPU tensors
    if run.world_size > 1:
        torch.distributed.all_reduce(found)
    return (row or {"loss": float("nan")}) if found.item() > 0 else None


def _recipe_changes(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> dict[str, list[Any]]:
    """``{"optim.lr": [old, new], ...}``: the recipe fields that differ from a checkpoint's recipe."""
    changes: dict[str, list[Any]] = {}
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes.update(_recipe_changes(old, new, f"{prefix}{key}."))
        elif old != new:
            changes[f"{prefix}{key}"] = [old, new]
    return changes


__all__ = ["train", "setup", "train_step", "flush", "evaluate", "save", "finish", "Run", "param_groups",
           "TrainingDiverged"]
