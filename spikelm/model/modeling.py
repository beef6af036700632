"""The spiking RWKV language model and its Hugging Face wrapper (docs/design.md, "The model", "Hugging Face wrapper").

```
x = ln_in(embed(ids))
for block: x = x + TimeMix(LN(x)); x = x + ChannelMix(LN(x))
logits = head(LN(x))          # head tied to the embedding by default
```

The model is recurrent: ``forward`` on a whole sequence equals feeding it token by token (or in any chunks) with
the ``SpikeLMCache`` returned as ``past_key_values``. Left-padded batches with an ``attention_mask`` give each
prompt's own result: pads are zeroed in front of every state (see ``time_mix.py``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from spikelm.model import event, event_kernel
from spikelm.model.cache import SpikeLMCache
from spikelm.model.channel_mix import ChannelMix
from spikelm.model.config import SpikeLMConfig
from spikelm.model.neurons import AdaptiveNeuron, GatedNeuron, SpikingLinear, SpikingNeuron, build_neuron
from spikelm.model.time_mix import build_time_mix

# Saved models point the Auto factories at thin modules that import the installed spikelm (see spikelm/remote/).
REMOTE_DIR = Path(__file__).parents[1] / "remote"
AUTO_MAP = {
    "AutoConfig": "configuration_spikelm.SpikeLMConfig",
    "AutoModel": "modeling_spikelm.SpikeLMModel",
    "AutoModelForCausalLM": "modeling_spikelm.SpikeLMForCausalLM",
}


def lm_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy of ``logits [B, T, V]`` against ``targets [B, T]`` (already shifted), in fp32;
    targets of ``-100`` are ignored. The one loss of the project: the model's ``labels``, training and evaluation."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)


class SpikeLMBlock(nn.Module):
    """One pre-norm residual block: TimeMix then ChannelMix. State: ``{"time_mix": ..., "channel_mix": ...}``."""

    def __init__(self, config: SpikeLMConfig, layer_id: int) -> None:
        super().__init__()
        eps = config.block_layer_norm_epsilon(layer_id)
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.time_mix = build_time_mix(config, layer_id)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.channel_mix = ChannelMix(config, layer_id)

    def forward(self, x: Tensor, state: dict[str, Any] | None = None, mask: Tensor | None = None,
                use_cache: bool = False) -> tuple[Tensor, dict[str, Any] | None]:
        """``x [B, T, C]`` -> ``(x [B, T, C], new_state or None)``."""
        stepped = event.block_step(self, x, state, mask, use_cache)  # one token, event-driven: one C++ call
        if stepped is not None:
            return stepped
        state = state or {}
        mixed, time_state = self.time_mix(self.ln1(x), state.get("time_mix"), mask, use_cache)
        x = x + mixed
        mixed, channel_state = self.channel_mix(self.ln2(x), state.get("channel_mix"), mask, use_cache)
        x = x + mixed
        return x, ({"time_mix": time_state, "channel_mix": channel_state} if use_cache else None)


class SpikeLMPreTrainedModel(PreTrainedModel):
    """Weight init, checkpointing and cache plumbing shared by the base model and the LM."""

    config_class = SpikeLMConfig
    config: SpikeLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SpikeLMBlock"]
    _is_stateful = True
    # Decays, bonuses and neuron gates stay fp32 even when the model is loaded in bf16/fp16.
    _keep_in_fp32_modules_strict = ["time_decay", "time_first", "bonus", "forget_logit", "step_scale"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The state is a recurrent SpikeLMCache, created by forward on the first call; never a KV DynamicCache.
        return False

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.save_pretrained`` (safetensors) plus an ``auto_map`` and its thin modules.

        A program that never imports spikelm can then load the directory with
        ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (spikelm must be installed).
        """
        self.config.auto_map = dict(AUTO_MAP)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for module_file in {name.split(".")[0] + ".py" for name in AUTO_MAP.values()}:
                shutil.copyfile(REMOTE_DIR / module_file, Path(save_directory) / module_file)
        return result

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.Linear) and hasattr(module, "init_std"):
            init.normal_(module.weight, mean=0.0, std=module.init_std)
        elif isinstance(module, GatedNeuron):
            logit = torch.logit(torch.tensor(module.forget_init)).item()
            init.constant_(module.forget_logit, logit)
        elif isinstance(module, AdaptiveNeuron) and module.step_scale is not None:
            init.constant_(module.step_scale, 1.0 / module.k)  # starts as the fixed rule V_th = mean|x| / k
        elif hasattr(module, "init_recurrence_"):
            module.init_recurrence_()


