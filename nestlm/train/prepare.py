"""`nestlm prepare-data`: tokenize local text files into memmapped shards for TokenShards.

    nestlm prepare-data FILE_OR_DIR ... --out DIR [--tokenizer byte|PATH/tokenizer.json]
                        [--split-docs file|line|blank] [--val-fraction 0.01] [--shard-tokens N] [--seed S]

Each document is followed by an end-of-document token. Output in DIR: train_000.bin, ...,
val_000.bin, ... (flat token arrays, uint16 when the vocabulary fits, else uint32) and meta.json.
The byte-level tokenizer (default) maps the files' bytes to ids 0..255 as they are (any encoding
round-trips exactly) and uses 256 as end-of-document; a Hugging Face tokenizer.json (read with the
`tokenizers` package) reads UTF-8 text (another encoding is a one-line error naming the file) and
uses its own EOS token. Files under DIR, and hidden files and folders, are never read as input. An
existing output folder is never overwritten unless --force is given.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nestlm.cli import ArgumentParser, UsageError, command
from nestlm.train.export import publish_dir

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class ByteTokenizer:
    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, data: bytes) -> list[int]:
        return list(data)


class HFTokenizer:
    """A local tokenizer.json (no download)."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError(
                "--tokenizer: a tokenizer.json needs the `tokenizers` package (pip install tokenizers)"
            ) from None
        if not path.is_file():
            raise UsageError(f"--tokenizer: no tokenizer file at {path}")
        self.tok = Tokenizer.from_file(str(path))
        self.name = str(path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        eos = next((self.tok.token_to_id(t) for t in EOS_NAMES if self.tok.token_to_id(t) is not None), None)
        if eos is None:
            raise ValueError(f"--tokenizer: {path} has no end-of-document token (looked for {EOS_NAMES})")
        self.eos_id = int(eos)

    def encode(self, data: bytes) -> list[int]:
        """Ids of UTF-8 `data` (UnicodeDecodeError for other bytes: this tokenizer reads text)."""
        return self.tok.encode(data.decode("utf-8"), add_special_tokens=False).ids


def _files(inputs: list[str], out_dir: Path) -> list[Path]:
    """Input files: the files named, and the non-hidden files under the folders named, minus `out_dir`."""
    out = out_dir.resolve()
    found: list[Path] = []
    for s in inputs:
        p = Path(s)
        if not p.exists():
            raise UsageError(f"input {p} does not exist")
        if p.resolve() == out or out in p.resolve().parents:
            raise UsageError(f"--out {out_dir} contains the input {p}; choose an output folder outside it")
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if f.is_file() and not any(part.startswith(".") for part in rel) and out not in f.resolve().parents:
                    found.append(f)
        elif p.is_file():
            found.append(p)
    if not found:
        raise UsageError(f"no input files found in {inputs}")
    return found


def documents(files: list[Path], split_docs: str) -> Iterator[tuple[Path, bytes]]:
    """(file, bytes) of every non-blank document, byte for byte as in the file."""
    for f in files:
        data = f.read_bytes()
        if split_docs == "file":
            parts = [data]
        elif split_docs == "line":
            parts = data.splitlines()
        else:  # blank: paragraphs separated by empty lines
            parts = data.split(b"\n\n")
        yield from ((f, p) for p in parts if p.strip())


class ShardWriter:
    def __init__(self, out: Path, prefix: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.prefix, self.dtype, self.shard_tokens = out, prefix, dtype, shard_tokens
        self.buf: list[int] = []
        self.n_shards = 0
        self.n_tokens = 0

    def add(self, ids: list[int]) -> None:
        self.buf.extend(ids)
        self.n_tokens += len(ids)
        while len(self.buf) >= self.shard_tokens:
            self._flush(self.buf[: self.shard_tokens])
            self.buf = self.buf[self.shard_tokens :]

    def _flush(self, ids: list[int]) -> None:
        np.asarray(ids, dtype=self.dtype).tofile(self.out / f"{self.prefix}_{self.n_shards:03d}.bin")
        self.n_shards += 1

    def close(self) -> None:
        if self.buf:  # an empty split writes no shard (memmapping an empty file fails)
            self._flush(self.buf)
        self.buf = []


def prepare(
    inputs: list[str],
    out: str,
    tokenizer: str = "byte",
    split_docs: str = "file",
    val_fraction: float = 0.01,
    shard_tokens: int = 100_000_000,
    seed: int = 0,
    force: bool = False,
) -> dict:
    """Write shards + meta.json to `out`; returns the meta dict."""
    if split_docs not in ("file", "line", "blank"):
        raise UsageError(f"--split-docs={split_docs!r} is invalid: expected file, line or blank")
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"--val-fraction={val_fraction!r} is invalid: expected a number in [0, 1)")
    if shard_tokens < 1:
        raise UsageError(f"--shard-tokens={shard_tokens!r} is invalid: expected an int >= 1")
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"--out {out_dir} exists and is not empty (pass --force to replace it)")
    tok = ByteTokenizer() if tokenizer == "byte" else HFTokenizer(Path(tokenizer))
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
    files = _files(inputs, out_dir)
    # write into a sibling temp folder, then move into place: a failure leaves `out` untouched
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        rng = np.random.default_rng(seed)
        n_docs = {"train": 0, "val": 0}
        for f, doc in documents(files, split_docs):
            split = "val" if rng.random() < val_fraction else "train"
            try:
                ids = tok.encode(doc)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{f} is not UTF-8 text (a document's byte {e.start} is {doc[e.start : e.start + 1]!r}); "
                    f"--tokenizer {tok.name} reads text: convert the file or use --tokenizer byte"
                ) from None
            writers[split].add(ids + [tok.eos_id])
            n_docs[split] += 1
        n = n_docs["train"] + n_docs["val"]
        if n_docs["train"] == 0:
            raise ValueError(f"no document fell into the training split ({n} non-blank documents in {inputs})")
        if n_docs["val"] == 0 and val_fraction > 0:
            # a validation split was asked for; an empty one would only fail later, at fit time
            raise ValueError(
                f"no document fell into the validation split ({n} document(s), --val-fraction "
                f"{val_fraction}); raise --val-fraction, split into more documents (--split-docs line or blank), "
                "or pass --val-fraction 0"
            )
        for w in writers.values():
            w.close()
        meta = {
            "tokenizer": tok.name,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "dtype": dtype.name,
            "split_docs": split_docs,
            "seed": seed,
            "train_tokens": writers["train"].n_tokens,
            "val_tokens": writers["val"].n_tokens,
            "train_docs": n_docs["train"],
            "val_docs": n_docs["val"],
            "sources": [str(f) for f in files],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


@command("prepare-data")
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="nestlm prepare-data", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="text files or folders of text files")
    p.add_argument("--out", required=True, help="output folder (shards + meta.json)")
    p.add_argument("--tokenizer", default="byte", help="'byte' (default) or a local tokenizer.json")
    p.add_argument(
        "--split-docs",
        default="file",
        choices=("file", "line", "blank"),
        help="document boundaries: one per file (default), per line, or per blank-line paragraph",
    )
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    a = p.parse_args(argv)
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise UsageError(f"--out {a.out} is a file; expected a folder")
    meta = prepare(a.inputs, a.out, a.tokenizer, a.split_docs, a.val_fraction, a.shard_tokens, a.seed, a.force)
    print(
        f"wrote {meta['train_tokens']} train / {meta['val_tokens']} val tokens "
        f"({meta['train_docs']} / {meta['val_docs']} documents) to {a.out}"
    )
