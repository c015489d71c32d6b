"""Training batches: synthetic task rows and packed user text, both resumable exactly.

Both sources return `(input_ids, targets)`, LongTensors of shape [B, T], with targets = the next token
and -100 where no loss is taken (what `model.compute_loss(input_ids, targets)` expects).

Synthetic tasks, one example per row (the format REFERENCE §2 found learnable):

    batcher = TaskBatcher([get_task("add2")], tok, batch_size=256, seq_len=32, seed=1337)
    x, y = batcher.next_batch()               # row: <bos> prompt answer <eos> <pad>...
    state = batcher.state_dict()              # {"step": ...}; batches depend only on (seed, rank, step)
    ids = prompt_ids(tok, example)            # what the model sees at evaluation (nanoseek.tasks): <bos> prompt

With loss_on_answer_only the targets keep only the answer tokens and the <eos> that ends them.

User text files (.txt: paragraphs separated by blank lines; .jsonl: one object per line with a text
field; .parquet: a text column, read one row group at a time), streamed, never read whole into memory:

    ds = PackedTextDataset(["data/"], tok, seq_len=1024, rank=rank, world_size=world)
    x, y = ds.next_batch(batch_size)          # documents as <bos> text <eos>, concatenated, cut in rows
    ds.state_dict() / ds.load_state_dict(s)   # position: epoch, file, document, token offset

Sharding for DDP: document i of the corpus goes to rank i % world_size, so each rank has its own
position; a checkpoint keeps every rank's `state_dict()` (gather them, e.g. with all_gather_object).
A row is T+1 consecutive tokens; consecutive rows overlap by one token so every token is a target once.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from nanoseek.model.loss import IGNORE_INDEX
from nanoseek.tasks import Example, Task
from nanoseek.tasks.demonstrations import r1_answer_text
from nanoseek.tokenizer import Tokenizer


class TaskBatcher:
    """Batches of one-example rows drawn from a weighted mixture of tasks (training split only).

    Batch `step` is a pure function of (seed, rank, step), so resuming only needs the step counter."""

    def __init__(
        self,
        tasks: Sequence[Task],
        tokenizer: Tokenizer,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        loss_on_answer_only: bool = True,
        rank: int = 0,
        world_size: int = 1,
        fmt: str = "plain",
        thinking: Sequence[str] = (),
    ):
        if not tasks:
            raise ValueError("TaskBatcher needs at least one task")
        if fmt == "r1" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.format=r1 needs a tokenizer with a chat template (one trained in the run has one)")
        if weights is not None and (len(weights) != len(tasks) or sum(weights) <= 0 or min(weights) < 0):
            raise ValueError(f"task weights {list(weights)} must be {len(tasks)} non-negative numbers, sum > 0")
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        self.tasks, self.tok = list(tasks), tokenizer
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.weights = list(weights) if weights is not None else [1.0] * len(tasks)
        self.loss_on_answer_only = loss_on_answer_only
        self.rank, self.world_size = rank, world_size
        self.fmt = fmt
        if thinking and fmt != "r1":
            raise ValueError(f"thinking tasks {list(thinking)} need the r1 format (a {fmt!r} row has no thought)")
        self.thinking = frozenset(thinking)  # r1: these tasks' rows work the problem out in the thought
        self.step = 0
        self.bos_id, self.eos_id, self.pad_id = tokenizer.special_ids()
        self._encode = lru_cache(maxsize=200_000)(lambda s: tuple(tokenizer.encode(s, add_special_tokens=False)))
        self._chat = lru_cache(maxsize=200_000)(
            lambda q: tuple(tokenizer.encode_chat([{"role": "user", "content": q}]))
        )

    def encode_example(self, ex: Example) -> tuple[list[int], int]:
        """Token ids of the prompt, the answer and <eos>, and the index where the answer starts. plain:
        <bos> prompt answer <eos>; r1: the chat template's user turn (with the assistant's header), then
        <think></think><answer>answer</answer> <eos>, as `nanoseek eval --format r1 --system-prompt ''` asks, or
        for a task in `thinking` the worked thought (demonstrations.r1_thought: column addition step by step)."""
        if self.fmt == "r1":
            prompt = list(self._chat(ex.prompt))
            answer = self._encode(r1_answer_text(ex, think=ex.task in self.thinking))
        else:
            prompt, answer = [self.bos_id, *self._encode(ex.prompt)], self._encode(ex.answer)
        return [*prompt, *answer, self.eos_id], len(prompt)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = random.Random(f"task-batch/{self.seed}/{self.rank}/{self.world_size}/{step}")
        T = self.seq_len
        inputs = [[self.pad_id] * T for _ in range(self.batch_size)]
        targets = [[IGNORE_INDEX] * T for _ in range(self.batch_size)]
        for b in range(self.batch_size):
            task = rng.choices(self.tasks, weights=self.weights)[0]
            ex = task.generate(rng, "train")
            ids, answer_start = self.encode_example(ex)
            if len(ids) > T + 1:
                raise ValueError(
                    f"task {task.name}: example {ex.prompt + ex.answer!r} is {len(ids)} tokens with "
                    f"<bos>/<eos>, more than seq_len+1={T + 1}; raise seq_len"
                )
            n = len(ids) - 1
            inputs[b][:n] = ids[:-1]
            first = answer_start - 1 if self.loss_on_answer_only else 0  # position predicting ids[first+1]
            targets[b][first:n] = ids[first + 1 :]
        return torch.tensor(inputs, dtype=torch.long), torch.tensor(targets, dtype=torch.long)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "tasks", "step": self.step, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "tasks":
            raise ValueError(f"data state is not a TaskBatcher state: {state!r}")
        if state["seed"] != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run has seed {self.seed}")
        self.step = int(state["step"])


# ---- user text ----------------------------------------------------------------------------------------
SUFFIXES = (".txt", ".jsonl", ".parquet")


def expand_data_files(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files from paths, directories (their .txt/.jsonl/.parquet files, sorted) and glob patterns."""
    out: list[Path] = []
    for spec in specs:
        spec_s = str(spec)
        if any(c in spec_s for c in "*?["):
            matches = sorted(glob.glob(spec_s, recursive=True))
            if not matches:
                raise FileNotFoundError(f"{spec_s}: no data files match this pattern")
            out.extend(Path(m) for m in matches if Path(m).is_file())
            continue
        p = Path(spec_s)
        if not p.exists():
            raise FileNotFoundError(f"{p}: data file not found")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{p}: directory holds no {'/'.join(SUFFIXES)} files")
            out.extend(found)
        else:
            out.append(p)
    for p in out:
        if p.suffix not in SUFFIXES:
            raise ValueError(f"{p}: unsupported data file type {p.suffix!r}; use {', '.join(SUFFIXES)}")
    if not out:
        raise ValueError("no data files given")
    return out


