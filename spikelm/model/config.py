"""SpikeLMConfig: the Hugging Face config of a spiking RWKV language model."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

TIME_MIXES = ("rwkv6", "rwkv4")
NEURONS = ("adaptive", "lif", "gated", "none")
LIF_RESETS = ("hard", "soft")
SITE_NAMES = tuple(f"time_mix.{name}" for name in ("receptance", "key", "value", "gate", "decay", "output")) + tuple(
    f"channel_mix.{name}" for name in ("key", "receptance", "value"))
ADAPTIVE_SCALES = ("fixed", "site", "channel", "channel_mean")
SURROGATES = ("ste", "clipped")
KERNEL_BACKENDS = ("auto", "torch", "triton", "naive")

# Named sizes. 45m/216m/430m follow SpikeGPT's widths and depths; 1.3b follows RWKV-6 1.6B's shape.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "head_size": 32},
    "45m": {"hidden_size": 512, "num_hidden_layers": 12, "head_size": 64},
    "216m": {"hidden_size": 768, "num_hidden_layers": 18, "head_size": 64},
    "430m": {"hidden_size": 1024, "num_hidden_layers": 24, "head_size": 64},
    "1.3b": {"hidden_size": 2048, "num_hidden_layers": 24, "head_size": 64},
}


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"SpikeLMConfig.{field}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(field: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"SpikeLMConfig.{field}={value!r} must be a number {bound}")


class SpikeLMConfig(PretrainedConfig):
    r"""Configuration of a spiking RWKV language model (see docs/design.md, "The model").

    Size:
        vocab_size: tokens in the vocabulary (embedding rows and LM-head outputs).
        hidden_size: width of the residual stream; a multiple of ``head_size``.
        num_hidden_layers: number of TimeMix + ChannelMix blocks.
        head_size: channels per WKV head (K = V = head_size) for ``rwkv6``.
        intermediate_size: ChannelMix hidden width; ``None`` means 3.5 x hidden_size rounded to 32 (RWKV-6).
        decay_lora_rank: rank of the data-dependent decay projection of ``rwkv6``.
        context_length: training block length; the recurrent model itself accepts any length.
    Architecture:
        time_mix: ``"rwkv6"`` (matrix-valued state, data-dependent decay) or ``"rwkv4"`` (SpikeGPT's vector WKV).
        neuron: spiking neuron at every spike site: ``"adaptive"``, ``"lif"``, ``"gated"`` or ``"none"`` (dense twin).
        spike_lm_head: also put a spike site in front of the LM head.
        layer_norm_epsilon: epsilon of every LayerNorm / GroupNorm.
        layer_norm_eps_rescale_every: ``N > 0`` multiplies the epsilon of block i's LayerNorms by ``4 ** (i // N)``:
            what ``RwkvForCausalLM``'s inference-time residual halving every N blocks amounts to (``0`` = off; set by
            ``spikelm convert``, see ``spikelm/model/convert.py``).
        ln_out_epsilon: epsilon of the final LayerNorm; ``None`` means ``layer_norm_epsilon``.
        initializer_range: std of the normal init of projections and embeddings.
        kernel_backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"``, ``"triton"`` or ``"naive"``.
    Adaptive neuron (SpikingBrain):
        adaptive_k: threshold divisor k in ``V_th = mean(|x|) / k``.
        max_spikes: largest integer spike count per token and channel (counts are clipped to +-max_spikes).
        adaptive_site_k: per-site k overriding ``adaptive_k``, keyed by the end of the site name, e.g.
            ``{"channel_mix.value": 3.0}`` for the relu² input of every ChannelMix value projection (sites:
            ``time_mix.{receptance,key,value,gate,decay,output}``, ``channel_mix.{key,receptance,value}``).
        adaptive_scale: ``"fixed"`` (``V_th = mean(|x|) / k``, SpikingBrain), ``"site"`` or ``"channel"``: ``V_th =
            mean(|x|) * s`` with a trainable step multiplier ``s`` (one per site, or one per input channel),
            initialised to ``1 / k`` and trained with LSQ's step-size gradient (Esser et al. 2020); ``"channel_mean"``:
            per-channel multipliers rescaled to keep their mean at ``1 / k``, so training moves precision between
            channels while the site's average threshold, and with it roughly its sparsity, stays the fixed rule's.
        adaptive_resolution: spikes per threshold r: a channel is silent while ``|x| < V_th / 2`` (the zeros of r = 1)
            and otherwise fires ``round(r x / V_th)`` spikes of ``V_th / r`` (clipped at +-max_spikes): r times finer
            values for r times the spikes of each active channel; r = 1 is SpikingBrain's rule. With a learned
            ``adaptive_scale`` the multiplier sets both the silent set and the step of its channel(s); raise
            ``max_spikes`` with r (the clip is in fine counts).
        adaptive_surrogate: gradient of the rounding for the input: ``"ste"`` passes it unchanged, clamp included;
            ``"clipped"`` zeroes it where the count is clipped at +-max_spikes.
        spike_phase_in: fraction of training (in [0, 1)) over which the adaptive neuron's output moves linearly from
            its dense input to ``V_th * counts`` (0: spikes from the first step). The training loop reports its
            progress through ``SpikeLMForCausalLM.set_training_progress``; outside training the output is spikes.
        adaptive_zero_target: a floor on the zero fraction of all adaptive sites together (elements weighted, as
            ``spikelm sparsity`` counts it), held during training by a hinge term ``adaptive_zero_weight * max(0,
            target - z)`` on a smooth zero fraction ``z`` whose gradient reaches only the learned multipliers (needs a
            learned ``adaptive_scale``): LSQ's gradient lowers the thresholds where silence costs loss, the hinge
            raises them while the model is below the floor, so training chooses where the zeros go, across channels
            and sites. ``SpikeLMForCausalLM.zero_target_loss`` returns the term; the training loop adds it.
    LIF neuron (SpikeGPT):
        lif_tau: membrane time constant (> 1 leaks slower).
        lif_threshold: firing threshold v_th.
        lif_reset: ``"hard"`` (to zero) or ``"soft"`` (subtract v_th).
        lif_alpha: width parameter of the ATan surrogate gradient.
    Gated neuron (Ponghiran & Roy):
        gated_bits: bits of the multi-bit output (levels -(2^bits - 1) .. 2^bits - 1).
        gated_threshold: quantisation step; accumulations below it in magnitude emit nothing (dead zone).
        gated_forget_init: initial value of the learned per-channel forget gate, in (0, 1).
    """

    model_type = "spikelm"
    attribute_map = {"max_position_embeddings": "context_length"}

    vocab_size: int = 512
    hidden_size: int = 128
    num_hidden_layers: int = 2
    head_size: int = 32
    intermediate_size: int | None = None
    decay_lora_rank: int = 32
    context_length: int = 1024
    time_mix: str = "rwkv6"
    neuron: str = "adaptive"
    spike_lm_head: bool = False
    layer_norm_epsilon: float = 1e-5
    layer_norm_eps_rescale_every: int = 0
    ln_out_epsilon: float | None = None
    initializer_range: float = 0.02
    kernel_backend: str = "auto"
    adaptive_k: float = 3.0
    max_spikes: int = 8
    adaptive_site_k: dict[str, float] | None = None
    adaptive_scale: str = "fixed"
    adaptive_resolution: int = 1
    adaptive_surrogate: str = "ste"
    spike_phase_in: float = 0.0
    adaptive_zero_target: float | None = None
    adaptive_zero_weight: float = 1.0
    lif_tau: float = 2.0
    lif_threshold: float = 1.0
    lif_reset: str = "hard"
    lif_alpha: float = 2.0
    # 3 bits and a unit step: with 2 bits x 0.25 the output saturated at +-0.75 on unit-scale inputs, the error-keeping
    # accumulator wound up, and the straight-through gradient stopped matching the output (training stalled).
    gated_bits: int = 3
    gated_threshold: float = 1.0
    gated_forget_init: float = 0.5
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = int(3.5 * self.hidden_size) // 32 * 32
        self.validate_spikelm()
        super().__post_init__(**kwargs)

    def validate_spikelm(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        _choice("time_mix", self.time_mix, TIME_MIXES)
        _choice("neuron", self.neuron, NEURONS)
        _choice("lif_reset", self.lif_reset, LIF_RESETS)
        _choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        _choice("adaptive_scale", self.adaptive_scale, ADAPTIVE_SCALES)
        _choice("adaptive_surrogate", self.adaptive_surrogate, SURROGATES)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "head_size", "intermediate_size",
                     "decay_lora_rank", "context_length", "max_spikes", "gated_bits", "adaptive_resolution"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SpikeLMConfig.{name}={value!r} must be a positive integer")
        if self.hidden_size % self.head_size:
            raise ValueError(
                f"SpikeLMConfig.hidden_size={self.hidden_size} is not divisible by head_size={self.head_size}; "
                "pick a hidden_size that is a multiple of head_size"
            )
        for name in ("layer_norm_epsilon", "initializer_range", "adaptive_k", "lif_tau", "lif_threshold",
                     "lif_alpha", "gated_threshold"):
            _positive(name, getattr(self, name))
        every = self.layer_norm_eps_rescale_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"SpikeLMConfig.layer_norm_eps_rescale_every={every!r} must be an integer >= 0")
        if self.ln_out_epsilon is not None:
            _positive("ln_out_epsilon", self.ln_out_epsilon)
        for site, k in (self.adaptive_site_k or {}).items():
            if site not in SITE_NAMES:
                raise ValueError(f"SpikeLMConfig.adaptive_site_k: unknown site {site!r}; use one of "
                                 f"{', '.join(SITE_NAMES)}")
            _positive(f"adaptive_site_k[{site!r}]", k)
        phase_in = self.spike_phase_in
        if isinstance(phase_in, bool) or not isinstance(phase_in, int | float) or not 0.0 <= phase_in < 1.0:
            raise ValueError(f"SpikeLMConfig.spike_phase_in={phase_in!r} must be a fraction of training in [0, 1)")
        target = self.adaptive_zero_target
        if target is not None:
            if isinstance(target, bool) or not isinstance(target, int | float) or not 0.0 < target < 1.0:
                raise ValueError(f"SpikeLMConfig.adaptive_zero_target={target!r} must be a zero fraction in (0, 1)")
            if self.neuron != "adaptive" or self.adaptive_scale == "fixed":
                raise ValueError("SpikeLMConfig.adaptive_zero_target needs neuron 'adaptive' with a learned "
                                 f"adaptive_scale (site, channel or channel_mean), not neuron={self.neuron!r} "
                                 f"adaptive_scale={self.adaptive_scale!r}")
        _positive("adaptive_zero_weight", self.adaptive_zero_weight)
        if not 0.0 < self.gated_forget_init < 1.0:
            raise ValueError(f"SpikeLMConfig.gated_forget_init={self.gated_forget_init!r} must lie in (0, 1)")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"SpikeLMConfig.{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    def block_layer_norm_epsilon(self, layer_id: int) -> float:
        """Epsilon of block ``layer_id``'s LayerNorms (see ``layer_norm_eps_rescale_every``)."""
        every = self.layer_norm_eps_rescale_every
        return self.layer_norm_epsilon * 4 ** (layer_id // every) if every else self.layer_norm_epsilon

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SpikeLMConfig:
        """A config of a named size (``tiny``, ``45m``, ``216m``, ``430m``, ``1.3b``) with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown SpikeLM preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


__all__ = ["SpikeLMConfig", "PRESETS", "TIME_MIXES", "NEURONS"]
