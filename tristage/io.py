"""Small file helpers shared by every stage: atomic writes and JSONL with located errors.

Atomic means write to a temporary file in the same folder, fsync, then rename over the target:
a crash leaves either the old file or the new one, never half of one. `atomic_folder` does the same for a
whole folder (a model checkpoint, a LoRA adapter).

Readers: `read_lines` is the one way input text is read (UTF-8, a byte-order mark skipped, `.gz` transparently), and
every reading problem is a DataError naming the file: missing, a folder, unreadable, not UTF-8 (with the line, found
again in binary only when decoding fails, so good files pay nothing), a corrupt or truncated gzip, a line over a
limit. `parse_json` turns every way json.loads can fail into one too; `read_jsonl` refuses a file with no record.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MAX_LINE_CHARS = 1 << 28  # a JSON record longer than this (256 Mi characters) is refused, not read whole


def check_writable(path: str | os.PathLike, *, folder: bool = False, flag: str | None = None) -> None:
    """Raise UserError naming `path` (and `flag`) unless the output can be written there: a file (or, with
    `folder`, a folder) that may not exist yet. A probe file is created and deleted in the nearest existing folder
    on the way (the folders below it are created by the writer), so a read-only or missing permission, or a file
    where a folder must be, shows before minutes of work instead of after. A disk that fills up later cannot be
    foreseen: the writers below name the path then."""
    p = Path(path)
    what = f"{flag} {p}" if flag else f"{p}"
    if folder and p.exists() and not p.is_dir():
        raise UserError(f"{what}: is a file, not a folder")
    if not folder and p.is_dir():
        raise UserError(f"{what}: is a folder, not a file")
    base = p if folder else p.parent
    near = next(q for q in (base, *base.parents) if q.exists() or q == Path(q.anchor or "."))
    if not near.is_dir():
        raise UserError(f"{what}: cannot write here: {near} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=near, prefix=".tristage-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what}: cannot write in {near}: {e.strerror or e}") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically; an OS error (no permission, a full disk) is a UserError naming the path."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            check_writable(path)  # the precise reason where there is one (a file where a folder must be, ...)
            raise UserError(f"{path}: cannot write: {e.strerror or e}") from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _open_error(path: str, e: OSError) -> DataError:
    """An OS error opening or reading an input, as a DataError naming the file."""
    if isinstance(e, FileNotFoundError):
        return DataError(path, None, "no such file")
    if isinstance(e, IsADirectoryError):
        return DataError(path, None, "is a folder, not a file")
    if isinstance(e, PermissionError):
        return DataError(path, None, "permission denied (cannot read it)")
    return DataError(path, None, f"cannot read: {e.strerror or e}")


def open_text(path: str | os.PathLike):
    """Open a text file for reading as UTF-8 (a leading byte-order mark is skipped), transparently gunzipping `*.gz`.
    A missing file, a folder or an unreadable file is a DataError naming the path. Read it through `read_lines` to
    get every later reading problem (not UTF-8, a damaged gzip) as a located DataError too."""
    path = str(path)
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rt", encoding="utf-8-sig")
        return open(path, encoding="utf-8-sig")
    except OSError as e:
        raise _open_error(path, e) from None


class UserError(ValueError):
    """A user's mistake: a bad flag, a missing or unreadable file, a damaged model folder, a bad record. The CLI
    prints its message as one line, `tristage <command>: <message>`, and exits 2 without a traceback, so the
    message must name what to fix: the flag (`--lr must be > 0 (got 0.0)`), or the file (and line and field where
    there is one). Anything else that escapes a command is an internal failure (exit 1)."""


class DataError(UserError):
    """A bad input record, located by file, line and field: `file:line: field 'x': reason`, the one error of every
    data reader. A parser of one record raises it unlocated (path None: `field 'x': reason`), and the reader that
    knows the file and line locates it with `at`."""

    def __init__(self, path: str | os.PathLike | None, line: int | None, reason: str, field: str | None = None):
        where = "" if path is None else f"{path}" + (f":{line}" if line is not None else "") + ":"
        what = f" field {field!r}:" if field else ""
        super().__init__(f"{where}{what} {reason}".lstrip())
        self.path, self.line, self.field, self.reason = None if path is None else str(path), line, field, reason

    def at(self, path: str | os.PathLike, line: int | None) -> DataError:
        """The same error, located in `path` at `line`."""
        return DataError(path, line, self.reason, self.field)


def _bad_utf8(path: str) -> tuple[int | None, str]:
    """(line, reason) of the first bytes of `path` that are not UTF-8: found again line by line in binary (a newline
    byte is never inside a multi-byte character, so lines decode on their own exactly as the whole does)."""
    i = 0
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as fh:
            for i, raw in enumerate(fh, 1):
                try:
                    raw.decode("utf-8-sig" if i == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    return i, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
    except (OSError, EOFError, zlib.error):  # a damaged gzip stream right after the bad bytes
        return i + 1, "not UTF-8 text (and a damaged gzip stream)"
    return None, "not UTF-8 text"


def read_lines(path: str | os.PathLike, max_chars: int | None = None) -> Iterator[tuple[int, str]]:
    """(line number, line) for each line of a text file opened by `open_text`. Every reading problem is a DataError
    naming the file: missing, a folder, unreadable, bytes that are not UTF-8 (with the line), a corrupt or truncated
    gzip stream, or a line longer than `max_chars` characters (not read into memory whole; None = no limit)."""
    path = str(path)
    i = 0
    with open_text(path) as fh:
        try:
            while line := fh.readline(-1 if max_chars is None else max_chars + 1):
                i += 1
                if max_chars is not None and len(line) > max_chars and not line.endswith("\n"):
                    raise DataError(path, i, f"a line longer than {max_chars:,} characters")
                yield i, line
        except UnicodeDecodeError:
            raise DataError(path, *_bad_utf8(path)) from None
        except (OSError, EOFError, zlib.error) as e:
            if not path.endswith(".gz"):
                raise _open_error(path, e) from None
            raise DataError(path, None, f"not a valid gzip file, or a truncated one (after line {i}: {e})") from None


def parse_json(text: str) -> Any:
    """json.loads, each failure an unlocated DataError (`line` = the line within a multi-line `text`): invalid JSON,
    nesting too deep to parse, an integer too long to convert, or a lone surrogate escape (\\udXXX, not text)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(None, e.lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(None, None, "invalid JSON (nested too deeply)") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise DataError(None, None, f"invalid JSON ({e})") from None
    if "\\ud" in text or "\\uD" in text:  # only such a line can hold a lone surrogate: check it then
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, RecursionError):
            raise DataError(None, None, "invalid JSON (a lone surrogate \\uXXXX escape: not a character)") from None
    return obj


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, object) for each non-blank line (lines read by `read_lines`, at most MAX_LINE_CHARS
    long). A line that is not a JSON object raises DataError at file:line; a file with no record at all (empty or
    blank) raises one naming the file: an empty input is a mistake, not an empty success."""
    n = 0
    for i, line in read_lines(path, MAX_LINE_CHARS):
        if not line.strip():
            continue
        n += 1
        yield i, json_object(line, path, i)
    if not n:
        raise DataError(path, None, "no records (the file is empty)")


def json_object(line: str, path: str | os.PathLike, line_no: int) -> dict[str, Any]:
    """One JSONL line as an object; anything else raises DataError at path:line_no."""
    try:
        obj = parse_json(line)
    except DataError as e:
        raise e.at(path, line_no) from None
    if not isinstance(obj, dict):
        raise DataError(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]] | Iterator[dict[str, Any]]) -> int:
    """Write rows as JSONL atomically; returns the count."""
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _siblings(path: Path, kind: str) -> list[Path]:
    """The `.NAME.{kind}-*` folders beside `path` that atomic_folder leaves while it works, oldest first."""
    prefix = f".{path.name}.{kind}-"
    found = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns)


def recover_folder(path: str | os.PathLike) -> str | None:
    """Finish a folder swap that a kill interrupted, and remove what it left: a complete new folder
    (`.NAME.new-*`) replaces `path`; with none, a moved-aside old one (`.NAME.old-*`) goes back when `path` is
    missing; unfinished temporary folders (`.NAME.tmp-*`) are deleted. Returns a sentence saying what was put back,
    or None when nothing was."""
    path = Path(path)
    if not path.parent.is_dir():
        return None
    note = None
    new, old = _siblings(path, "new"), _siblings(path, "old")
    if new:  # written and fsynced in full before it got this name: the newest checkpoint there is
        if path.exists():
            os.replace(path, Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-")))
        os.replace(new[-1], path)
        note = f"{path}: put back the complete save an interruption left in {new[-1].name}"
    elif old and not path.exists():
        os.replace(old[-1], path)
        note = f"{path}: put back the previous save an interruption left in {old[-1].name}"
    if path.exists():
        for p in _siblings(path, "tmp") + _siblings(path, "new") + _siblings(path, "old"):
            shutil.rmtree(p, ignore_errors=True)
        _fsync_dir(path.parent)
    return note


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path` to write into; when the block ends without error, its files
    are fsynced and it replaces `path`. On any error, KeyboardInterrupt included, the temporary folder is deleted
    and `path` is left as it was; after a good save no temporary folder is left beside it (stale ones from earlier
    interruptions included).

    The swap is renames, each leaving a state `recover_folder` can finish after a kill at any point:
    `.NAME.tmp-*` (being written) -> `.NAME.new-*` (the name says complete: fsynced before it), then `path` ->
    `.NAME.old-*`, `.NAME.new-*` -> `path`, then the old folder is deleted. A kill between the last two renames
    leaves no `path` but a complete new folder (and the old one): recover_folder puts the new one in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    tag = tmp.name.rpartition(".tmp-")[2]  # unique (mkdtemp's), so no stale folder of an earlier run is in the way
    new, old = path.with_name(f".{path.name}.new-{tag}"), path.with_name(f".{path.name}.old-{tag}")
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        os.replace(tmp, new)
        moved = path.exists()
        if moved:
            os.replace(path, old)
        try:
            os.replace(new, path)
        except BaseException:
            if moved and not path.exists():
                os.replace(old, path)
            raise
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(new, ignore_errors=True)
        raise
    for p in _siblings(path, "tmp") + _siblings(path, "new") + _siblings(path, "old"):
        shutil.rmtree(p, ignore_errors=True)
