"""Batch captioning: many images in, one JSON line per image out, resumable and shardable.

- Inputs are image files, directories (searched recursively for image suffixes) or JSONL manifests of
  {"id", "path"} (a relative path is relative to the manifest). A file's id is its path as given,
  written by `name_id` so that every id is valid UTF-8 (it can be written, hashed and matched again by
  the next run) and two different paths never share an id: a name that holds bytes that are not UTF-8,
  or that already reads as an escaped id, is escaped - each backslash written \\\\, each such byte
  \\xNN (any other lone surrogate \\uNNNN) - and every other name, such as any UTF-8 name without a
  backslash, is its own id. Escaped ids are exactly the strings that hold a backslash and in which
  every backslash starts one of those escapes; a name left as it is never reads so (it would have been
  escaped), and escaping can be undone (`name_from_id`), so the mapping is one-to-one. An id given
  twice for the same file is dropped as a duplicate; one id given to two different files (only
  possible through manifests) is a CaptionInputError. A symbolic link with an image suffix that leads
  to no file gets an error record naming the link and target: code `dangling_symlink` when the target
  is missing, `symlink_loop` when following it loops.
- Sharding: an image belongs to shard (first 8 bytes of sha256(UTF-8 id), big-endian) mod COUNT, so
  shards are disjoint, cover every image, and do not depend on input order or on which machine runs
  them.
- Output: each record is one `write()` of a whole line on an O_APPEND file, then fsync; a killed job
  leaves at most a torn last line (only possible if the OS split that write), which the next run cuts
  off before appending. A rerun skips every id already recorded; `retry_errors` re-runs failed ones
  after rewriting the file (atomically) without their error records, so each id keeps one record.
- The in-process pipeline overlaps three stages: images are decoded and tiled on a thread pool,
  tiles of several images are encoded together by the vision tower, and up to `concurrency` prompts
  wait in the engine, which batches their decoding. Encoded prompts go to the engine only once they
  fill every free place (or no image is left), so that it decodes full batches (`_submit_ready`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import re
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
MANIFEST_SUFFIXES = frozenset({".jsonl", ".ndjson"})
DEFAULT_PROMPT = "Write a one-sentence caption for this image."
SHARD_COUNT_ENV = "TESSERA_SHARD_COUNT"  # with JOB_COMPLETION_INDEX (set by an Indexed Job)
SHARD_INDEX_ENV = "JOB_COMPLETION_INDEX"


class CaptionInputError(ValueError):
    """The inputs or options cannot be used (missing file, malformed manifest, bad shard); the message
    says which and why."""


@dataclass(frozen=True)
class CaptionItem:
    id: str  # stable key: resume and sharding go by it; valid UTF-8, one per path (see name_id)
    path: str  # where the image is read from (a file system name: may hold undecodable bytes)
    problem: str | None = None  # why it cannot be read at all (a broken symlink): its error record's message
    problem_code: str | None = None  # that error record's code (dangling_symlink, symlink_loop)


def escape_undecodable(text: str) -> str:
    """`text` with each byte that was not valid UTF-8 in a file name (Python holds it as a lone
    surrogate, U+DC80..U+DCFF) written as the four characters \\xNN, and any other lone surrogate
    as \\uNNNN; other text (backslashes included) unchanged. For free text that must be written as
    UTF-8 (messages, captions); it is not one-to-one, so ids and paths use `name_id`."""
    if text.isascii():
        return text
    return _escape(text, backslashes=False)


# The escapes of an escaped id: \\ (a backslash), \xNN (an undecodable byte 80..ff, held by Python as
# U+DC80..U+DCFF) and \uNNNN (any other lone surrogate), lowercase hex as name_id writes them.
_ESCAPE = r"\\(?:\\|x[89a-f][0-9a-f]|ud[89a-f][0-9a-f]{2})"
_ESCAPED_ID = re.compile(rf"(?:[^\\]|{_ESCAPE})*")
_ONE_ESCAPE = re.compile(_ESCAPE)


def _reads_as_escaped(text: str) -> bool:
    """Whether `text` holds a backslash and every backslash in it starts an escape."""
    return "\\" in text and _ESCAPED_ID.fullmatch(text) is not None


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def name_id(name: str) -> str:
    """The id of a file name or manifest id: valid UTF-8, and one-to-one (two different names never
    share an id). A name with lone surrogates (bytes that are not UTF-8) or that already reads as an
    escaped id is escaped: each backslash as \\\\, each surrogate U+DC80..U+DCFF as \\xNN (the byte),
    any other as \\uNNNN. Any other name - every UTF-8 name without a backslash, and one whose
    backslashes do not all start such escapes (C:\\images) - is returned unchanged."""
    if not _has_surrogate(name) and not _reads_as_escaped(name):
        return name
    return _escape(name, backslashes=True)


def _escape(text: str, *, backslashes: bool) -> str:
    """Lone surrogates U+DC80..U+DCFF as \\xNN (the undecodable byte), any other as \\uNNNN, and
    with `backslashes` each backslash as \\\\."""
    out = []
    for char in text:
        code = ord(char)
        if char == "\\" and backslashes:
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def name_from_id(item_id: str) -> str:
    """The name whose `name_id` is `item_id` (undecodable bytes back as lone surrogates, as
    os.fsdecode holds them); `os.fsencode` of it is the file system name."""
    if not _reads_as_escaped(item_id):
        return item_id

    def unescape(match: re.Match) -> str:
        escape = match.group()
        if escape == "\\\\":
            return "\\"
        return chr(0xDC00 + int(escape[2:], 16)) if escape[1] == "x" else chr(int(escape[2:], 16))

    return _ONE_ESCAPE.sub(unescape, item_id)


def _broken_link(path: Path) -> tuple[str, str] | None:
    """(error code, message) when `path` is a symbolic link that leads to no file: its target is
    missing (dangling_symlink) or following it loops (symlink_loop); None otherwise."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as error:
        link, target = name_id(str(path)), name_id(os.readlink(path))
        if error.errno == errno.ELOOP:
            return "symlink_loop", (f"{link} is a symbolic link loop: it points to {target}, and following the "
                                    "links leads back round without reaching a file")
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return "dangling_symlink", f"{link} is a symbolic link to {target}, which does not exist"
    return None  # it leads to a file (or cannot be checked here): reading it reports any problem


