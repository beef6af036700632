"""Training recipes: typed, validated YAML configs for ``spikelm train``.

A recipe is data. It is read into nested dataclasses by one generic validator that rejects unknown keys (suggesting the
closest valid one) and wrong types, always naming the full key path (``optim.lr``), before any work starts. Values
and combinations are checked by each section's ``__post_init__`` and by :meth:`Recipe.validate`.

The ``data:`` and ``tokenizer:`` sections are :class:`spikelm.train.data_sources.DataConfig` /
:class:`spikelm.train.data_sources.TokenizerConfig`;
the ``model:`` section is a ``preset`` plus any :class:`~spikelm.model.config.SpikeLMConfig` field as an override.

Why one file of ~600 lines: every recipe section (a small dataclass with its checks) and the one validator that
reads them, so that a key path (``optim.lr``) and its rule are found in one place.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from spikelm.errors import SpikeLMError
from spikelm.model.config import PRESETS, SpikeLMConfig
from spikelm.train.data_sources import DataConfig, TokenizerConfig

PRECISIONS = ("fp32", "bf16")


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{key}: {message}")


@dataclass
class TrainConfig:
    """Batch shape and length of the run.

    Global batch (sequences per optimizer step) = ``micro_batch_size * grad_accum * world_size``.
    """

    block_size: int = 128
    """Tokens per training sequence (the model sees ``[micro_batch_size, block_size]``)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank."""
    grad_accum: int = 1
    """Micro batches accumulated before each optimizer step."""
    max_steps: int | None = None
    """Optimizer steps to train for; exactly one of ``max_steps`` / ``max_tokens`` is set."""
    max_tokens: int | None = None
    """Training tokens to consume; converted to steps with the global batch of the actual world size."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""

    def __post_init__(self) -> None:
        for name in ("block_size", "micro_batch_size", "grad_accum"):
            _check(getattr(self, name) > 0, f"train.{name}", f"must be > 0, got {getattr(self, name)}")
        _check((self.max_steps is None) != (self.max_tokens is None), "train.max_steps",
               "set exactly one of train.max_steps and train.max_tokens")
        for name in ("max_steps", "max_tokens"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"train.{name}", f"must be > 0, got {value}")
        _check(self.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}")

    def tokens_per_step(self, world_size: int) -> int:
        """Training tokens consumed by one optimizer step on ``world_size`` ranks."""
        return self.block_size * self.micro_batch_size * self.grad_accum * world_size

    def total_steps(self, world_size: int) -> int:
        """Optimizer steps of the whole run (``max_tokens`` rounds up to whole steps)."""
        if self.max_steps is not None:
            return self.max_steps
        assert self.max_tokens is not None
        return -(-self.max_tokens // self.tokens_per_step(world_size))


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr`` (see :mod:`spikelm.train.schedule`)."""

    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 1e-4
    """Learning rate at the last step of the cosine decay."""
    weight_decay: float = 0.01
    """Decoupled weight decay of matrices (biases, norms, embeddings' decays and neuron parameters get none)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to ``lr``."""

    def __post_init__(self) -> None:
        for name in ("lr", "min_lr", "weight_decay", "eps"):
            _check(math.isfinite(getattr(self, name)), f"optim.{name}", f"must be finite, got {getattr(self, name)}")
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr", f"must lie in [0, optim.lr={self.lr}], got {self.min_lr}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", f"both must lie in [0, 1), got {self.betas}")
        _check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")


# DeepSpeed config keys that typed recipe fields write (or the loop sets itself): a ``deepspeed.config`` entry for one
# of them would contradict the field, the log and the checkpoint's record, so it is refused, naming the field to use.
MANAGED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.micro_batch_size and train.grad_accum (x the world size)",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "deepspeed.offload_param",
    "bf16.enabled": "precision",
    "fp16.enabled": "precision",
    "optimizer": "optim (the loop builds torch's AdamW itself)",
    "scheduler": "optim (the loop sets the learning rate of every step itself)",
    "activation_checkpointing": "deepspeed.activation_checkpointing",
    "checkpoint.load_universal": "nothing: the loop sets it when a checkpoint needs re-partitioning",
}


def _managed_conflicts(config: dict[str, Any]) -> list[str]:
    """``deepspeed.config`` keys (dotted) that :data:`MANAGED_DEEPSPEED_KEYS` reserves."""
    found = []
    for key in MANAGED_DEEPSPEED_KEYS:
        node: Any = config
        for part in key.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is not KeyError:
            found.append(key)
    return found


@dataclass
class DeepSpeedSection:
    """How DeepSpeed shards and stores state. ``config`` is merged last into the generated DeepSpeed config."""

    zero_stage: int = 0
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO >= 1)."""
    offload_param: bool = False
    """Keep parameters in CPU memory (ZeRO 3 only)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (``model.gradient_checkpointing_enable()``)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config keys, deep-merged over the generated config (wins on conflicts)."""

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(not self.offload_optimizer or self.zero_stage >= 1, "deepspeed.offload_optimizer",
               "needs deepspeed.zero_stage >= 1")
        _check(not self.offload_param or self.zero_stage == 3, "deepspeed.offload_param",
               "needs deepspeed.zero_stage: 3")
        for key in _managed_conflicts(self.config):
            raise ValueError(f"deepspeed.config.{key}: conflicts with {MANAGED_DEEPSPEED_KEYS[key]}, which sets it; "
                             f"set that instead and remove deepspeed.config.{key}")


@dataclass
class CheckpointSection:
    """When checkpoints are written (always also at the end and on Ctrl-C / SIGTERM)."""

    every_steps: int = 0
    """Write a checkpoint every this many optimizer steps (0: only at the end and on a signal)."""
    keep_last: int = 2
    """Keep only the newest this many checkpoints (>= 1)."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0, got {self.every_steps}")
        _check(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class EvalSection:
    """Periodic held-out evaluation and a sample generation."""

    every_steps: int = 100
    """Evaluate every this many steps and at the end (0: only at the end)."""
    max_batches: int = 8
    """Held-out micro batches per rank per evaluation, at most: each held-out block is scored at most once."""
    sample_prompt: str = "ROMEO:"
    """Prompt of the sample printed at each evaluation ("" disables sampling)."""
    sample_tokens: int = 48
    """New tokens of each sample."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "eval.every_steps", f"must be >= 0, got {self.every_steps}")
        _check(self.max_batches >= 1, "eval.max_batches", f"must be >= 1, got {self.max_batches}")
        _check(self.sample_tokens >= 0, "eval.sample_tokens", f"must be >= 0, got {self.sample_tokens}")


@dataclass
class LoggingSection:
    """Metrics: ``metrics.jsonl`` always; TensorBoard under ``tb/`` when enabled."""

    every_steps: int = 10
    """Write a training-metrics row every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "logging.every_steps", f"must be >= 1, got {self.every_steps}")