class SpikeLMModel(SpikeLMPreTrainedModel):
    """Embeddings, blocks and the final norm; returns the last hidden state ``[B, T, C]`` and the cache."""

    def __init__(self, config: SpikeLMConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        # RWKV's ln0: normalises the embeddings before the first block.
        self.ln_in = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.layers = nn.ModuleList(SpikeLMBlock(config, i) for i in range(config.num_hidden_layers))
        eps_out = config.layer_norm_epsilon if config.ln_out_epsilon is None else config.ln_out_epsilon
        self.ln_out = nn.LayerNorm(config.hidden_size, eps=eps_out)
        self.gradient_checkpointing = False
        site_k = config.adaptive_site_k or {}
        for name, module in self.named_modules():
            if isinstance(module, SpikingLinear):
                module.neuron.site = name
                suffix = name.split(".", 2)[-1]  # "layers.0.channel_mix.value" -> "channel_mix.value"
                if isinstance(module.neuron, AdaptiveNeuron) and suffix in site_k:
                    module.neuron.k = float(site_k[suffix])  # post_init below starts learned multipliers at 1/k
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def _check_input_ids(self, input_ids: Tensor) -> None:
        if input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        low, high = (int(bound) for bound in torch.aminmax(input_ids))  # one pass over the ids
        if low < 0 or high >= self.config.vocab_size:
            bad = high if high >= self.config.vocab_size else low
            raise ValueError(
                f"input_ids contain token id {bad} but the model's vocabulary has {self.config.vocab_size} tokens "
                f"(ids 0..{self.config.vocab_size - 1}); the tokenizer probably does not match this model"
            )

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: SpikeLMCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """Run the blocks.

        Args:
            input_ids: ``[B, T]`` token ids (or give ``inputs_embeds [B, T, C]``).
            attention_mask: ``[B, T_total]`` 1 = real token, 0 = pad; only its last T columns are used (generate
                passes the mask of the whole sequence). Pads must come before the real tokens (left padding).
            past_key_values: a ``SpikeLMCache`` from a previous call, continued in place.
            use_cache: return the updated cache (default ``config.use_cache``; off in checkpointed training).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] or inputs_embeds [B, T, C]")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
            if input_ids.shape[1] == 0:
                raise ValueError("the input is empty (T = 0 tokens); give at least one token, e.g. a BOS token")
            if not (self.training and torch.is_grad_enabled()):
                # Reading the ids' range back stalls a GPU's queue: training data is checked where it enters (the
                # tokenizer's vocabulary against the model's), so only inference calls check here.
                self._check_input_ids(input_ids)
            inputs_embeds = self.embeddings(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"inputs_embeds must be [B, T, C] with T >= 1, got shape {tuple(inputs_embeds.shape)}")
        B, T, _ = inputs_embeds.shape
        mask = self._token_mask(attention_mask, B, T)

        use_cache = self.config.use_cache if use_cache is None else use_cache
        checkpointing = self.gradient_checkpointing and self.training
        if checkpointing and use_cache:
            use_cache = False  # a checkpointed block runs twice; a cache would be written twice
        if past_key_values is not None and not isinstance(past_key_values, SpikeLMCache):
            raise ValueError(f"past_key_values must be the SpikeLMCache returned by this model, got "
                             f"{type(past_key_values).__name__}")
        cache = past_key_values
        if use_cache and cache is None:
            cache = SpikeLMCache(len(self.layers))

        x = self.ln_in(inputs_embeds)
        hidden_states = (x,) if output_hidden_states else None
        for i, block in enumerate(self.layers):
            state = cache.layers[i] if cache is not None else None
            if checkpointing:
                x, new_state = self._gradient_checkpointing_func(block.__call__, x, state, mask, False)
            else:
                x, new_state = block(x, state, mask, use_cache)
            if use_cache:
                cache.layers[i] = new_state
            if output_hidden_states:
                hidden_states += (x,)
        x = self.ln_out(x)
        if use_cache:
            cache.seen_tokens += T
        output = BaseModelOutputWithPast(last_hidden_state=x, past_key_values=cache if use_cache else None,
                                         hidden_states=hidden_states)
        return output if return_dict is not False else output.to_tuple()

    @staticmethod
    def _token_mask(attention_mask: Tensor | None, batch: int, length: int) -> Tensor | None:
        """``[B, T]`` bool of real tokens, or ``None`` when every token is real (the fast path)."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
            raise ValueError(f"attention_mask must be [B, >= T] = [{batch}, >= {length}] (1 = token, 0 = pad), "
                             f"got shape {tuple(attention_mask.shape)}")
        window = attention_mask[:, -length:]
        # One host read for both checks: values other than 0/1 (e.g. a float score or 2) are refused, not cast.
        invalid, all_real = torch.stack([((window != 0) & (window != 1)).any(), (window != 0).all()]).tolist()
        if invalid:
            raise ValueError(f"attention_mask values must be 0 (pad) or 1 (token), got {window.unique().tolist()[:8]}")
        return None if all_real else window.bool()


class SpikeLMForCausalLM(SpikeLMPreTrainedModel, GenerationMixin):
    """``SpikeLMModel`` plus the LM head (tied to the embedding by default) and the shifted LM loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: SpikeLMConfig) -> None:
        super().__init__(config)
        self.model = SpikeLMModel(config)
        self.head_neuron: SpikingNeuron | None = None
        if config.spike_lm_head:
            self.head_neuron = build_neuron(config, config.vocab_size, config.hidden_size)
            self.head_neuron.site = "lm_head"
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: SpikeLMCache | None = None,
        use_cache: bool | None = None,
        labels: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits ``[B, T, V]`` (fp32 loss over ``labels [B, T]`` shifted by one, ``-100`` ignored).

        ``logits_to_keep > 0`` computes logits for the last that many positions only (generate's prefill).
        """
        self._resolve_event_decoding(input_ids)
        self._load_cpu_kernels()
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                             use_cache=use_cache, inputs_embeds=inputs_embeds,
                             output_hidden_states=output_hidden_states, return_dict=True)
        hidden = outputs.last_hidden_state
        cache = outputs.past_key_values
        if self.head_neuron is not None:
            mask = SpikeLMModel._token_mask(attention_mask, hidden.shape[0], hidden.shape[1])
            hidden, head_state = self.head_neuron(hidden, cache.head_state if cache is not None else None, mask)
            if cache is not None:
                cache.head_state = head_state
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels must be [B, T] = {tuple(logits.shape[:2])} like input_ids, "
                                 f"got {tuple(labels.shape)}")
            loss = lm_cross_entropy(logits[:, :-1], labels[:, 1:].to(logits.device))
        output = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache,
                                        hidden_states=outputs.hidden_states)
        return output if return_dict is not False else output.to_tuple()

    def set_training_progress(self, progress: float) -> None:
        """Tell the neurons how far training is (``progress`` in [0, 1], step / total steps).

        With ``config.spike_phase_in = f > 0`` the adaptive neurons output ``x + mix * (spikes - x)`` with ``mix =
        min(1, progress / f)``: dense at the start, full spikes from ``f`` of the way on. Without a phase-in it does
        nothing; a model that was never told (inference, an export) spikes fully.
        """
        phase_in = self.config.spike_phase_in
        mix = 1.0 if phase_in <= 0 else min(1.0, max(0.0, progress) / phase_in)
        for module in self.modules():
            if isinstance(module, AdaptiveNeuron):
                module.mix = mix

    def zero_target_loss(self) -> tuple[Tensor, Tensor] | None:
        """The zero-target term of the last training forward and the smooth zero fraction it saw, or None.

        With ``config.adaptive_zero_target = t``: ``adaptive_zero_weight * max(0, t - z)``, ``z`` the adaptive
        sites' smooth zero fractions weighted by their elements (each site's learned multiplier gets the gradient).
        Clears what the neurons kept, so each forward is counted once.
        """
        target = self.config.adaptive_zero_target
        if target is None:  # no neuron tracks zeros (build_neuron): nothing to walk on every training step
            return None
        parts = []
        for module in self.modules():
            if isinstance(module, AdaptiveNeuron) and module.soft_zeros is not None:
                parts.append(module.soft_zeros)
                module.soft_zeros = None
        if not parts:
            return None
        total = sum(count for _, count in parts)
        zeros = sum(fraction * (count / total) for fraction, count in parts)
        return self.config.adaptive_zero_weight * torch.relu(target - zeros), zeros.detach()

    def set_event_decoding(self, enabled: bool | str = True) -> None:
        """Event-driven synapses in one-token inference calls: ``True``, ``False`` or ``"auto"`` (the default).

        With ``True`` each spiking projection stores its weight input-major (the same parameter and values, no second
        copy; ``state_dict`` and saved files are unchanged) and one-token calls without autograd on CPU read only the
        weight rows of inputs that spiked (``Synapses``). ``"auto"`` decides at the first one-token inference call
        (dense on CUDA and for models whose spiking weights fit in cache, else a short calibration, cached; see
        ``spikelm.model.event``). Refused (``ValueError``) for ``True`` in training mode; ``model.train()`` later
        restores the standard layout and ``model.eval()`` re-applies the event layout. Calls with autograd on, prompts
        and CUDA weights always take the dense product on the same parameters.
        """
        mode = event.check_mode(enabled)
        self._event_decoding = mode
        self._event_auto_pending = mode == "auto"
        event.apply(self, mode is True)

    @property
    def event_decoding(self) -> bool | str:
        """The mode given to ``set_event_decoding`` (``"auto"`` until set)."""
        return getattr(self, "_event_decoding", "auto")

    def _resolve_event_decoding(self, input_ids: Tensor | None) -> None:
        """Under ``"auto"``, decide at the first one-token inference call (see ``spikelm.model.event.decide``)."""
        if (input_ids is None or input_ids.shape[1] != 1 or self.training or torch.is_grad_enabled()
                or not getattr(self, "_event_auto_pending", True) or self.event_decoding != "auto"):
            return
        self._event_auto_pending = False  # before deciding: the calibration calls forward itself
        event.apply(self, event.decide(self))

    def _load_cpu_kernels(self) -> None:
        """At the first CPU inference call of a model past ``event.SMALL_BYTES`` of spiking weights, build (or load)
        the C++ inference kernels, which its prompts then use (the neurons' one-pass rule, the C++ recurrence).
        Smaller models keep the torch ops unless something else loaded the kernels: their prompts gain little, and
        the first build takes about a minute."""
        if (self.training or torch.is_grad_enabled() or getattr(self, "_cpu_kernels_checked", False)
                or self.device.type != "cpu"):
            return
        self._cpu_kernels_checked = True
        if not event.fits_in_cache(self):
            event_kernel.extension()

    def prepare_inputs_for_generation(self, input_ids: Tensor, next_sequence_length: int | None = None,
                                      past_key_values: SpikeLMCache | None = None, **kwargs: Any) -> dict[str, Any]:
        # With a cache, feed only the tokens the state has not consumed yet: the recurrence carries the rest.
        if past_key_values is not None and next_sequence_length is None:
            next_sequence_length = max(input_ids.shape[1] - past_key_values.get_seq_length(), 1)
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length,
                                                     past_key_values=past_key_values, **kwargs)


__all__ = ["SpikeLMBlock", "SpikeLMPreTrainedModel", "SpikeLMModel", "SpikeLMForCausalLM", "lm_cross_entropy"]
