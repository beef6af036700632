"""What a run reports: ``metrics.jsonl`` and TensorBoard rows, throughput, the spike sparsity of an evaluation and
the unigram entropy of the data (the loss to beat)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from spikelm.measure.sparsity import SparsityMonitor


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


class Throughput:
    """Training tokens per second between logging steps, with pauses (evaluation) left out."""

    def __init__(self, tokens_seen: int) -> None:
        self.last_time, self.last_tokens = time.perf_counter(), tokens_seen

    def restart(self) -> None:
        self.last_time = time.perf_counter()

    def tokens_per_s(self, tokens_seen: int) -> float:
        now = time.perf_counter()
        rate = (tokens_seen - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, tokens_seen
        return rate


def sparsity_monitor(model: torch.nn.Module) -> Any:
    """A ``SparsityMonitor(model)``, or ``None`` if it cannot watch this model (training never needs it)."""
    try:
        return SparsityMonitor(model)
    except Exception as err:  # a monitor problem must not stop training
        print(f"spikelm train: sparsity monitor unavailable ({err})", file=sys.stderr)
        return None


def sparsity_summary(monitor: Any) -> dict[str, Any]:
    """Whole-model and per-layer zero fraction of the spike counts seen by ``monitor`` (empty if unavailable)."""
    try:
        report = monitor.report().to_dict()
        total = report["total"]["zero_fraction"]
        layers = {layer["name"]: layer["zero_fraction"] for layer in report.get("layers", [])}
    except Exception as err:  # the monitor is optional; never let it stop training
        print(f"spikelm train: no sparsity report ({type(err).__name__}: {err})", file=sys.stderr)
        return {}
    return {"zero_fraction": float(total), "layer_zero_fraction": layers}


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


__all__ = ["MetricsLog", "Throughput", "sparsity_monitor", "sparsity_summary", "unigram_entropy"]