@dataclass
class ExportSection:
    """The Hugging Face folder written to ``RUN_DIR/export`` at the end of training."""

    enabled: bool = True
    """Write the export (model safetensors + tokenizer)."""


@dataclass
class DistillSection:
    """Knowledge distillation from a trained model (e.g. the dense twin) while training this one.

    Loss per batch: ``(1 - alpha) * CE + alpha * T^2 * KL(teacher || student)``, both distributions softened by the
    temperature ``T``. The teacher runs on every rank, in eval mode, without gradients, in the recipe's precision;
    its forward time counts in the reported tokens/s.
    """

    teacher: str | None = None
    """Directory of a SpikeLM export (``RUN_DIR/export``) with the student's vocabulary; ``null``: no distillation."""
    alpha: float = 0.5
    """Weight of the KL term, in [0, 1] (0: plain cross-entropy, 1: the teacher's distribution only)."""
    temperature: float = 1.0
    """Softmax temperature of both distributions (> 0); the KL term is scaled by its square."""

    def __post_init__(self) -> None:
        _check(self.teacher is None or (isinstance(self.teacher, str) and bool(self.teacher)), "distill.teacher",
               f"expected an export directory, got {self.teacher!r}")
        _check(0.0 <= self.alpha <= 1.0, "distill.alpha", f"must lie in [0, 1], got {self.alpha}")
        _check(self.temperature > 0, "distill.temperature", f"must be > 0, got {self.temperature}")