def _file_item(path: Path) -> CaptionItem:
    name = str(path)
    code, message = _broken_link(path) or (None, None)
    return CaptionItem(name_id(name), name, message, code)


def _wanted_in_directory(path: Path) -> bool:
    """Image files, and broken symbolic links with an image suffix (reported, not skipped)."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    return path.is_file() or _broken_link(path) is not None


def _same_file(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ----- inputs ----------------------------------------------------------------------------------------

def collect_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[CaptionItem], int]:
    """Items of every input in order, and how many duplicates (the same id for the same file, given
    again) were dropped. Raises CaptionInputError for an input that is missing or unusable, and when one
    id is given to two different files (a manifest's "id"s), naming the id, both files and the input."""
    items: list[CaptionItem] = []
    seen: dict[str, CaptionItem] = {}
    duplicates = 0
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = (_file_item(p) for p in sorted(path.rglob("*")) if _wanted_in_directory(p))
        elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
            found = read_manifest(path)
        elif path.is_file():
            found = iter([_file_item(path)])
        elif (broken := _broken_link(path)) is not None:
            raise CaptionInputError(f"input {broken[1]}")
        else:
            raise CaptionInputError(f"input {str(raw)!r} does not exist (expected an image file, a directory or "
                                    "a .jsonl manifest of {\"id\", \"path\"} lines)")
        for item in found:
            first = seen.get(item.id)
            if first is None:
                seen[item.id] = item
                items.append(item)
            elif _same_file(first.path, item.path):
                duplicates += 1
            else:  # keeping one would drop the other image without a word
                raise CaptionInputError(
                    f"id {item.id!r} is given to two different files, {name_id(first.path)!r} and "
                    f"{name_id(item.path)!r} (the second from input {name_id(str(raw))!r}); every image needs "
                    "its own id: give the manifest lines distinct \"id\"s")
    return items, duplicates


def read_manifest(path: Path) -> list[CaptionItem]:
    items = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CaptionInputError(f"{path}: a manifest must be UTF-8 text ({error.reason} at byte {error.start})") from None
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise CaptionInputError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise CaptionInputError(f"{path}:{number}: each line must be a JSON object with a non-empty "
                                    "\"path\" string (and optionally an \"id\")")
        image = Path(entry["path"])
        image = image if image.is_absolute() else path.parent / image
        item_id = entry.get("id", entry["path"])
        if not isinstance(item_id, (str, int)) or item_id == "":
            raise CaptionInputError(f"{path}:{number}: \"id\" must be a non-empty string or an integer")
        items.append(CaptionItem(name_id(str(item_id)), str(image)))
    return items


# ----- sharding --------------------------------------------------------------------------------------

def shard_of(item_id: str, count: int) -> int:
    """The shard (0..count-1) that owns `item_id`: the first 8 bytes of sha256 of its UTF-8 encoding,
    read big-endian, mod `count`; independent of input order, process and machine."""
    digest = hashlib.sha256(item_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise CaptionInputError(f"shard {self.index}/{self.count}: need COUNT >= 1 and 0 <= INDEX < COUNT")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        index, sep, count = text.partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise CaptionInputError(f"shard {text!r}: expected INDEX/COUNT, e.g. 0/4")
        return cls(int(index), int(count))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> "Shard | None":
        """From JOB_COMPLETION_INDEX (Kubernetes Indexed Job) and TESSERA_SHARD_COUNT; None when unset."""
        count = environ.get(SHARD_COUNT_ENV)
        if not count:
            return None
        index = environ.get(SHARD_INDEX_ENV, "0")
        return cls.parse(f"{index}/{count}")

    def owns(self, item_id: str) -> bool:
        return shard_of(item_id, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


# ----- output ----------------------------------------------------------------------------------------

def _is_record(value) -> bool:
    """Whether a parsed JSON line is a caption record: an object with an id and a caption or an error."""
    return isinstance(value, dict) and "id" in value and ("caption" in value or "error" in value)


def read_records(path: Path) -> dict[str, dict]:
    """The last record of each id in an existing output file. Raises CaptionInputError, changing nothing,
    when it is not a regular file or holds a line that is not a caption record (JSON with an id and a
    caption or an error): --out pointing at another file. Then a torn last line (no newline: a record
    whole but for it, or a beginning of one) is cut off so that appending continues on a line boundary
    (its image is captioned again)."""
    if not path.exists():
        return {}
    if not path.is_file():
        raise CaptionInputError(f"--out {path} is not a regular file: the records are appended to a file and read "
                                "back to resume the job")
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    records = {}
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            record = None
        if not _is_record(record):
            raise CaptionInputError(f"{path}:{number} is not a caption record (a JSON line with an id and a caption "
                                    "or an error); is --out pointing at the right file?")
        records[str(record["id"])] = record
    tail = data[end:].strip()
    if tail:  # a last line without its newline: a record cut by a kill (cut off here), or not ours
        try:
            last = json.loads(tail)
            torn = _is_record(last)  # whole but for its newline
        except ValueError:  # not complete JSON (or cut inside a UTF-8 character)
            torn = tail[:5] == b'{"id"'[:len(tail[:5])]
        if not torn:
            line = data.count(b"\n") + 1
            raise CaptionInputError(f"{path}:{line} is not a caption record, whole or cut off by a kill; is --out "
                                    "pointing at the right file?")
    if end < len(data):
        os.truncate(path, end)
    return records


def drop_records(path: Path, ids: set[str]) -> int:
    """Rewrite `path` without the records of `ids` (before they are captioned again), atomically: a
    new file beside it, fsynced, then renamed over it, so a kill leaves the old file or the new one.
    Other lines are kept byte for byte. Returns how many records were dropped."""
    if not ids or not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and str(record.get("id")) in ids:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        temporary = path.with_name(f".{path.name}.rewrite-{os.getpid()}")
        with open(temporary, "wb") as out:
            out.write(b"".join(kept))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)
    return dropped


def _writable(value):
    """`value` with every string made valid UTF-8 (escape_undecodable): a file name that is not UTF-8
    may appear in a path or an error message."""
    if isinstance(value, str):
        return escape_undecodable(value)
    if isinstance(value, dict):
        return {_writable(k): _writable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_writable(v) for v in value]
    return value


class RecordWriter:
    """Appends records, each as one whole-line write followed by fsync. A record's "path" (a file
    system name) is written as its `name_id`, so it is UTF-8 and names one file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict) -> None:
        if isinstance(record.get("path"), str):
            record = {**record, "path": name_id(record["path"])}
        line = (json.dumps(_writable(record), ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fd, line)
        while written < len(line):  # a regular file takes it in one write in practice
            written += os.write(self._fd, line[written:])
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def error_record(item: CaptionItem, code: str, message: str, timings: dict | None = None) -> dict:
    return {"id": item.id, "path": item.path, "error": {"code": code, "message": message},
            "timings": timings or {}}


# ----- the in-process pipeline -----------------------------------------------------------------------

@dataclass(frozen=True)
class CaptionOptions:
    prompt: str = DEFAULT_PROMPT
    pan_and_scan: bool = False
    params: object = None  # lm.sampling.SamplingParams; None = greedy, 64 new tokens
    concurrency: int = 16  # prompts waiting in or decoded by the engine at once
    workers: int = 2  # image decode/preprocess threads
    vision_batch: int = 4  # most tiles per vision-tower forward pass
    limits: object = None  # vision.image.ImageLimits; None = defaults
    kv_budget_mb: int = 1024  # in-process engine's KV cache; fewer slots than `concurrency` if too small
    prefill_chunk: int = 4096  # prompt tokens the engine computes per step (a job wants few, full steps)

    def __post_init__(self) -> None:
        for name in ("concurrency", "workers", "vision_batch", "kv_budget_mb", "prefill_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")


@dataclass
class _Pending:
    item: CaptionItem
    handle: object  # lm.requests.RequestHandle
    num_crops: int
    timings: dict = field(default_factory=dict)


_PRODUCER_DONE = object()


class _Slots:
    """The places for captions in the engine (`concurrency`): taken when a prompt is submitted, given
    back when its caption completes."""

    def __init__(self, count: int):
        self._free = count
        self._changed = threading.Condition()

    @property
    def free(self) -> int:
        with self._changed:
            return self._free

    def wait_free(self, timeout: float) -> bool:
        """Whether a place is free, waiting up to `timeout` seconds for one."""
        with self._changed:
            return self._changed.wait_for(lambda: self._free > 0, timeout)

    def take(self) -> None:
        with self._changed:
            self._free -= 1

    def give_back(self) -> None:
        with self._changed:
            self._free += 1
            self._changed.notify_all()


class LocalCaptioner:
    """A loaded vision-language checkpoint: vision encoder + language model engine in this process."""

    def __init__(self, lm, encoder, options: CaptionOptions):
        from lm.engine import EngineConfig
        from lm.kv_cache import request_budget_bytes
        from lm.prompt import layout_chat
        from vision.pan_and_scan import PanAndScanConfig

        self.lm, self.encoder, self.options = lm, encoder, options
        self._screen = None  # the last engine's head screen (`run`)
        self.pan_and_scan = PanAndScanConfig(enabled=options.pan_and_scan)
        self._layout = layout_chat
        self.params = options.params or default_params()
        self.engine_config = EngineConfig(
            max_seq_len=self._max_seq_len(), max_batch=options.concurrency, max_queue=options.concurrency + 1,
            stop_token_ids=lm.tokenizer.special.stop_ids, kv_budget_bytes=options.kv_budget_mb << 20,
            prefill_chunk=options.prefill_chunk,
        )
        needed = request_budget_bytes(lm.config, self.engine_config.max_seq_len, lm.dtype,
                                      block_size=self.engine_config.block_size, prefill_chunk=options.prefill_chunk)
        if needed > self.engine_config.kv_budget_bytes:
            raise ValueError(f"--kv-budget-mb {options.kv_budget_mb} is too small for one caption of up to "
                             f"{self.engine_config.max_seq_len} tokens computed {options.prefill_chunk} at a time: "
                             f"it needs {-(-needed // (1 << 20))} MiB; raise --kv-budget-mb or lower --prefill-chunk")

    def _max_seq_len(self) -> int:
        """Longest prompt this job can produce (all crops, every tile's wording) plus the new tokens."""
        tiles = 1 + (self.pan_and_scan.max_num_crops if self.options.pan_and_scan else 0)
        text = len(self.lm.tokenizer.encode(self.options.prompt, add_bos=False)) + 64
        return tiles * (self.lm.config.mm_tokens_per_image + 16) + text + self.params.max_new_tokens

    def run(self, items: Sequence[CaptionItem], emit: Callable[[dict], None]) -> None:
        """Caption `items`, calling `emit(record)` from this thread once per item, in completion order.
        Raises CaptionInputError, before any item, when the engine's KV budget cannot be allocated."""
        try:
            engine = self.lm.engine(self.engine_config)
        except ValueError as error:
            raise CaptionInputError(str(error)) from None
        # the head's greedy screen (lm.head_screen) is shared by the engines of one model while one holds
        # it: held here, the next job's engine reuses it instead of building it again (~60-90 ms a job for
        # the tiny VLM's 262,144-row head, ~1 s for the 270M's)
        self._screen = engine.runner.screen
        submitted: queue.Queue = queue.Queue()
        slots = _Slots(self.options.concurrency)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(items, engine, submitted, slots, stop),
                                    name="caption-producer", daemon=True)
        engine.start()
        producer.start()
        inflight: list[_Pending] = []
        producing = True
        try:
            while producing or inflight:
                entries = []
                try:
                    entries.append(submitted.get(timeout=0.01 if inflight else 0.5))
                    while True:
                        entries.append(submitted.get_nowait())
                except queue.Empty:
                    pass
                for entry in entries:
                    if entry is _PRODUCER_DONE:
                        producing = False
                    elif isinstance(entry, BaseException):
                        raise entry
                    elif isinstance(entry, _Pending):
                        inflight.append(entry)
                    else:
                        emit(entry)
                for pending in [p for p in inflight if p.handle.done]:
                    inflight.remove(pending)
                    emit(self._record(pending))
                    slots.give_back()
        finally:
            stop.set()
            engine.stop()
            producer.join()

    def _produce(self, items, engine, submitted: queue.Queue, slots: _Slots, stop) -> None:
        try:
            ready: deque[tuple[object, _Pending]] = deque()  # encoded prompts not yet submitted
            with ThreadPoolExecutor(self.options.workers, thread_name_prefix="caption-preprocess") as pool:
                lookahead = 2 * self.options.workers + self.options.vision_batch
                pending = iter(items)
                futures: deque[tuple[CaptionItem, Future]] = deque()

                def refill() -> None:
                    while len(futures) < lookahead and not stop.is_set():
                        item = next(pending, None)
                        if item is None:
                            return
                        futures.append((item, pool.submit(_prepare, item, self.pan_and_scan, self.options.limits)))

                refill()
                while futures and not stop.is_set():
                    batch = [futures.popleft()]
                    # While the tower waits for the oldest image, the engine may use the cores: the prompts
                    # already encoded take each place that frees up meanwhile.
                    while not batch[0][1].done() and not stop.is_set():
                        _submit_ready(ready, engine, submitted, slots, stop, concurrency=self.options.concurrency,
                                      idle=True)
                        wait_futures([batch[0][1]], timeout=0.05)
                    if stop.is_set():
                        break
                    # Encode together whatever else is already tiled, up to the vision batch.
                    while futures and futures[0][1].done() and _tiles(batch) < self.options.vision_batch:
                        batch.append(futures.popleft())
                    refill()
                    ready.extend(self._encode([(item, fut.result()) for item, fut in batch], submitted))
                    _submit_ready(ready, engine, submitted, slots, stop, concurrency=self.options.concurrency,
                                  last=not futures)
                for _, future in futures:
                    future.cancel()
        except BaseException as error:  # noqa: BLE001 - handed to the consuming thread, which re-raises
            submitted.put(error)
        finally:
            submitted.put(_PRODUCER_DONE)

    def _encode(self, prepared, submitted: queue.Queue) -> list[tuple]:
        """Encode the tiles of `prepared` [(item, (PreprocessedImage or ImageError, seconds))] in one
        vision-tower call: [(GenerationRequest, _Pending without its handle)] per image; an image
        that failed to preprocess goes to `submitted` as its error record."""
        import torch

        from lm.requests import GenerationRequest

        good = []
        for item, (result, seconds) in prepared:
            if hasattr(result, "tiles"):
                good.append((item, result, seconds))
            else:
                submitted.put(error_record(item, result.code, result.message, {"preprocess_s": round(seconds, 4)}))
        if not good:
            return []
        started = time.perf_counter()
        soft_tokens = self.encoder.encode_many([torch.from_numpy(r.tiles) for _, r, _ in good])
        encode_s = time.perf_counter() - started
        total_tiles = sum(r.tiles.shape[0] for _, r, _ in good)
        encoded = []
        for (item, result, seconds), soft in zip(good, soft_tokens):
            tiles = result.tiles.shape[0]
            timings = {"preprocess_s": round(seconds, 4), "encode_s": round(encode_s * tiles / total_tiles, 4)}
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.options.prompt}]}]
            prompt = self._layout(self.lm.tokenizer, messages, [tiles],
                                  tokens_per_tile=self.lm.config.mm_tokens_per_image)
            request = GenerationRequest(prompt.token_ids, self.params, soft_tokens=soft.to(self.lm.device, self.lm.dtype),
                                        image_mask=torch.tensor(prompt.image_mask))
            encoded.append((request, _Pending(item, None, result.num_crops, timings)))
        return encoded

    def _record(self, pending: _Pending) -> dict:
        completion = pending.handle.result()
        timings = dict(pending.timings, first_token_s=round(completion.time_to_first_token_s or 0.0, 4),
                       generate_s=round(completion.total_time_s, 4))
        if completion.finish_reason in ("error", "cancelled"):
            return error_record(pending.item, "generation_failed",
                                completion.error or f"generation {completion.finish_reason}", timings)
        return {"id": pending.item.id, "path": pending.item.path, "caption": completion.text.strip(),
                "num_crops": pending.num_crops, "finish_reason": completion.finish_reason,
                "tokens": {"prompt": completion.prompt_tokens, "generated": completion.completion_tokens},
                "timings": timings}


