"""Convert an ``RwkvForCausalLM`` directory with ``neuron: none`` and compare logits with transformers' model.

    python tools/check_convert.py --src ~/models/rwkv-4-169m-pile     # a checkpoint you have on disk
    python tools/check_convert.py                                      # a random model with rwkv-4-169m-pile's shape

Prints the conversion time and the relative error (Frobenius norm) of the converted model's fp32 logits on a random
batch against ``RwkvForCausalLM`` in eval mode (what ``generate`` runs). Not a test: it needs minutes and a GB of disk.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import RwkvConfig, RwkvForCausalLM

from spikelm.model.convert import convert

# rwkv-4-169m-pile's config.json (the smallest RWKV-4 "Pile" model on the Hugging Face hub).
PILE_169M = {"vocab_size": 50277, "hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072,
             "context_length": 1024, "rescale_every": 6, "layer_norm_epsilon": 1e-5, "bos_token_id": 0,
             "eos_token_id": 0, "tie_word_embeddings": False}


def random_rwkv(directory: Path) -> Path:
    """A random ``RwkvForCausalLM`` of rwkv-4-169m-pile's shape (LayerNorms perturbed off their init), saved."""
    torch.manual_seed(0)
    model = RwkvForCausalLM(RwkvConfig(**PILE_169M))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln" in name:
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, help="an RwkvForCausalLM directory (default: a random 169m-shaped one)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = args.src or random_rwkv(Path(tmp) / "rwkv")
        start = time.perf_counter()
        model = convert(src, neuron="none")
        seconds = time.perf_counter() - start
        rwkv = RwkvForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, rwkv.config.vocab_size, (args.batch, args.seq), generator=generator)
        with torch.no_grad():
            expected = rwkv(ids).logits
            got = model(ids).logits
    error = ((got - expected).norm() / expected.norm()).item()
    print(f"{src}: converted {sum(p.numel() for p in model.parameters()):,} parameters in {seconds:.1f} s; "
          f"relative logit error vs RwkvForCausalLM {error:.2e} on {args.batch} x {args.seq} tokens")


if __name__ == "__main__":
    main()