@dataclass
class InitSection:
    """Start from an existing model instead of random weights (recipe key ``init.from``).

    The weights of the export are loaded before training (every tensor's shape checked against the recipe's model;
    parameters the export lacks, such as learned neuron thresholds of a dense export, keep their initial values)
    and its tokenizer replaces the recipe's ``tokenizer:`` section. A resumed run continues from its checkpoint and
    does not load them again.
    """

    from_: str | None = None
    """Directory of a SpikeLM export (model safetensors + config + tokenizer); ``null``: random init."""

    recipe_keys = {"from": "from_"}  # YAML key -> field ("from" is a Python keyword)

    def __post_init__(self) -> None:
        _check(self.from_ is None or (isinstance(self.from_, str) and bool(self.from_)), "init.from",
               f"expected an export directory, got {self.from_!r}")


@dataclass
class ModelSection:
    """A named size plus field overrides, e.g. ``{preset: tiny, neuron: lif, hidden_size: 192}``.

    ``vocab_size`` defaults to the tokenizer's size and must equal it when given.
    """

    preset: str = "tiny"
    """One of :data:`spikelm.model.config.PRESETS`."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """SpikeLMConfig fields that replace the preset's values."""

    def __post_init__(self) -> None:
        _check(self.preset in PRESETS, "model.preset", f"unknown preset {self.preset!r}; choose one of "
               f"{', '.join(PRESETS)}")

    def build_config(self, vocab_size: int | None = None, context_length: int | None = None) -> SpikeLMConfig:
        """The :class:`SpikeLMConfig` of this section; a bad field raises ``ValueError`` naming ``model.<field>``."""
        fields = dict(self.overrides)
        if vocab_size is not None:
            if "vocab_size" in fields and fields["vocab_size"] != vocab_size:
                raise ValueError(f"model.vocab_size: {fields['vocab_size']} does not match the tokenizer's "
                                 f"{vocab_size} tokens; remove model.vocab_size or set tokenizer.vocab_size to it")
            fields["vocab_size"] = vocab_size
        if context_length is not None:
            fields.setdefault("context_length", context_length)
        fields.setdefault("tie_word_embeddings", True)
        try:
            return SpikeLMConfig.from_preset(self.preset, **fields)
        except (ValueError, TypeError) as err:
            message = str(err).replace("SpikeLMConfig.", "model.")
            raise ValueError(message) from err


def _config_field_types() -> dict[str, Any]:
    """SpikeLMConfig's own typed fields (the keys a ``model:`` section may override) and their types."""
    namespace = {"int": int, "float": float, "str": str, "bool": bool, "None": None, "Any": Any}
    out: dict[str, Any] = {}
    for name, hint in vars(SpikeLMConfig).get("__annotations__", {}).items():
        if name.startswith("_") or name == "model_type":
            continue
        out[name] = eval(hint, namespace) if isinstance(hint, str) else hint  # noqa: S307 - our own annotations
    return out


