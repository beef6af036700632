"""What a recipe will cost before it is launched: parameters, FLOPs per token, tokens, memory per GPU, wall time.

Nothing here allocates the model: it is built on the ``meta`` device (shapes without storage), so the plan of a 1.3B
recipe takes seconds and no memory.

- **Parameters**: counted once per tensor (tied embedding and LM head count once).
- **FLOPs per token** (forward): ``2 * in * out`` for every ``nn.Linear`` (every projection and the LM head), plus the
  WKV recurrence (rwkv6: ``5 * K`` per channel per layer — decay the ``K x K`` state, add ``k v^T``, read it out
  with ``r``; rwkv4: ``RWKV4_SCAN_FLOPS`` per channel per layer). Training FLOPs per token = 3x forward (backward
  costs twice the forward, the usual convention for model FLOPs utilisation). Neuron, norm and token-shift
  elementwise work is left out (well under 1% at these widths).
- **Model states per GPU** (weights, gradients, AdamW states): DeepSpeed's own estimators
  (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``) for ZeRO 2 and 3 in bf16;
  elsewhere bytes per parameter, sharded as the ZeRO stage shards them (fp32: 4 weights + 4 grads + 8 Adam; bf16:
  2 + 2 + 12 with the fp32 master copy).
- **Activations per GPU**: every tensor autograd saves in the forward of one micro-batch, recorded with
  ``saved_tensors_hooks`` on the meta device at the recipe's micro-batch, block size, precision and activation
  checkpointing, plus the fp32 logits of the loss. It is the torch path's figure (the Triton kernels save less) and
  an upper estimate (a view saved beside its base is counted twice).
- **Wall time** at a stated model FLOPs utilisation of the GPUs' dense peak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from spikelm.errors import SpikeLMError
from spikelm.model.config import SpikeLMConfig
from spikelm.train.recipe import Recipe

# Dense peak TFLOP/s per GPU (bf16 tensor cores; fp32 recipes run TF32 tensor cores) and memory in bytes (data sheets).
GPUS: dict[str, dict[str, float]] = {
    "h100": {"bf16": 989e12, "fp32": 494.7e12, "memory": 80e9},
    "h200": {"bf16": 989e12, "fp32": 494.7e12, "memory": 141e9},
    "a100": {"bf16": 312e12, "fp32": 156e12, "memory": 80e9},
    "a100-40": {"bf16": 312e12, "fp32": 156e12, "memory": 40e9},
}
# rwkv4's vector WKV per channel and token: two exps, a max, and the numerator/denominator updates and division.
RWKV4_SCAN_FLOPS = 14
# Allocator fragmentation, communication buckets and workspaces the estimate does not model.
HEADROOM = 0.9


@dataclass
class Plan:
    """The figures of one recipe on ``gpus`` GPUs (see the module docstring for how each is counted)."""

    recipe: str
    gpus: int
    gpu: str
    parameters: int
    forward_flops_per_token: float
    train_flops_per_token: float
    tokens_per_step: int
    steps: int
    total_tokens: int
    total_flops: float
    model_states_bytes: float
    activation_bytes: float
    memory_bytes: float
    gpu_memory_bytes: float
    peak_flops: float
    mfu: float
    hours: float

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= HEADROOM * self.gpu_memory_bytes

    @property
    def tokens_per_second(self) -> float:
        """Training tokens per second per GPU that the stated MFU stands for."""
        return self.peak_flops * self.mfu / self.train_flops_per_token

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits, "tokens_per_second": self.tokens_per_second}

    def format(self) -> str:
        gib = 2**30
        lines = [
            f"recipe {self.recipe} on {self.gpus} x {self.gpu}",
            f"parameters            {self.parameters:,} ({self.parameters / 1e6:,.1f}M)",
            f"FLOPs per token       {self.forward_flops_per_token:.4g} forward, {self.train_flops_per_token:.4g} "
            "training (3x)",
            f"tokens per step       {self.tokens_per_step:,}",
            f"steps                 {self.steps:,} = {self.total_tokens:,} tokens",
            f"training FLOPs        {self.total_flops:.3g}",
            f"memory per GPU        {self.memory_bytes / gib:,.1f} GiB = model states "
            f"{self.model_states_bytes / gib:,.1f} + activations {self.activation_bytes / gib:,.1f} "
            f"(of {self.gpu_memory_bytes / gib:,.0f} GiB; {HEADROOM:.0%} usable)",
            f"wall time             {self.hours:,.2f} h at {self.mfu:.0%} MFU of {self.peak_flops / 1e12:,.0f} "
            f"TFLOP/s = {self.tokens_per_second:,.0f} tokens/s per GPU",
        ]
        return "\n".join(lines)


def meta_model(config: SpikeLMConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``SpikeLMForCausalLM(config)`` with shapes only (no storage)."""
    from spikelm.model.modeling import SpikeLMForCausalLM

    with torch.device("meta"):
        model = SpikeLMForCausalLM(config)
    return model.to(dtype)


def count_parameters(model: nn.Module) -> int:
    """Parameters, each tensor once (a tied embedding and LM head are one tensor)."""
    return sum({id(p): p.numel() for p in model.parameters()}.values())