def _iter_txt(path: Path, start: int) -> Iterator[tuple[int, str]]:
    doc, lines = 0, []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                lines.append(line)
                continue
            if lines:
                if doc >= start:
                    yield doc, "".join(lines).rstrip("\n")
                doc, lines = doc + 1, []
    if lines and doc >= start:
        yield doc, "".join(lines).rstrip("\n")


def _iter_jsonl(path: Path, start: int, field: str) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < start or not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i + 1}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or field not in obj:
                keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"{path}:{i + 1}: no {field!r} field (found {keys}); set data.text_field")
            if not isinstance(obj[field], str):
                raise ValueError(f"{path}:{i + 1}: field {field!r} is not a string")
            yield i, obj[field]


def _iter_parquet(path: Path, start: int, field: str) -> Iterator[tuple[int, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid & co on non-parquet data
        raise ValueError(f"{path}: not a readable parquet file ({exc})") from exc
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path}: no column {field!r} (columns: {names}); set data.text_field")
    first_row = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if first_row + n <= start:  # skip whole row groups without reading them
            first_row += n
            continue
        column = pf.read_row_group(rg, columns=[field]).column(0).to_pylist()
        for j, text in enumerate(column):
            if first_row + j >= start and text is not None:
                yield first_row + j, str(text)
        first_row += n


def read_docs(path: Path, start: int, field: str) -> Iterator[tuple[int, str]]:
    """(index, text) of a data file's documents from document `start` on, by the file's type."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found (removed during the run?)")
    if path.suffix == ".txt":
        return _iter_txt(path, start)
    if path.suffix == ".jsonl":
        return _iter_jsonl(path, start, field)
    return _iter_parquet(path, start, field)


def iter_texts(files: Sequence[str | os.PathLike], text_field: str = "text", limit: int | None = None) -> Iterator[str]:
    """Documents of the given files in order (streamed), at most `limit`, e.g. to train a tokenizer."""
    docs = (text for path in expand_data_files(files) for _, text in read_docs(path, 0, text_field))
    return itertools.islice(docs, limit)


@dataclass
class _Segment:
    """One tokenized document in the row buffer; `offset` tokens of it are already consumed."""

    epoch: int
    file: int
    doc: int
    global_doc: int
    tokens: list[int]
    offset: int


class PackedTextDataset:
    """Fixed-length rows of packed documents from text files, streamed, sharded and resumable."""

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        tokenizer: Tokenizer,
        seq_len: int,
        text_field: str = "text",
        rank: int = 0,
        world_size: int = 1,
        loop: bool = True,
    ):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        self.files = expand_data_files(files)
        self.tok, self.seq_len, self.text_field = tokenizer, seq_len, text_field
        self.rank, self.world_size, self.loop = rank, world_size, loop
        self._pos = {"epoch": 0, "file": 0, "doc": 0, "global_doc": 0, "offset": 0}
        self._rows: Iterator[list[int]] | None = None

    # position ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"kind": "packed", "rank": self.rank, "world_size": self.world_size, **self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "packed":
            raise ValueError(f"data state is not a PackedTextDataset state: {state!r}")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"data state belongs to rank {state['rank']} of {state['world_size']}, "
                f"this is rank {self.rank} of {self.world_size}"
            )
        if state["file"] > len(self.files):
            raise ValueError(f"data state points at file #{state['file']}, the run has {len(self.files)} files")
        self._pos = {k: int(state[k]) for k in ("epoch", "file", "doc", "global_doc", "offset")}
        self._rows = None

    # reading -------------------------------------------------------------------------------------------
    def _docs(self, file_idx: int, start_doc: int) -> Iterator[tuple[int, str]]:
        return read_docs(self.files[file_idx], start_doc, self.text_field)

    def _segments(self) -> Iterator[_Segment]:
        """This rank's documents from the saved position on, tokenized, across files and epochs."""
        bos, eos, _ = self.tok.special_ids()
        pos = dict(self._pos)
        first = True  # only the document at the saved position starts at a saved offset
        while True:
            fresh_epoch = pos["file"] == 0 and pos["doc"] == 0 and pos["offset"] == 0
            epoch_tokens = 0
            global_doc = pos["global_doc"]  # corpus-wide document index, for sharding
            for file_idx in range(pos["file"], len(self.files)):
                start = pos["doc"] if file_idx == pos["file"] else 0
                last_doc = start - 1
                for doc, text in self._docs(file_idx, start):
                    global_doc += doc - last_doc
                    last_doc = doc
                    g = global_doc - 1
                    if g % self.world_size != self.rank:
                        continue
                    tokens = [bos, *self.tok.encode(text, add_special_tokens=False), eos]
                    offset = pos["offset"] if first else 0
                    first = False
                    epoch_tokens += len(tokens) - offset
                    yield _Segment(pos["epoch"], file_idx, doc, g, tokens, offset)
            if fresh_epoch and epoch_tokens < self.seq_len + 1:
                names = ", ".join(str(f) for f in self.files[:3]) + (" ..." if len(self.files) > 3 else "")
                raise ValueError(
                    f"empty dataset: {names} gave rank {self.rank} of {self.world_size} only {epoch_tokens} "
                    f"tokens, fewer than one row of seq_len+1={self.seq_len + 1}"
                )
            if not self.loop:
                return
            pos = {"epoch": pos["epoch"] + 1, "file": 0, "doc": 0, "global_doc": 0, "offset": 0}
            first = False

    def _row_iter(self) -> Iterator[list[int]]:
        need = self.seq_len + 1
        buf: list[_Segment] = []
        buffered = 0
        for seg in self._segments():
            buf.append(seg)
            buffered += len(seg.tokens) - seg.offset
            while buffered >= need:
                row: list[int] = []
                for s in buf:
                    row.extend(s.tokens[s.offset : s.offset + need - len(row)])
                    if len(row) == need:
                        break
                # advance by seq_len tokens: the row's last token starts the next row
                advance = self.seq_len
                while advance:
                    s = buf[0]
                    step = min(advance, len(s.tokens) - s.offset)
                    s.offset += step
                    advance -= step
                    if s.offset == len(s.tokens):
                        buf.pop(0)
                buffered -= self.seq_len
                head = buf[0]  # non-empty: one token of the row is still unconsumed
                self._pos = {
                    "epoch": head.epoch, "file": head.file, "doc": head.doc, "global_doc": head.global_doc,
                    "offset": head.offset,
                }  # fmt: skip
                yield row

    def next_row(self) -> list[int]:
        """The next T+1 tokens; raises StopIteration at the end of the data when loop=False."""
        if self._rows is None:
            self._rows = self._row_iter()
        return next(self._rows)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.tensor([self.next_row() for _ in range(batch_size)], dtype=torch.long)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