def _submit_ready(ready: deque, engine, submitted: queue.Queue, slots: _Slots, stop: threading.Event, *,
                  concurrency: int, last: bool = False, idle: bool = False) -> None:
    """Hand encoded prompts [(GenerationRequest, _Pending)] from the left of `ready` to the engine a
    batch at a time: only once they fill every free place, or `concurrency` of them wait (then waiting
    for places), or no image is left to encode (`last`: all of them, waiting for places), or the vision
    tower has nothing to encode yet (`idle`: as many as there are free places, without waiting). A
    prompt the engine refuses becomes its error record.

    The engine decodes each step's rows together, and on a CPU a step costs nearly the same for one
    row as for sixteen, while the vision tower wants the same cores: prompts handed over one vision
    batch at a time kept the engine stepping at four rows or fewer beside the tower (a 16-image job of
    the tiny VLM at 16 new tokens: ~80 engine steps against 17; `tessera bench caption --skip-reference`,
    old and new alternating on a 2-core machine, 1.30-1.52 s against 1.23-1.34 s: BENCHMARKS.md, "Batch
    captioning")."""
    from lm.requests import EngineError

    while ready and not stop.is_set():
        free = slots.free
        fills = free > 0 and len(ready) >= free
        if not (fills or last or len(ready) >= concurrency or (idle and free > 0)):
            return  # encode more first: the next vision batch fills the free places
        if free == 0 and not slots.wait_free(timeout=0.1):
            continue  # (stop is checked again)
        request, pending = ready.popleft()
        slots.take()
        try:
            pending.handle = engine.submit(request)
        except EngineError as error:
            slots.give_back()
            submitted.put(error_record(pending.item, error.code, str(error), pending.timings))
            continue
        submitted.put(pending)