def linear_flops_per_token(model: nn.Module) -> int:
    """Forward FLOPs per token of every ``nn.Linear`` (the projections and the LM head)."""
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def scan_flops_per_token(config: SpikeLMConfig) -> int:
    """Forward FLOPs per token of the WKV recurrences of all layers."""
    per_channel = 5 * config.head_size if config.time_mix == "rwkv6" else RWKV4_SCAN_FLOPS
    return per_channel * config.hidden_size * config.num_hidden_layers


def forward_flops_per_token(model: nn.Module, config: SpikeLMConfig) -> float:
    """Forward FLOPs per token: every Linear (projections, LM head) plus the WKV recurrence."""
    return float(linear_flops_per_token(model) + scan_flops_per_token(config))


def activation_bytes(model: nn.Module, config: SpikeLMConfig, micro_batch: int, block_size: int,
                     checkpointing: bool) -> float:
    """Bytes autograd keeps for backward from one training forward + loss of ``[micro_batch, block_size]``."""
    from spikelm.model.modeling import lm_cross_entropy

    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    weight = next(model.parameters())
    # inputs_embeds: on the meta device there are no values, so the ids' range check could not run.
    embeds = torch.empty(micro_batch, block_size, config.hidden_size, device=weight.device, dtype=weight.dtype,
                         requires_grad=True)
    targets = torch.zeros(micro_batch, block_size, dtype=torch.long, device=weight.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        lm_cross_entropy(logits, targets)
    return float(sum(saved.values()))


def model_states_bytes(parameters: int, largest_layer: int, zero_stage: int, precision: str, gpus: int,
                       offload_optimizer: bool, offload_param: bool) -> float:
    """Weights + gradients + AdamW states per GPU for the ZeRO stage (DeepSpeed's estimators for bf16 ZeRO 2/3)."""
    if precision == "bf16" and zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return float(estimate_zero2_model_states_mem_needs(parameters, gpus, 1, cpu_offload=offload_optimizer)[1])
    if precision == "bf16" and zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return float(estimate_zero3_model_states_mem_needs(parameters, largest_layer, gpus, 1,
                                                           cpu_offload=offload_optimizer,
                                                           cpu_offload_params=offload_param)[1])
    weights, grads, optimizer = (2, 2, 12) if precision == "bf16" else (4, 4, 8)
    if offload_optimizer:
        optimizer = 0
    shards = gpus if zero_stage >= 1 else 1
    grad_shards = gpus if zero_stage >= 2 else 1
    weight_shards = gpus if zero_stage >= 3 else 1
    return float(parameters * (weights / weight_shards + grads / grad_shards + optimizer / shards))


def plan(recipe: Recipe, *, gpus: int, gpu: str = "h100", mfu: float = 0.4, vocab_size: int | None = None) -> Plan:
    """The plan of ``recipe`` on ``gpus`` data-parallel GPUs of kind ``gpu`` at ``mfu`` utilisation."""
    if gpus < 1:
        raise SpikeLMError(f"--gpus must be >= 1, got {gpus}")
    if gpu not in GPUS:
        raise SpikeLMError(f"--gpu {gpu!r} is not one of {', '.join(GPUS)}")
    if not 0 < mfu <= 1:
        raise SpikeLMError(f"--mfu must lie in (0, 1], got {mfu}")
    vocab = vocab_size or recipe.tokenizer.vocab_size
    config = recipe.model_config(vocab)
    dtype = torch.bfloat16 if recipe.precision == "bf16" else torch.float32
    model = meta_model(config, dtype)
    parameters = count_parameters(model)
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    forward = forward_flops_per_token(model, config)
    train = recipe.train
    steps, tokens_per_step = train.total_steps(gpus), train.tokens_per_step(gpus)
    total_tokens = steps * tokens_per_step
    total_flops = 3 * forward * total_tokens
    ds = recipe.deepspeed
    states = model_states_bytes(parameters, largest_layer, ds.zero_stage, recipe.precision, gpus,
                                ds.offload_optimizer, ds.offload_param)
    activations = activation_bytes(model, config, train.micro_batch_size, train.block_size,
                                   ds.activation_checkpointing)
    peak = GPUS[gpu]["bf16" if recipe.precision == "bf16" else "fp32"]
    hours = total_flops / (gpus * peak * mfu) / 3600
    return Plan(recipe=recipe.name, gpus=gpus, gpu=gpu, parameters=parameters, forward_flops_per_token=forward,
                train_flops_per_token=3 * forward, tokens_per_step=tokens_per_step, steps=steps,
                total_tokens=total_tokens, total_flops=total_flops, model_states_bytes=states,
                activation_bytes=activations, memory_bytes=states + activations,
                gpu_memory_bytes=GPUS[gpu]["memory"], peak_flops=peak, mfu=mfu, hours=hours)


__all__ = ["Plan", "plan", "GPUS", "meta_model", "count_parameters", "forward_flops_per_token",
           "linear_flops_per_token", "scan_flops_per_token", "activation_bytes",
           "model_states_bytes"]