@dataclass
class Recipe:
    """A whole training recipe. Load with :func:`load_recipe`; every section has defaults except ``data``."""

    name: str
    """Run name: the default run directory is ``runs/<name>``."""
    data: DataConfig
    """Where the text comes from (see :class:`spikelm.train.data_sources.DataConfig`)."""
    seed: int = 0
    """Seeds model init, data order and sampling."""
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100))
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision: ``fp32``, or ``bf16`` (DeepSpeed keeps fp32 master weights)."""
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    export: ExportSection = field(default_factory=ExportSection)
    distill: DistillSection = field(default_factory=DistillSection)
    init: InitSection = field(default_factory=InitSection)

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name",
               f"must be a non-empty name without '/' (nor '.' or '..'), got {self.name!r}")
        _check(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        context = self.model.overrides.get("context_length")
        _check(context is None or context >= self.train.block_size, "model.context_length",
               f"{context} is shorter than train.block_size={self.train.block_size}")
        vocab = self.model.overrides.get("vocab_size")
        tok_vocab = getattr(self.tokenizer, "vocab_size", None)
        if vocab is not None and tok_vocab is not None and getattr(self.tokenizer, "path", None) is None:
            _check(vocab == tok_vocab, "model.vocab_size", f"{vocab} differs from tokenizer.vocab_size={tok_vocab}; "
                   "set only tokenizer.vocab_size")
        # Build the model config once now so a bad field fails before any work (vocab from the tokenizer section,
        # unless init.from brings its own tokenizer).
        trained = getattr(self.tokenizer, "path", None) is None and self.init.from_ is None
        self.model_config(tok_vocab if trained else None)

    def model_config(self, vocab_size: int | None = None) -> SpikeLMConfig:
        """The model's config for a tokenizer of ``vocab_size`` tokens (context length >= the block size)."""
        return self.model.build_config(vocab_size, context_length=self.train.block_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-serialisable form (what :func:`recipe_from_dict` reads back)."""
        out = dataclasses.asdict(self)
        out["model"] = {"preset": self.model.preset, **self.model.overrides}
        out["init"] = {"from": self.init.from_}
        return _plain(out)

    def deepspeed_config(self, world_size: int) -> dict[str, Any]:
        """The DeepSpeed config dict for ``world_size`` data-parallel ranks."""
        ds = self.deepspeed
        zero: dict[str, Any] = {"stage": ds.zero_stage}
        extra: dict[str, Any] = {}
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
            # The loop always hands DeepSpeed torch's AdamW (no op build, same maths on every setup).
            extra["zero_force_ds_cpu_optimizer"] = False
        if ds.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
        config: dict[str, Any] = {
            "train_batch_size": self.train.micro_batch_size * self.train.grad_accum * world_size,
            "train_micro_batch_size_per_gpu": self.train.micro_batch_size,
            "gradient_accumulation_steps": self.train.grad_accum,
            "gradient_clipping": self.train.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": self.precision == "bf16"},
            # Our optimizer is torch's AdamW (no 60 s fused-op build); ZeRO accepts it with this flag.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,  # we log ourselves
            "wall_clock_breakdown": False,
            **extra,
        }
        return _deep_merge(config, ds.config)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ----------------------------------------------------------------------------------------------- generic validator


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` and return it converted (lists -> tuples, dicts -> dataclasses)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    wrong = SpikeLMError(f"recipe key {key!r}: expected {_type_name(hint)}, got {value!r}")
    if hint is Any:
        return value
    if _is_union(hint):
        for option in args:
            try:
                return _convert(value, option, key)
            except SpikeLMError:
                continue
        raise wrong
    if hint is type(None):
        if value is not None:
            raise wrong
        return None
    if origin is Literal:
        if value not in args:
            raise SpikeLMError(f"recipe key {key!r}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if hint is ModelSection:
        # ``model:`` has an open key set (any SpikeLMConfig field), checked against SpikeLMConfig's annotations.
        return _model_section_from_dict(value)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return dataclass_from_dict(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if hint is float:
        # PyYAML reads ``3e-4`` (no dot) as a string; accept numeric strings so recipes and --set behave as expected.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if hint is Path:
        if not isinstance(value, str | Path):
            raise wrong
        return Path(value)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise wrong
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise SpikeLMError(f"recipe key {key!r}: expected {len(args)} items ({_type_name(hint)}), "
                                   f"got {value!r}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise wrong
        value_hint = args[1] if len(args) == 2 else Any
        return {k: _convert(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    if isinstance(hint, type):
        if not isinstance(value, hint):
            raise wrong
        return value
    return value


def _unknown_key(key: str, prefix: str, valid: list[str]) -> SpikeLMError:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
    return SpikeLMError(f"unknown recipe key {full!r}{hint} (valid keys{' of ' + prefix if prefix else ''}: "
                        f"{', '.join(sorted(valid))})")


def dataclass_from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain dict, checking keys and types recursively.

    Unknown keys, missing required keys and values of the wrong type raise :class:`SpikeLMError` naming the full
    key path (``prefix.key``); a ``ValueError`` from the class's own validation is re-raised as ``SpikeLMError``,
    prefixed with the section when its message does not name a key already.
    """
    where = prefix or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpikeLMError(f"recipe key {where!r}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    aliases = getattr(cls, "recipe_keys", {})  # YAML key -> field name, for keys that are Python keywords
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    keys = {next((k for k, v in aliases.items() if v == name), name): name for name in fields}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in keys:
            raise _unknown_key(key, prefix, list(keys))
        kwargs[keys[key]] = _convert(value, hints[keys[key]], f"{prefix}.{key}" if prefix else key)
    for key, name in keys.items():
        f = fields[name]
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpikeLMError(f"recipe key {(prefix + '.' if prefix else '') + key!r} is required but missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        message = str(err)
        if prefix and not message.startswith(prefix):
            message = f"{prefix}: {message}"
        raise SpikeLMError(f"bad recipe value: {message}") from err


def _model_section_from_dict(data: Any) -> ModelSection:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpikeLMError(f"recipe key 'model': expected a mapping (preset + SpikeLMConfig fields), got {data!r}")
    field_types = _config_field_types()
    overrides: dict[str, Any] = {}
    for key, value in data.items():
        if key == "preset":
            continue
        if key not in field_types:
            raise _unknown_key(key, "model", ["preset", *field_types])
        overrides[key] = _convert(value, field_types[key], f"model.{key}")
    preset = _convert(data.get("preset", "tiny"), str, "model.preset")
    try:
        return ModelSection(preset=preset, overrides=overrides)
    except ValueError as err:
        raise SpikeLMError(f"bad recipe value: {err}") from err


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Validate a plain dict (parsed YAML) into a :class:`Recipe`; every problem names its key."""
    if not isinstance(data, dict):
        raise SpikeLMError(f"a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    return dataclass_from_dict(Recipe, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (``["optim", "lr"]``, ``"3e-4"`` parsed as YAML). Raises ``SpikeLMError`` if malformed."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpikeLMError(f"--set {text!r}: expected section.key=value, e.g. --set optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise SpikeLMError(f"--set {text!r}: the value is not valid YAML ({err})") from err
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw recipe dict with each ``section.key=value`` applied (validated later, by key)."""
    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpikeLMError(f"--set {text!r}: {'.'.join(path[: i + 1])!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a YAML recipe. Every problem raises :class:`SpikeLMError` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise SpikeLMError(f"recipe {str(path)!r} does not exist; pass a YAML file such as "
                           "recipes/shakespeare-tiny.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpikeLMError(f"recipe {str(path)!r} is not valid YAML: {err}") from err
    if data is None:
        raise SpikeLMError(f"recipe {str(path)!r} is empty")
    if not isinstance(data, dict):
        raise SpikeLMError(f"recipe {str(path)!r} must be a mapping of sections, got {type(data).__name__}")
    return recipe_from_dict(apply_overrides(data, overrides or []))


__all__ = [
    "Recipe", "TrainConfig", "OptimConfig", "DeepSpeedSection", "CheckpointSection", "EvalSection", "LoggingSection",
    "ExportSection", "DistillSection", "InitSection", "ModelSection", "load_recipe", "recipe_from_dict",
    "dataclass_from_dict", "apply_overrides", "parse_override",
]