def _prepare(item: CaptionItem, pan_and_scan, limits):
    """Decode and tile one image (on a pool thread): (PreprocessedImage or ImageError, seconds)."""
    from vision.image import ImageError, ImageLimits, load_image
    from vision.preprocess import preprocess

    started = time.perf_counter()
    try:
        result = preprocess(load_image(item.path, limits or ImageLimits()), pan_and_scan)
    except ImageError as error:
        result = error
    except Exception as error:  # noqa: BLE001 - one image's failure is its own record, not the job's
        result = ImageError("preprocess_failed", f"{type(error).__name__}: {error}")
    return result, time.perf_counter() - started


def _tiles(batch) -> int:
    total = 0
    for _, future in batch:
        result = future.result()[0]
        total += result.tiles.shape[0] if hasattr(result, "tiles") else 0
    return total


def default_params():
    from lm.sampling import SamplingParams

    return SamplingParams(max_new_tokens=64)


def load_local_captioner(model: str, options: CaptionOptions, *, device: str = "cpu", dtype=None,
                         quantize: str | None = None) -> LocalCaptioner:
    """Load `model` for captioning; a text-only checkpoint (such as the embedded gemma3-270m) is refused
    with a CaptionInputError before any weights are read."""
    import torch

    from lm.checkpoints import resolve_model
    from lm.runtime import load_language_model
    from service.pipeline import has_vision_tower
    from vision.encoder import EncoderOptions, VisionEncoder

    path = resolve_model(model)
    if not has_vision_tower(path):
        raise CaptionInputError(
            f"model {model!r} ({path}) is text-only: its config.json has no vision_config, so it cannot see "
            "images. Captioning needs a Gemma 3 vision-language checkpoint directory (4B, 12B or 27B, with "
            "the SigLIP tower), e.g. --model /models/gemma-3-4b-it, or --target HOST:PORT of a running gateway"
        )
    dtype = dtype or torch.float32
    lm = load_language_model(str(path), device=device, dtype=dtype, quantize=quantize)
    encoder = VisionEncoder.from_checkpoint(path, EncoderOptions(device=device, dtype=dtype,
                                                                 max_batch=options.vision_batch))
    return LocalCaptioner(lm, encoder, options)


