"""The databases include file: read an entry, repoint it, write the file whole.

PgBouncer reads `name = key=value ...` lines (values single-quoted with '' for a
quote, as its loader.c cstr_get_value parses them). A RELOAD that meets a broken
line applies the lines before it and stops, so the file must never be seen half
written: it is replaced by rename, never rewritten in place.

Only the one entry's line changes; every other line (other databases, comments)
is kept byte for byte, and so are the entry's other parameters (pool_size,
pool_mode, ...): the switch moves the destination, not the pool settings.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path

from steps.errors import StepError
from steps.switch.settings import TargetEntry

# Values written unquoted: what PgBouncer's parser and a reader see the same way.
_PLAIN = re.compile(r"^[A-Za-z0-9_.:/@+%-]+$")
_ENTRY = re.compile(r"^\s*([^\s=;#\[%][^\s=]*)\s*=\s*(.*?)\s*$")


class IncludeError(StepError):
    pass


def quote(value: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:
        raise IncludeError("a PgBouncer connection value cannot hold a line break or NUL")
    return value if _PLAIN.match(value) else "'" + value.replace("'", "''") + "'"


def parse_connstr(text: str) -> list[tuple[str, str]]:
    """`host=a port=5432 dbname='x y'` -> [(key, value)], as PgBouncer's loader reads it."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] == " ":
            i += 1
        if i >= n:
            return pairs
        eq = i
        while eq < n and text[eq] not in "= ":
            eq += 1
        key = text[i:eq]
        j = eq
        while j < n and text[j] == " ":
            j += 1
        if not key or j >= n or text[j] != "=":
            raise IncludeError(f"broken connection string near {text[i:i + 20]!r}: expected key=value")
        j += 1
        while j < n and text[j] == " ":
            j += 1
        if j < n and text[j] == "'":
            j += 1
            value = []
            while True:
                if j >= n:
                    raise IncludeError(f"unterminated quote in the value of {key}")
                if text[j] == "'":
                    if j + 1 < n and text[j + 1] == "'":
                        value.append("'")
                        j += 2
                        continue
                    j += 1
                    break
                value.append(text[j])
                j += 1
            val = "".join(value)
        else:
            start = j
            while j < n and text[j] != " ":
                j += 1
            val = text[start:j]
        if not val:
            raise IncludeError(f"empty value for {key}")
        pairs.append((key, val))
        i = j


def format_connstr(pairs: list[tuple[str, str]]) -> str:
    return " ".join(f"{k}={quote(v)}" for k, v in pairs)


def entry_line(name: str, pairs: list[tuple[str, str]]) -> str:
    return f"{name} = {format_connstr(pairs)}"


def _entry(line: str) -> tuple[str, str] | None:
    """(name, connection string) for a database line; None for comments, blanks,
    section headers and directives."""
    m = _ENTRY.match(line)
    return (m.group(1), m.group(2)) if m else None


def find(text: str, name: str) -> list[tuple[int, list[tuple[str, str]]]]:
    """The lines (index, parsed pairs) that define `name`."""
    out = []
    for i, line in enumerate(text.splitlines()):
        e = _entry(line)
        if e and e[0] == name:
            out.append((i, parse_connstr(e[1])))
    return out


def current(text: str, name: str, path: Path | str = "the include file") -> dict[str, str]:
    """The one entry for `name`, as a dict; IncludeError when missing or defined twice."""
    found = find(text, name)
    if not found:
        raise IncludeError(f"{path} has no entry for database {name}: move its [databases] line there "
                           "(the file PgBouncer %includes) so that the switch can repoint it")
    if len(found) > 1:
        raise IncludeError(f"{path} defines database {name} {len(found)} times (lines "
                           f"{', '.join(str(i + 1) for i, _ in found)}): keep one")
    return dict(found[0][1])


def repointed(pairs: list[tuple[str, str]], target: TargetEntry) -> list[tuple[str, str]]:
    """The entry's parameters with host, port, dbname (and user, when given) of the target;
    the others (pool_size, pool_mode, ...) kept in their order."""
    new = {"host": target.host, "port": str(target.port), "dbname": target.dbname}
    if target.user is not None:
        new["user"] = target.user
    out = [(k, new.pop(k)) if k in new else (k, v) for k, v in pairs]
    out += [(k, v) for k, v in new.items() if k not in dict(pairs)]
    return out


def repoint(text: str, name: str, target: TargetEntry) -> str:
    """The whole file with `name`'s line pointing at the target; every other line kept."""
    current(text, name)
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        e = _entry(line)
        if e and e[0] == name:
            ending = line[len(line.rstrip("\r\n")):]
            lines[i] = entry_line(name, repointed(parse_connstr(e[1]), target)) + (ending or "\n")
    return "".join(lines)


def write_atomically(path: Path, text: str) -> None:
    """Replace the file by rename: a reader (PgBouncer's RELOAD) sees the old file or the
    new one, never part of either. The new file keeps the old one's mode and, where we
    may set them, owner and group (PgBouncer may run as another user). A symlink is
    followed: its target is replaced, the link kept."""
    real = Path(os.path.realpath(path))
    st = os.stat(real)
    fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
        try:
            os.chown(tmp, st.st_uid, st.st_gid)
        except PermissionError:
            try:
                os.chown(tmp, -1, st.st_gid)
            except PermissionError:
                pass  # the mode still lets a group or others read it, or it never could
        os.replace(tmp, real)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dirfd = os.open(real.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)  # the rename itself survives a crash
    finally:
        os.close(dirfd)
