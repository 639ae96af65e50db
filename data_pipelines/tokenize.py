"""``llada-tokenize``: documents -> fixed-size token shards + manifest.json, parallel and resumable.

Example::

    llada-tokenize --input corpus/ --tokenizer tok/ --out shards/ --shard-tokens 16777216
    llada-tokenize --dataset wikitext --dataset-config wikitext-103-raw-v1 --split train ...

A killed run, started again with the same arguments, continues where it stopped and
produces byte-identical shards (see ``data_pipelines.shards``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.shards import (
    FORMAT,
    MANIFEST,
    PROGRESS,
    ShardPacker,
    remove_temp_files,
)
from data_pipelines.sources import (
    SourceSpec,
    add_input_arguments,
    default_workers,
    describe_sources,
    iter_documents,
)
from llada_train.atomic import write_json_atomic
from llada_train.data.manifest import read_json
from llada_train.data.tokenizer import (
    load_tokenizer,
    resolve_special_ids,
    tokenizer_fingerprint,
    tokenizer_json_path,
    vocab_size_of,
)
from llada_train.errors import LladaError, exit_on_error

# Test hook: exit right after shard N is renamed into place, before progress.json records it
# (the harshest point for a crash), to prove resumes are exact.
EXIT_AFTER_ENV = "LLADA_TOKENIZE_EXIT_AFTER_SHARDS"

_W: dict[str, Any] = {}  # per-worker-process tokenizer state


def _init_worker(
    tokenizer: str, eos: int, bos: int | None, dtype: str, pool_worker: bool = True
) -> None:
    # one process per core: keep each tokenizer single-threaded (no oversubscription)
    if pool_worker:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _W.update(tok=load_tokenizer(tokenizer), eos=eos, bos=bos, dtype=np.dtype(dtype))


def encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents into one stream ([BOS] ids EOS per document) and per-document lengths."""
    tok, eos, bos = _W["tok"], _W["eos"], _W["bos"]
    encs = tok.encode_batch_fast(texts, add_special_tokens=False)
    ids = [e.ids for e in encs]
    lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    extra = 1 if bos is None else 2
    doc_lens = lens + extra  # (n_docs,)
    stream = np.empty(int(doc_lens.sum()), dtype=_W["dtype"])  # (total,)
    ends = np.cumsum(doc_lens)
    is_text = np.ones(len(stream), dtype=bool)
    stream[ends - 1] = eos
    is_text[ends - 1] = False
    if bos is not None:
        stream[ends - doc_lens] = bos
        is_text[ends - doc_lens] = False
    stream[is_text] = np.fromiter(
        itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum())
    )
    return stream, doc_lens


