"""Training data for recipes: read documents, tokenize, pack into fixed blocks (labels = input_ids).

Documents:
- text files (``format: text``): the file is read whole and split on ``document_separator`` lines when given
  (e.g. ``<|endoftext|>``), otherwise on blank lines (one document per paragraph). Pieces that are empty after
  stripping are skipped.
- jsonl files (``format: jsonl``): one record per line; the document is ``record[text_field]``.

Each document becomes ``[BOS] + tokens (+ [EOS])`` (``add_bos`` / ``add_eos``). With ``packing`` the documents are
concatenated and cut into blocks of exactly ``block_size`` tokens (the remainder of each map batch is dropped);
without it each document is one example truncated to ``block_size`` and :class:`PadCollator` pads batches (labels
-100 on padding).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from .schema import DataConfig

PACK_BATCH_SIZE = 1000


class DataError(ValueError):
    """A data file is missing, empty or not in the expected format."""


def detect_format(path: str | Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    return "jsonl" if Path(path).suffix.lower() in (".jsonl", ".json") else "text"


def load_documents(path: str | Path, cfg: DataConfig) -> datasets.Dataset:
    """A Dataset with one column ``text``, one row per document."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data file {path} is not a file")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    fmt = detect_format(path, cfg.format)
    if fmt == "jsonl":
        ds = _load_jsonl(path, cfg.text_field)
    else:
        ds = _load_text(path, cfg.document_separator)
    if cfg.drop_last_document and len(ds) > 0:
        ds = ds.select(range(len(ds) - 1))
    if cfg.max_documents is not None and len(ds) > cfg.max_documents:
        ds = ds.select(range(cfg.max_documents))
    if len(ds) == 0:
        raise DataError(f"data file {path} contains no non-empty documents")
    return ds


def _load_text(path: Path, separator: str | None) -> datasets.Dataset:
    try:
        raw = datasets.load_dataset("text", data_files=str(path), sample_by="document", split="train")
    except Exception as err:  # e.g. a binary file that is not UTF-8
        raise DataError(f"data file {path} could not be read as UTF-8 text: {type(err).__name__}: {err}") from err
    if separator is not None:
        pattern = re.compile(r"^[ \t]*" + re.escape(separator) + r"[ \t]*$", re.MULTILINE)
    else:
        pattern = re.compile(r"\n[ \t]*\n")  # blank line(s)

    def split(batch):
        docs = []
        for text in batch["text"]:
            docs.extend(piece.strip() for piece in pattern.split(text) if piece.strip())
        return {"text": docs}

    return raw.map(split, batched=True, remove_columns=raw.column_names, desc=f"Splitting {path.name} into documents")


def _load_jsonl(path: Path, field: str) -> datasets.Dataset:
    try:
        raw = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as err:
        raise DataError(
            f"data file {path} could not be read as JSON lines (one JSON object per line); set data.format: text "
            f"for plain text. ({type(err).__name__}: {str(err)[:300]})"
        ) from err
    if field not in raw.column_names:
        raise DataError(
            f"data file {path} has no field {field!r} (set data.text_field); its fields are {raw.column_names}"
        )
    feature = raw.features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(f"data file {path}: field {field!r} must hold strings, found {feature}")
    raw = raw.select_columns([field])
    if field != "text":
        raw = raw.rename_column(field, "text")
    return raw.filter(lambda row: bool(row["text"] and row["text"].strip()), desc=f"Dropping empty {field!r}")


def tokenize_and_pack(docs: datasets.Dataset, tokenizer, cfg: DataConfig, name: str = "data") -> datasets.Dataset:
    """Tokenize documents and pack (or truncate) them; returns columns ``input_ids`` and ``labels``."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if cfg.add_bos and bos is None:
        raise DataError("data.add_bos is true but the tokenizer has no BOS token; set data.add_bos: false")
    if cfg.add_eos and eos is None:
        raise DataError("data.add_eos is true but the tokenizer has no EOS token; set data.add_eos: false")
    prefix = [bos] if cfg.add_bos else []
    suffix = [eos] if cfg.add_eos else []

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [prefix + x + suffix for x in ids]}

    tokens = docs.map(tokenize, batched=True, remove_columns=docs.column_names, desc=f"Tokenizing {name}")
    block = cfg.block_size

    if cfg.packing:

        def pack(batch):
            flat = [t for ids in batch["input_ids"] for t in ids]
            n = len(flat) // block * block
            blocks = [flat[i : i + block] for i in range(0, n, block)]
            return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

        out = tokens.map(
            pack, batched=True, batch_size=PACK_BATCH_SIZE, remove_columns=tokens.column_names,
            desc=f"Packing {name} into blocks of {block}",
        )
        if len(out) == 0:
            total = sum(len(x) for x in tokens["input_ids"])
            raise DataError(
                f"{name}: only {total} tokens, fewer than one block of data.block_size={block}; "
                "use more data or a smaller block_size"
            )
    else:

        def truncate(batch):
            ids = [x[:block] for x in batch["input_ids"]]
            return {"input_ids": ids, "labels": [list(x) for x in ids]}

        out = tokens.map(truncate, batched=True, remove_columns=tokens.column_names, desc=f"Truncating {name}")
    return out


def build_datasets(cfg: DataConfig, tokenizer) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, eval or None) ready for :class:`transformers.Trainer` with :class:`PadCollator`."""
    train_docs = load_documents(cfg.train_file, cfg)
    train = tokenize_and_pack(train_docs, tokenizer, cfg, name=Path(cfg.train_file).name)
    if cfg.max_train_samples is not None and len(train) > cfg.max_train_samples:
        train = train.select(range(cfg.max_train_samples))
    evaluation = None
    if cfg.eval_file:
        eval_docs = load_documents(cfg.eval_file, cfg)
        evaluation = tokenize_and_pack(eval_docs, tokenizer, cfg, name=Path(cfg.eval_file).name)
    return train, evaluation


@dataclass
class PadCollator:
    """Right-pads ``input_ids`` (with ``pad_token_id``) and ``labels`` (with -100); adds ``attention_mask``."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), -100, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
