"""Training data sources, indexed without decoding a single image.

A source is a random-access list of records: `len(source)` and `source.record(i)` (a `Sample`,
or a `PreferencePair` for DPO). Indexing reads each record's text once and keeps only where it
lies (byte offsets in compact arrays), so memory does not grow with the pixels, and any record
can be read again in a DataLoader worker when its micro-batch comes up.

* LLaVA JSON / JSONL (+ image folder): byte offsets of each record in the file.
* Hugging Face parquet shards and arrow folders (`datasets`, memory-mapped; the_cauldron's
  layout of `images` (embedded bytes) + `texts` [{user, assistant}], or LLaVA columns); parquet
  also through `datasets`' streaming mode (`StreamSource`: read in order through a seeded
  shuffle buffer, positions instead of offsets).
* WebDataset tar shards (`.tar` of `KEY.json` + `KEY.jpg|png|...`): read with `tarfile`, whose
  member offsets give random access. The `webdataset` library is not used: its pipelines are
  sequential streams (shard shuffle + shuffle buffer), so the batch order could not be a pure
  function of seed and step, and resuming mid-epoch would mean replaying the stream.

Records ruled out while indexing (unparsable, over MAX_RECORD_BYTES, missing image files; in a
WebDataset shard, a key twice, a member over its limit, and the shard's end when it is cut short)
are left out of the index and reported in `bad`; the rest of the checks (images that do not decode, conversations the template
refuses, too long) happen when a record is encoded.
"""

from __future__ import annotations

import bisect
import codecs
import json
import os
import re
import tarfile
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmkit.data.formats import BadRecordError, Message, Sample, missing_media, record_id, record_to_sample, with_embedded_images
from vlmkit.data.llamafactory import RecordLayout
from vlmkit.data.preference import parse_preference_record
from vlmkit.processing.prompt import IMAGE_PLACEHOLDER

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
FORMATS = ("auto", "llava", "parquet", "arrow", "webdataset")

# The most bytes one record's JSON may take (a JSONL line, a list item, a shard's KEY.json), and
# one image member of a shard. Both are checked before anything is read, so a runaway line or
# member costs nothing; real records and images are far below them (inline base64 images included).
MAX_RECORD_BYTES = 64 << 20
MAX_IMAGE_BYTES = 256 << 20


class DataSourceError(ValueError):
    """A data source that cannot be read at all; the message names the file or shard."""


@dataclass
class BadRecord:
    index: int  # the record's position in its file (for ordering reports)
    record_id: str
    message: str
    missing_files: bool = False