def _chunks(docs: Iterator[str], chunk_docs: int, chunk_chars: int) -> Iterator[list[str]]:
    """Group documents so each task is big enough to amortise inter-process overhead."""
    chunk: list[str] = []
    chars = 0
    for d in docs:
        chunk.append(d)
        chars += len(d)
        if len(chunk) >= chunk_docs or chars >= chunk_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _start_state(out: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Progress to resume from; None when the output is already complete for these settings."""
    if overwrite and out.exists():
        for f in list(out.glob("shard_*.bin*")) + [out / MANIFEST, out / PROGRESS]:
            f.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out)
    for name in (MANIFEST, PROGRESS):
        f = out / name
        if not f.exists():
            continue
        old = read_json(f).get("settings")
        if old != settings:
            diff = sorted(
                k for k in set(old or {}) | set(settings) if (old or {}).get(k) != settings.get(k)
            )
            raise LladaError(
                f"output folder {out} holds a tokenization with other settings (differs in: "
                f"{', '.join(diff)}): use another --out, or --overwrite to start again"
            )
        if name == MANIFEST:
            return None
        return read_json(f)
    return {"settings": settings, "shards": [], "next_doc": 0, "offset": 0}


def tokenize_to_shards(
    spec: SourceSpec,
    tokenizer: str,
    out: str | Path,
    shard_tokens: int = 1 << 24,
    num_workers: int | None = None,
    add_bos: bool = False,
    eos_token: str | None = None,
    bos_token: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    chunk_docs: int = 512,
    chunk_chars: int = 1 << 20,
) -> dict[str, Any]:
    """Tokenize every document of ``spec`` into shards under ``out``; returns the manifest."""
    if shard_tokens <= 0:
        raise LladaError(f"--shard-tokens={shard_tokens} must be positive")
    out = Path(out)
    tok = load_tokenizer(tokenizer)
    special = resolve_special_ids(tok, tokenizer, eos_token, bos_token)
    if add_bos and special.bos is None:
        raise LladaError(
            f"--add-bos given but tokenizer {tokenizer} has no BOS token: pass --bos-token"
        )
    vocab = vocab_size_of(tok)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    bos = special.bos if add_bos else None
    settings = {
        "sources": describe_sources(spec),
        "text_field": spec.text_field,
        "txt_doc": spec.txt_doc,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "shard_tokens": shard_tokens,
        "add_bos": add_bos,
        "eos_id": special.eos,
        "bos_id": special.bos,
        "dtype": dtype,
    }
    # peek before anything is written: an empty input must not produce an empty shard set
    all_docs = iter_documents(spec)
    first = next(all_docs, None)
    if first is None:
        raise LladaError(
            f"no documents in {', '.join([*map(str, spec.inputs or []), *filter(None, [spec.dataset])])}"
            " (empty or blank text only): nothing written; check --input/--dataset and --text-field"
        )
    state = _start_state(out, settings, overwrite)
    if state is None:
        print(f"{out / MANIFEST} is already complete for these settings; nothing to do")
        return read_json(out / MANIFEST)

    workers = num_workers or default_workers()
    exit_after = int(os.environ.get(EXIT_AFTER_ENV, "0"))

    def on_shard(k: int) -> None:
        if exit_after and k + 1 >= exit_after:
            os._exit(75)

    packer = ShardPacker(out, shard_tokens, np.dtype(dtype), state)
    docs = itertools.islice(itertools.chain([first], all_docs), state["next_doc"], None)  # skip done
    chunks = _chunks(docs, chunk_docs, chunk_chars)
    init = (str(tokenizer_json_path(tokenizer)), special.eos, bos, dtype)
    bar = _progress_bar(progress, state["next_doc"])
    t0, n_tok = time.perf_counter(), 0

    def consume(result: tuple[np.ndarray, np.ndarray]) -> None:
        nonlocal n_tok
        packer.add(*result, on_shard=on_shard)
        n_tok += len(result[0])
        if bar is not None:
            bar.update(len(result[1]))
            bar.set_postfix(
                tok_per_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):,.0f}", refresh=False
            )

    if workers <= 1:
        _init_worker(*init, pool_worker=False)
        for c in chunks:
            consume(encode_chunk(c))
    else:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=init) as pool:
            pending: deque = deque()
            for c in chunks:  # bounded in flight: memory stays flat on any corpus size
                pending.append(pool.apply_async(encode_chunk, (c,)))
                if len(pending) >= 2 * workers:
                    consume(pending.popleft().get())
            while pending:
                consume(pending.popleft().get())
    packer.finish(on_shard=on_shard)
    if bar is not None:
        bar.close()
    manifest = {
        "format": FORMAT,
        "version": 1,
        "dtype": dtype,
        "vocab_size": vocab,
        "tokenizer": str(tokenizer),
        "tokenizer_sha256": settings["tokenizer_sha256"],
        "eos_id": special.eos,
        "bos_id": special.bos,
        "eos_token": special.eos_token,
        "bos_token": special.bos_token,
        "add_bos": add_bos,
        "shard_tokens": shard_tokens,
        "num_tokens": sum(s["num_tokens"] for s in packer.shards),
        "num_documents": packer.next_doc,
        "shards": packer.shards,
        "sources": settings["sources"],
        "settings": settings,
    }
    write_json_atomic(out / MANIFEST, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest


def _progress_bar(enabled: bool, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc="tokenize", unit="doc", initial=initial, dynamic_ncols=True, mininterval=0.5)


def build_arg_parser() -> argparse.ArgumentParser:
    """Arguments of ``llada-tokenize``."""
    ap = argparse.ArgumentParser(prog="llada-tokenize", description=__doc__.splitlines()[0])
    add_input_arguments(ap, ".txt/.jsonl/.parquet files, folders, globs, or save_to_disk folders")
    ap.add_argument(
        "--streaming", action="store_true", help="stream the HF dataset instead of downloading it"
    )
    ap.add_argument(
        "--text-field", default="text", help="field holding the text in jsonl/parquet/datasets"
    )
    ap.add_argument(
        "--txt-doc",
        default="file",
        choices=["file", "paragraph", "line"],
        help="what one document is in a .txt file",
    )
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json or a HF tokenizer folder")
    ap.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    ap.add_argument(
        "--shard-tokens", type=int, default=1 << 24, help="tokens per shard (default 16,777,216)"
    )
    ap.add_argument(
        "--num-workers", type=int, default=None, help="encoding processes (default: all cores)"
    )
    ap.add_argument("--add-bos", action="store_true", help="put BOS before every document")
    ap.add_argument(
        "--eos-token", help="EOS token string (default <|endoftext|> or the folder's config)"
    )
    ap.add_argument(
        "--bos-token", help="BOS token string (default <|startoftext|> or the folder's config)"
    )
    ap.add_argument(
        "--overwrite", action="store_true", help="discard an existing output instead of resuming"
    )
    ap.add_argument("--no-progress", action="store_true")
    return ap


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    """Console entry point ``llada-tokenize``."""
    args = build_arg_parser().parse_args(argv)
    if not args.input and not args.dataset:
        raise LladaError("nothing to tokenize: pass --input FILES or --dataset NAME")
    spec = SourceSpec(
        inputs=args.input,
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        split=args.split,
        streaming=args.streaming,
        text_field=args.text_field,
        txt_doc=args.txt_doc,
    )
    m = tokenize_to_shards(
        spec,
        args.tokenizer,
        args.out,
        args.shard_tokens,
        args.num_workers,
        args.add_bos,
        args.eos_token,
        args.bos_token,
        args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"{args.out}: {m['num_documents']:,} documents, {m['num_tokens']:,} tokens in {len(m['shards'])} shards ({m['dtype']})"
    )


if __name__ == "__main__":
    main()
