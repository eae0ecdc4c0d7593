"""Class names from the label files datasets and training code ship, for `edge3d export --labels`.

A checkpoint holds weights, not class names, so an artifact exported from one printed class
indices, and `edge3d run` could not score a folder of one folder per class (it matches a folder's
name against the artifact's classes). The names usually sit in a file beside the checkpoint, in one
of a few layouts: one name per line; UCF101's ``classInd.txt`` (``1 ApplyEyeMakeup``, numbered from
1); a CSV of ``id,name`` with a header, as Kinetics' label lists are; a JSON list; or a JSON object
mapping each name to its index (or each index to its name), as many training repositories write.
Every layout is read into the names in output order, and anything ambiguous is refused, naming the
line: a wrong order would label every prediction wrongly without a sign.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

_NUMBERED = re.compile(r"^\s*(\d+)[\s,:;]+(\S.*?)\s*$")  # "1 ApplyEyeMakeup", "0,abseiling", "3: wave"


def read_labels(path: str | Path) -> list[str]:
    """The class names in ``path``, in output order; ValueError naming the problem otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        where = "is a folder" if p.is_dir() else "does not exist"
        raise ValueError(f"labels file {p} {where}; pass a file of class names, one per line (or JSON, or CSV).")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a BOM, as Windows editors write, is not part of a name
    except UnicodeDecodeError as e:
        raise ValueError(f"labels file {p} is not UTF-8 text ({e.reason}); save it as UTF-8.") from e
    if p.suffix.lower() == ".json":
        names = _from_json(text, p)
    elif p.suffix.lower() == ".csv":
        names = _from_rows([(n, row) for n, row in enumerate(csv.reader(io.StringIO(text)), 1)
                            if any(c.strip() for c in row)], p)
    else:
        names = _from_lines(text, p)
    if not names:
        raise ValueError(f"labels file {p} holds no class names; put one name per line.")
    # some label maps quote each name inside the string ('"air drumming"': 1, as Kinetics' classnames JSON of
    # several training repositories does); the quotes are not part of the class's name or its folder's
    return [n[1:-1].strip() if len(n) >= 2 and n[0] == n[-1] == '"' else n for n in names]


def _from_json(text: str, p: Path) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"labels file {p} is not valid JSON ({e.msg}, line {e.lineno}); fix the file.") from e
    if isinstance(data, list):
        if not all(isinstance(v, str) and v.strip() for v in data):
            raise ValueError(f"labels file {p}: a JSON list of labels must hold only non-empty strings; fix the file.")
        return [v.strip() for v in data]
    if isinstance(data, dict) and data:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):  # {"abseiling": 0, ...}
            return _ordered({int(v): str(k) for k, v in data.items()}, len(data), p)
        if all(isinstance(k, str) and k.strip().isdigit() for k in data) and all(isinstance(v, str) for v in data.values()):
            return _ordered({int(k): v for k, v in data.items()}, len(data), p)  # {"0": "abseiling", ...}
    raise ValueError(f"labels file {p}: JSON must be a list of names, or an object mapping each name to its index "
                     "(or each index to its name); fix the file.")


def _from_rows(rows: list[tuple[int, list[str]]], p: Path) -> list[str]:
    """CSV rows (with their line numbers): one name per row, or index and name, after an optional header
    such as ``id,name``."""
    if rows and len(rows[0][1]) >= 2 and not rows[0][1][0].strip().isdigit() and \
            any(r[0].strip().isdigit() for _, r in rows[1:]):
        rows = rows[1:]  # a header over numbered rows
    if rows and all(len(r) >= 2 and r[0].strip().isdigit() for _, r in rows):
        return _numbered([(int(r[0]), r[1].strip(), n) for n, r in rows], p)
    if all(len([c for c in r if c.strip()]) == 1 for _, r in rows):
        return [next(c.strip() for c in r if c.strip()) for _, r in rows]
    raise ValueError(f"labels file {p}: each CSV row must be a name, or an index and a name (id,name); fix the file.")


def _from_lines(text: str, p: Path) -> list[str]:
    """One name per line, or every line numbered (``1 ApplyEyeMakeup``); blank lines are skipped."""
    lines = [(i + 1, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]
    matches = [(_NUMBERED.match(line), n) for n, line in lines]
    if lines and all(m is not None for m, _ in matches):
        return _numbered([(int(m.group(1)), m.group(2), n) for m, n in matches], p)  # type: ignore[union-attr]
    return [line for _, line in lines]


def _numbered(entries: list[tuple[int, str, int]], p: Path) -> list[str]:
    seen: dict[int, int] = {}
    for index, _, line in entries:
        if index in seen:
            raise ValueError(f"labels file {p}: index {index} is on line {seen[index]} and line {line}; give each class "
                             "one index.")
        seen[index] = line
    return _ordered({index: name for index, name, _ in entries}, len(entries), p)


def _ordered(by_index: dict[int, Any], count: int, p: Path) -> list[str]:
    """Names in index order; the indices must run 0..n-1, or 1..n as UCF101's classInd.txt does."""
    if len(by_index) != count:
        raise ValueError(f"labels file {p}: two classes share an index; give each class one index.")
    start = min(by_index)
    missing = sorted(set(range(start, start + count)) - set(by_index)) if start in (0, 1) else [0]
    if missing:
        raise ValueError(f"labels file {p}: the indices run from {start} to {max(by_index)} without {missing[0]}; they "
                         "must count up from 0 (or from 1) with no gap, one per class.")
    names = [str(by_index[start + i]).strip() for i in range(count)]
    if not all(names):
        raise ValueError(f"labels file {p}: class {start + names.index('')} has an empty name; name it.")
    return names
