"""tools/bench_data.py end to end on a tiny corpus (the 1 GB figures are in the README)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench_data.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_data", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_data"] = module
    spec.loader.exec_module(module)
    return module


def test_bench_data_smoke_run_on_a_tiny_corpus(tmp_path, capsys):
    bench = load_bench()
    args = ["--size-mb", "1", "--file-mb", "1", "--measure-mb", "1", "--vocab-size", "400", "--sample-chars",
            "100000", "--num-proc", "1", "--workdir", str(tmp_path)]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "| map-style build (datasets map, num_proc=1) |" in out
    assert "| streaming StreamLoader (1 rank, prefetch thread) |" in out
    assert "SpikeLM position (shard, byte offset)" in out and "former resume" in out
    corpus = sorted((tmp_path / "corpus").glob("*.jsonl"))
    assert len(corpus) == 1 and corpus[0].stat().st_size >= 1_000_000
    assert bench.main(args) == 0  # the corpus and tokenizer are reused
    assert "generated" not in capsys.readouterr().out