def detect_format(path: Path) -> str:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".json", ".jsonl"):
            return "llava"
        if suffix == ".parquet":
            return "parquet"
        if suffix == ".tar":
            return "webdataset"
        if suffix == ".arrow":
            return "arrow"
        raise DataSourceError(f"{path}: cannot tell the data format from the name; set `format` (one of {', '.join(FORMATS[1:])})")
    names = {p.suffix.lower() for p in path.iterdir()}
    if ".parquet" in names:
        return "parquet"
    if ".tar" in names:
        return "webdataset"
    if ".arrow" in names or (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        return "arrow"
    raise DataSourceError(f"{path}: folder holds no .parquet, .tar or .arrow files; set `format` or point at a data file")


def open_source(path: str | Path, fmt: str = "auto", image_folder: str | Path | None = None, kind: str = "sft",
                check_files: bool = True, allow_empty: bool = False, streaming: bool = False, shuffle_buffer: int = 1000,
                llamafactory=None) -> "Source":
    """Index one source. `kind`: `sft` (samples) or `dpo` (preference pairs, JSON only).
    `llamafactory`: a `config.LlamaFactoryEntry` naming the JSON records' renamed columns and tags."""
    path = Path(path)
    if not path.exists():
        raise DataSourceError(f"data source not found: {path.resolve()}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if kind == "dpo" and fmt != "llava":
        raise DataSourceError(f"{path}: preference (DPO) data must be JSON / JSONL, not {fmt}")
    if llamafactory is not None:
        if fmt != "llava":
            raise DataSourceError(f"{path}: a `llamafactory` entry describes JSON / JSONL records, not {fmt}")
        if llamafactory.ranking != (kind == "dpo"):
            raise DataSourceError(f"{path}: its `llamafactory` entry says ranking: {str(llamafactory.ranking).lower()}, "
                                  f"but the stage's loss is {kind} (preference pairs feed `loss: dpo`, and only they do)")
    if fmt == "llava":
        if path.is_dir():
            raise DataSourceError(f"{path}: a LLaVA source is a JSON / JSONL file, not a folder")
        try:
            layout = RecordLayout(llamafactory) if llamafactory is not None else None
        except ValueError as e:
            raise DataSourceError(f"{path}: {e}") from None
        source = JsonSource(path, image_folder, kind, check_files, layout)
    elif fmt == "webdataset":
        source = TarSource(path)
    elif streaming:
        if fmt != "parquet":
            raise DataSourceError(f"{path}: streaming reads parquet shards, not {fmt}")
        source = StreamSource(path, shuffle_buffer)
    elif fmt in ("parquet", "arrow"):
        source = ArrowSource(path, fmt)
    else:
        raise DataSourceError(f"{path}: unknown format {fmt!r}")
    if len(source) == 0 and not allow_empty:
        why = f" ({len(source.bad)} unusable, e.g. {source.bad[0].message})" if source.bad else ""
        raise DataSourceError(f"{path}: empty source, no usable records{why}")
    return source


class Source:
    path: Path
    bad: list[BadRecord]
    # Read in order through `datasets`' streaming mode (no random access): StreamSource.
    streaming: bool = False
    # Preference pairs without reference log-probs (counted by the sources that read pairs).
    missing_refs: int = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def record(self, i: int):
        raise NotImplementedError

    def files(self) -> list[Path]:
        """The files whose contents make up this source (for the data digest)."""
        return [self.path]

    def record_index(self, i: int) -> int:
        """The position in the file of the i-th usable record (for reports in data order)."""
        return i


# ---- LLaVA JSON / JSONL ------------------------------------------------------------------------

def _json_spans(path: Path):
    """(byte offset, byte length, record index, parsed record or BadRecordError, where: `line N`
    of a JSONL file or `item N` of a JSON list, both 1-based) of every record of a JSON list or
    JSONL file, reading the file once, a chunk at a time (so a 1 GB mix665k.json never sits in
    memory whole)."""
    with open(path, "rb") as f:
        if path.suffix.lower() == ".jsonl":
            offset = index = 0
            for lineno, (line, size) in enumerate(_bounded_lines(f), 1):
                if line is None:  # longer than a record may be: never read whole
                    record = BadRecordError(f"line {lineno}", f"is {size} bytes long, more than the {MAX_RECORD_BYTES} "
                                            "bytes a record may take", str(path))
                    yield offset, size, index, record, f"line {lineno}"
                    index += 1
                elif line.strip():
                    try:
                        record = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
                        record = BadRecordError(f"line {lineno}", f"not valid JSON ({type(e).__name__})", str(path))
                    yield offset, len(line.rstrip(b"\r\n")), index, record, f"line {lineno}"
                    index += 1
                offset += size
            return
        yield from _json_list_spans(_Chunks(f, path))


def _bounded_lines(f):
    """(line, its length in bytes) of a binary file; a line over MAX_RECORD_BYTES is (None, its
    length), read through a block at a time and dropped."""
    while True:
        line = f.readline(MAX_RECORD_BYTES + 1)
        if not line:
            return
        if len(line) <= MAX_RECORD_BYTES or line.endswith(b"\n"):
            yield line, len(line)
            continue
        size = len(line)
        while not line.endswith(b"\n"):
            line = f.readline(1 << 20)
            if not line:
                break
            size += len(line)
        yield None, size


def _nbytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


class _Chunks:
    """A UTF-8 file decoded a chunk at a time: `text` is the part not yet dropped, `base` the byte
    offset of text[0]."""

    SIZE = 8 << 20

    def __init__(self, f, path: Path):
        self.f, self.path = f, path
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.base, self.eof = "", 0, False
        self.more()

    def more(self) -> bool:
        if self.eof:
            return False
        chunk = self.f.read(self.SIZE)
        self.eof = not chunk
        try:
            self.text += self.decoder.decode(chunk, final=self.eof)
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: not valid UTF-8 ({e})") from None
        return True


def _json_list_spans(c: _Chunks):
    decoder = json.JSONDecoder()

    def skip_ws(pos: int) -> int:
        while True:
            pos = _WHITESPACE.match(c.text, pos).end()
            if pos < len(c.text) or not c.more():
                return pos

    pos = skip_ws(0)
    if not c.text.startswith("[", pos):
        raise ValueError(f"{c.path}: expected a JSON list of data records")
    pos = skip_ws(pos + 1)
    index = 0
    mark, mark_bytes = 0, 0  # a character position in c.text and its byte offset in the file
    while not c.text.startswith("]", pos):
        if pos == len(c.text):
            raise ValueError(f"{c.path}: not valid JSON (the list is not closed)")
        while True:
            try:
                record, end = decoder.raw_decode(c.text, pos)
                if end < len(c.text) or c.eof:
                    break
            except (json.JSONDecodeError, RecursionError) as e:
                if len(c.text) - pos > MAX_RECORD_BYTES:  # characters, at least as many bytes
                    raise ValueError(f"{c.path}: record {index} is more than the {MAX_RECORD_BYTES} bytes a record may "
                                     "take (or not valid JSON)") from None
                if not c.more():  # a record cut by the chunk boundary reads whole after more()
                    raise ValueError(f"{c.path}: not valid JSON ({type(e).__name__}: {e})") from None
                continue
            c.more()
        start = mark_bytes + _nbytes(c.text[mark:pos])
        length = _nbytes(c.text[pos:end])
        if length > MAX_RECORD_BYTES:
            record = BadRecordError(record_id(record, index), f"is {length} bytes long, more than the {MAX_RECORD_BYTES} "
                                    "bytes a record may take", str(c.path))
        yield c.base + start, length, index, record, f"item {index + 1}"
        index += 1
        mark, mark_bytes = end, start + length
        pos = skip_ws(end)
        if c.text.startswith(",", pos):
            pos = skip_ws(pos + 1)
        elif not c.text.startswith("]", pos):
            raise ValueError(f"{c.path}: not valid JSON (expected ',' or ']' after record {index - 1})")
        if pos > _Chunks.SIZE:  # forget what is parsed, now and then (not per record: that would copy)
            mark_bytes += _nbytes(c.text[mark:pos])
            c.base += mark_bytes
            c.text = c.text[pos:]
            pos, mark, mark_bytes = 0, 0, 0


_WHITESPACE = re.compile(r"[ \t\r\n]*")


class JsonSource(Source):
    """LLaVA / OpenAI-messages records (or preference records) in a JSON list or JSONL file."""

    def __init__(self, path: Path, image_folder=None, kind: str = "sft", check_files: bool = True, layout: RecordLayout | None = None):
        self.path, self.kind, self.layout = path, kind, layout
        self.root = Path(image_folder) if image_folder else path.parent
        self.offsets, self.lengths, self.indices = array("q"), array("q"), array("q")
        self.bad = []
        self.missing_refs = 0  # preference pairs without reference log-probs
        try:
            for offset, length, index, record, where in _json_spans(path):
                try:
                    if isinstance(record, BadRecordError):
                        raise record
                    item = self._parse(record, index)
                except BadRecordError as e:
                    self.bad.append(BadRecord(index, e.record_id, str(e)))
                    continue
                if check_files:
                    absent = missing_media(item)
                    if absent:
                        self.bad.append(BadRecord(index, item.id, f"record {item.id!r}: {', '.join(absent)} not found "
                                                  f"({where} of {path.name})", missing_files=True))
                        continue
                if kind == "dpo" and item.ref_chosen_logp is None:
                    self.missing_refs += 1
                self.offsets.append(offset)
                self.lengths.append(length)
                self.indices.append(index)
        except FileNotFoundError:
            raise DataSourceError(f"data file not found: {path.resolve()}") from None
        self._file = None
        self._pid = None

    def _parse(self, record, index: int):
        if self.layout is not None:
            record = self.layout.apply(record, record_id(record, index), str(self.path))
        if self.kind == "dpo":
            return parse_preference_record(record, index, self.root, str(self.path))
        return record_to_sample(record, index, self.root, str(self.path))

    def __len__(self) -> int:
        return len(self.offsets)

    def record_index(self, i: int) -> int:
        return self.indices[i]

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}

    def record(self, i: int):
        # One open handle per process: DataLoader workers each open their own.
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        self._file.seek(self.offsets[i])
        record = json.loads(self._file.read(self.lengths[i]))
        return self._parse(record, self.indices[i])


# ---- WebDataset tar shards ------------------------------------------------------------------------

def _shards(path: Path, suffix: str) -> list[Path]:
    shards = sorted(path.glob(f"*{suffix}")) if path.is_dir() else [path]
    if not shards:
        raise DataSourceError(f"{path}: no {suffix} shards in the folder")
    return shards


class TarSource(Source):
    """WebDataset shards: members `KEY.json` (a LLaVA or messages record without image paths)
    and `KEY.jpg` / `KEY.0.png` ... (the record's images, in name order)."""

    def __init__(self, path: Path):
        self.path = path
        self.shards = _shards(path, ".tar")
        self.bad = []
        self.shard_of, self.json_at, self.json_len = array("q"), array("q"), array("q")
        self.image_start = array("q", [0])
        self.image_at, self.image_len = array("q"), array("q")
        self.keys: list[str] = []
        for s, shard in enumerate(self.shards):
            self._index_shard(s, shard)
        self._files: dict[int, object] = {}
        self._pid = None

    def files(self) -> list[Path]:
        return list(self.shards)

    def _index_shard(self, s: int, shard: Path) -> None:
        size = shard.stat().st_size
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        problems: dict[str, str] = {}  # key -> why the record is refused (checked from the headers alone)
        cut = None  # why the shard ends early, if it does
        try:
            with tarfile.open(shard, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > size:
                        raise tarfile.ReadError(f"member {member.name!r} ends at byte {member.offset_data + member.size}, "
                                                f"past the end of the file ({size} bytes)")
                    base = member.name.rsplit("/", 1)[-1]
                    key, dot, ext = base.partition(".")
                    if not dot:
                        continue
                    key = member.name[: len(member.name) - len(base)] + key
                    ext = ext.lower()
                    members = groups.setdefault(key, {})
                    if ext in members:
                        problems.setdefault(key, f"two {key}.{ext} members; which one is the record's is unclear")
                    limit = MAX_RECORD_BYTES if ext == "json" else MAX_IMAGE_BYTES
                    if member.size > limit and (ext == "json" or ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS):
                        problems.setdefault(key, f"member {member.name!r} is {member.size} bytes, more than the {limit} allowed")
                    members[ext] = member
                # tarfile ends its walk quietly at a missing or garbled header; a whole shard ends
                # with a zero block (the end-of-archive marker) where the walk stopped.
                cut = _missing_end_marker(tar, shard, size)
        except tarfile.TarError as e:
            cut = f"truncated or corrupt tar shard ({e})"
        if cut is not None and groups:
            # The last record may have lost members to the cut: it is left out with the rest.
            problems[next(reversed(groups))] = f"may be incomplete: the shard ends early ({cut})"
        for number, (key, members) in enumerate(groups.items()):
            if key in problems:
                self.bad.append(BadRecord(number, key, f"{shard}: record {key!r}: {problems[key]}"))
                continue
            if "json" not in members:
                self.bad.append(BadRecord(number, key, f"{shard}: record {key!r}: no {key}.json member"))
                continue
            images = sorted((ext, m) for ext, m in members.items() if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS)
            self.shard_of.append(s)
            self.json_at.append(members["json"].offset_data)
            self.json_len.append(members["json"].size)
            for _, m in images:
                self.image_at.append(m.offset_data)
                self.image_len.append(m.size)
            self.image_start.append(len(self.image_at))
            self.keys.append(key)
        if cut is not None:
            # Whatever followed the cut is lost, and how many records that was is unknown.
            self.bad.append(BadRecord(len(groups), shard.name, f"{shard}: {cut}; the records after it are lost"))

    def __len__(self) -> int:
        return len(self.json_at)

    def __getstate__(self):
        return {**self.__dict__, "_files": {}, "_pid": None}

    def _read(self, s: int, offset: int, length: int) -> bytes:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self.shards[s], "rb")
        f.seek(offset)
        return f.read(length)

    def record(self, i: int) -> Sample:
        s = self.shard_of[i]
        source = str(self.shards[s])
        try:
            record = json.loads(self._read(s, self.json_at[i], self.json_len[i]))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise BadRecordError(self.keys[i], f"{self.keys[i]}.json is not valid JSON ({type(e).__name__})", source) from None
        images = [self._read(s, self.image_at[j], self.image_len[j]) for j in range(self.image_start[i], self.image_start[i + 1])]
        if not isinstance(record, dict):
            raise BadRecordError(self.keys[i], "record is not a JSON object", source)
        record = {"id": self.keys[i], **record}
        # The images are the shard's members, not paths: placeholders stand in while parsing.
        record = with_embedded_images(record, len(images))
        sample = record_to_sample(record, i, Path("."), source)
        sample.images = images
        return sample


def _missing_end_marker(tar: tarfile.TarFile, shard: Path, size: int) -> str | None:
    """Why the walk over `tar` ended before the end-of-archive marker, or None if it ended there."""
    at = tar.offset  # where the header after the last member is, or would be
    with open(shard, "rb") as f:
        f.seek(at)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
        return None
    if len(block) < tarfile.BLOCKSIZE:
        return f"truncated: ends at byte {size} without the tar end-of-archive marker"
    return f"corrupt tar shard: no valid member header at byte {at}"


# ---- Hugging Face parquet / arrow -----------------------------------------------------------------

IMAGE_COLUMNS = ("images", "image")


class ArrowSource(Source):
    """Parquet shards or an arrow folder through Hugging Face `datasets` (memory-mapped, so rows
    are read on demand). Images stay undecoded bytes until a worker encodes the record."""

    def __init__(self, path: Path, fmt: str):
        import datasets
        import pyarrow.parquet as pq

        self.path, self.bad = path, []
        datasets.disable_progress_bars()
        if fmt == "parquet":
            self.shards = _shards(path, ".parquet")
            rows = []
            for shard in self.shards:
                try:
                    schema = pq.read_schema(shard)
                    rows.append(pq.ParquetFile(shard).metadata.num_rows)
                except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
                    raise DataSourceError(f"{shard}: not a readable parquet shard ({type(e).__name__}: {e})") from None
                self._check_columns(shard, schema.names)
                _check_image_type(shard, schema)
            self.ds = datasets.Dataset.from_parquet([str(s) for s in self.shards], keep_in_memory=False)
            self.ends = list(torch.tensor(rows).cumsum(0).tolist())
        else:
            self.shards = [path]
            self.ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_file(str(path))
            if isinstance(self.ds, datasets.DatasetDict):
                raise DataSourceError(f"{path}: holds several splits ({', '.join(self.ds)}); point at one split's folder")
            self._check_columns(path, self.ds.column_names)
            _check_image_type(path, self.ds.data.schema)
            self.ends = [len(self.ds)]
        self.image_column = next(c for c in IMAGE_COLUMNS if c in self.ds.column_names)
        # Undecoded: {"bytes", "path"} per image, decoded by the processor like any image file.
        self.ds = _undecoded(self.ds, self.image_column)

    def files(self) -> list[Path]:
        return list(self.shards) if self.path.is_dir() or self.path.suffix == ".parquet" else [self.path]

    @staticmethod
    def _check_columns(shard: Path, names: list[str]) -> None:
        if not any(c in names for c in IMAGE_COLUMNS):
            raise DataSourceError(f"{shard}: no image column (expected one of {list(IMAGE_COLUMNS)}; columns: {names})")
        if not {"texts", "conversations", "messages", "instruction"} & set(names):
            raise DataSourceError(f"{shard}: no text column (expected 'texts' (the_cauldron), 'conversations' (LLaVA, sharegpt), "
                                  f"'messages' or 'instruction' (alpaca); columns: {names})")

    def __len__(self) -> int:
        return len(self.ds)

    def where(self, i: int) -> tuple[str, int]:
        s = bisect.bisect_right(self.ends, i)
        return str(self.shards[min(s, len(self.shards) - 1)]), i - (self.ends[s - 1] if s else 0)

    def record(self, i: int) -> Sample:
        shard, local = self.where(i)
        return row_to_sample(self.ds[i], self.image_column, f"#{local}", shard, local)


def _check_image_type(shard: Path, schema) -> None:
    """The image column must hold images (a `datasets` Image feature: {bytes, path} structs), one
    or a list; a plain binary or string column says nothing about what its values are."""
    import pyarrow as pa

    column = next(c for c in IMAGE_COLUMNS if c in schema.names)
    kind = schema.field(column).type
    inner = kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else kind
    if pa.types.is_null(inner):  # no row has an image: text-only records
        return
    if not pa.types.is_struct(inner) or inner.get_field_index("bytes") < 0:
        raise DataSourceError(f"{shard}: column {column!r} holds {kind} values, not images; expected a `datasets` Image "
                              f"column (structs of {{bytes, path}}), one image or a list per row (to convert: "
                              f"ds.cast_column({column!r}, datasets.Image()) or datasets.Sequence(datasets.Image()))")


# Text columns that writers sometimes store as JSON strings rather than nested values.
TEXT_COLUMNS = ("conversations", "messages", "texts")


def row_to_sample(row: dict, image_column: str, default_id: str, source: str, index: int) -> Sample:
    """A parquet / arrow row: the_cauldron's `texts` or LLaVA `conversations` / `messages`
    columns (nested values, or the same as JSON strings), images as embedded bytes."""
    rid = str(row["id"]) if row.get("id") is not None else default_id
    row = dict(row)
    for column in TEXT_COLUMNS:
        if isinstance(row.get(column), str):
            try:
                row[column] = json.loads(row[column])
            except (json.JSONDecodeError, RecursionError) as e:
                raise BadRecordError(rid, f"column {column!r} is a string but not JSON ({type(e).__name__})", source) from None
    value = row[image_column]
    images = value if isinstance(value, list) else [value] if value is not None else []
    blobs = []
    for image in images:
        data = image.get("bytes") if isinstance(image, dict) else None
        if not data:
            what = "has no embedded bytes" if isinstance(image, dict) else f"is a {type(image).__name__}, not an image {{bytes, path}}"
            raise BadRecordError(rid, f"an image of column {image_column!r} {what}", source)
        blobs.append(data)
    if "texts" in row:  # the_cauldron: every image leads the first user turn
        turns = row["texts"] or []
        if not isinstance(turns, list) or not turns:
            raise BadRecordError(rid, "'texts' must be a non-empty list of {user, assistant} turns", source)
        messages = []
        for t, turn in enumerate(turns):
            user, assistant = (turn.get("user"), turn.get("assistant")) if isinstance(turn, dict) else (None, None)
            if not isinstance(user, str) or not isinstance(assistant, str):
                raise BadRecordError(rid, f"texts[{t}] needs string 'user' and 'assistant'", source)
            if t == 0:
                user = IMAGE_PLACEHOLDER * len(blobs) + "\n" + user if blobs else user
            messages += [Message("user", user), Message("assistant", assistant)]
        return Sample(rid, messages, blobs)
    record = {k: v for k, v in row.items() if k != image_column}
    record["id"] = rid
    record = with_embedded_images(record, len(blobs))
    sample = record_to_sample(record, index, Path("."), source)
    sample.images = blobs
    return sample


def _undecoded(ds, column: str):
    """Cast an image column (one image or a list) to undecoded {bytes, path} values."""
    import datasets

    feature = ds.features[column] if ds.features else None
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    if isinstance(feature, (list, datasets.Sequence)) or hasattr(feature, "feature"):
        return ds.cast_column(column, datasets.Sequence(datasets.Image(decode=False)))
    return ds


class StreamSource(Source):
    """Parquet shards through `datasets`' streaming mode: rows come in file order through a
    seeded shuffle buffer, with no arrow cache written and nothing memory-mapped. The stream is
    read in the training process (rows, not pixels), so the order does not depend on the number
    of workers; each epoch of the source reshuffles with the epoch number. There is no random
    access: a resumed run reads the stream again up to its position (I/O, no decoding), and
    under torchrun every rank reads the whole stream and keeps its share."""

    streaming = True

    def __init__(self, path: Path, shuffle_buffer: int = 1000):
        import pyarrow.parquet as pq

        self.path, self.bad, self.buffer = path, [], shuffle_buffer
        self.shards = _shards(path, ".parquet")
        self.n = 0
        for shard in self.shards:
            try:
                schema = pq.read_schema(shard)
                names = schema.names
                self.n += pq.ParquetFile(shard).metadata.num_rows
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
                raise DataSourceError(f"{shard}: not a readable parquet shard ({type(e).__name__}: {e})") from None
            ArrowSource._check_columns(shard, names)
            _check_image_type(shard, schema)
        self.image_column = next(c for c in IMAGE_COLUMNS if c in names)

    def files(self) -> list[Path]:
        return list(self.shards)

    def __len__(self) -> int:
        return self.n

    def stream(self, seed: int, epoch: int):
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.load_dataset("parquet", data_files=[str(s) for s in self.shards], split="train", streaming=True)
        ds = _undecoded(ds, self.image_column).shuffle(seed=seed, buffer_size=self.buffer)
        ds.set_epoch(epoch)
        return iter(ds)

    def record(self, i: int):
        raise TypeError(f"{self.path} is streamed: its rows come from the stream, not by index")

    def row_sample(self, row: dict, position: int) -> Sample:
        return row_to_sample(row, self.image_column, f"#{position}", f"{self.path} (streamed)", position)


class StreamCursor:
    """The rows of a mixture's streamed sources, read in the order the sampler draws them: within
    one epoch of a streamed source its positions come in increasing order (its 'permutation' is
    the stream's own order), and a position lower than the last starts the source's next epoch."""

    def __init__(self, mixture: "Mixture", seed: int, stage: str):
        self.mixture = mixture
        self.seed = seed * 1_000_003 + _stage_salt(stage)
        self.state = {k: {"it": None, "next": 0, "epoch": -1} for k, s in enumerate(mixture.sources) if s.streaming}

    def rows(self, indices: list[int], keep: set[int]) -> dict[int, dict]:
        """Advance every streamed source through `indices` (a global micro-batch); return the rows of `keep`."""
        out = {}
        if not self.state:
            return out
        for g in indices:
            k, p = self.mixture.locate(g)
            st = self.state.get(k)
            if st is None:
                continue
            if st["it"] is None or p < st["next"]:
                st["epoch"] += 1
                st["it"], st["next"] = self.mixture.sources[k].stream(self.seed + k, st["epoch"]), 0
            row = None
            while st["next"] <= p:
                try:
                    row = next(st["it"])
                except StopIteration:
                    raise DataSourceError(f"{self.mixture.sources[k].path}: the stream ended after {st['next']} rows, "
                                          f"but the shards' metadata promised {len(self.mixture.sources[k])}") from None
                st["next"] += 1
            if g in keep:
                out[g] = row
        return out


# ---- mixtures -----------------------------------------------------------------------------------

class Mixture:
    """Several sources as one index space: global index g lies in source k at g - starts[k]."""

    def __init__(self, sources: list[Source], weights: list[float], names: list[str]):
        if any(not (w > 0) for w in weights):
            raise DataSourceError(f"mixture weights must be > 0, got {weights} for {names}")
        self.sources, self.weights, self.names = sources, weights, names
        self.starts = [0]
        for s in sources:
            self.starts.append(self.starts[-1] + len(s))

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, g: int) -> tuple[int, int]:
        k = bisect.bisect_right(self.starts, g) - 1
        return k, g - self.starts[k]

    def record(self, g: int):
        k, i = self.locate(g)
        return self.sources[k].record(i)

    def source_of(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(indices, torch.tensor(self.starts[1:]), right=True)


def _stage_salt(stage: str) -> int:
    return sum(map(ord, stage))


def epoch_order(mixture: Mixture, seed: int, stage: str):
    """Endless epochs of global indices. One source: a fresh permutation each epoch (as always).
    Several: each epoch has as many draws as all sources hold, split between the sources by
    weight (largest remainder, carried over epochs, so the realised shares stay within one draw
    of the weights) and placed in a seeded random order; each draw takes its source's next record
    from that source's own endless sequence of permutations, so every source is seen whole before
    any of its records repeats."""
    salt = _stage_salt(stage)
    streamed = [s.streaming for s in mixture.sources]
    if len(mixture.sources) == 1:
        epoch = 0
        while True:
            if streamed[0]:
                yield torch.arange(len(mixture))  # the stream shuffles itself
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + salt)
                yield torch.randperm(len(mixture), generator=g)
            epoch += 1
    sizes = [len(s) for s in mixture.sources]
    cursors = [0] * len(sizes)
    perms = [None] * len(sizes)
    rounds = [0] * len(sizes)
    total = sum(mixture.weights)
    shares = [w / total for w in mixture.weights]
    drawn = [0] * len(sizes)
    L = len(mixture)
    epoch = 0
    while True:
        ideal = [p * L * (epoch + 1) for p in shares]
        counts = [int(x) - d for x, d in zip(ideal, drawn)]
        by_remainder = sorted(range(len(sizes)), key=lambda k: (-(ideal[k] - int(ideal[k])), k))
        for k in by_remainder[: L - sum(counts)]:
            counts[k] += 1
        drawn = [d + c for d, c in zip(drawn, counts)]
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + salt)
        labels = torch.cat([torch.full((c,), k, dtype=torch.long) for k, c in enumerate(counts)])
        choice = labels[torch.randperm(L, generator=g)]
        order = torch.empty(len(mixture), dtype=torch.long)
        for k, n in enumerate(sizes):
            at = (choice == k).nonzero().flatten()
            taken = []
            need = len(at)
            while need:
                if perms[k] is None or cursors[k] == n:
                    pg = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (k + 1) + rounds[k] + salt)
                    perms[k] = torch.arange(n) if streamed[k] else torch.randperm(n, generator=pg)
                    cursors[k] = 0
                    rounds[k] += 1
                step = min(need, n - cursors[k])
                taken.append(perms[k][cursors[k] : cursors[k] + step])
                cursors[k] += step
                need -= step
            if taken:
                order[at] = torch.cat(taken) + mixture.starts[k]
        yield order
        epoch += 1


def micro_batches(mixture: Mixture, batch_size: int, seed: int, stage: str, min_size: int = 1):
    """Endless global micro-batches (lists of global indices): a pure function of the seed and the
    position, so a resumed run skips exactly what it consumed. An epoch's short tail batch is
    kept unless it has fewer samples than there are ranks to share it."""
    for order in epoch_order(mixture, seed, stage):
        for i in range(0, len(order), batch_size):
            if len(order[i : i + batch_size]) >= min_size:
                yield order[i : i + batch_size].tolist()