# ----- the job ---------------------------------------------------------------------------------------

@dataclass
class JobSummary:
    inputs: int = 0  # items of this shard
    skipped: int = 0  # already in the output
    duplicates: int = 0  # the same image (same id, same file) given more than once; kept once
    captioned: int = 0
    failed: int = 0
    failures: dict = field(default_factory=dict)  # error code -> count
    generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def processed(self) -> int:
        return self.captioned + self.failed

    def add(self, record: dict) -> None:
        if "error" in record:
            self.failed += 1
            code = record["error"]["code"]
            self.failures[code] = self.failures.get(code, 0) + 1
        else:
            self.captioned += 1
            self.generated_tokens += record["tokens"]["generated"]

    def as_dict(self) -> dict:
        rate = self.processed / self.seconds if self.seconds > 0 else None
        return {"inputs": self.inputs, "skipped": self.skipped, "duplicates": self.duplicates,
                "processed": self.processed, "captioned": self.captioned, "failed": self.failed,
                "failures": dict(sorted(self.failures.items())), "seconds": round(self.seconds, 3),
                "images_per_s": round(rate, 3) if rate else None,
                "generated_tokens_per_s": round(self.generated_tokens / self.seconds, 2) if self.seconds > 0 else None}


def plan_job(items: Iterable[CaptionItem], done: Mapping[str, dict], shard: Shard | None, *,
             retry_errors: bool = False) -> tuple[list[CaptionItem], int, int]:
    """(items left to do, items of this shard, items skipped as already done)."""
    mine = [item for item in items if shard is None or shard.owns(item.id)]

    def finished(item: CaptionItem) -> bool:
        record = done.get(item.id)
        return record is not None and not (retry_errors and "error" in record)

    todo = [item for item in mine if not finished(item)]
    return todo, len(mine), len(mine) - len(todo)


def run_job(captioner, todo: Sequence[CaptionItem], writer: RecordWriter, summary: JobSummary,
            on_record: Callable[[dict], None] | None = None) -> JobSummary:
    started = time.perf_counter()

    def emit(record: dict) -> None:
        writer.append(record)
        summary.add(record)
        if on_record is not None:
            on_record(record)

    try:
        for item in todo:
            if item.problem is not None:  # nothing to read: recorded without the captioner
                emit(error_record(item, item.problem_code or "unreadable", item.problem))
        captioner.run([item for item in todo if item.problem is None], emit)
    finally:
        summary.seconds = time.perf_counter() - started
    return summary
