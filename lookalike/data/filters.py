"""Metadata filters: the ``--where`` language, parsed (never evaluated) into Chroma's ``where`` dict form.

One expression per ``--where``; several are combined with AND::

    camera = "Pixel 7"          label_name != cat          width >= 1000
    split in [train, test]      path not in ["a/1.png"]    size between 1000 and 50000
    tags has beach              (a list field holds the value)
    taken between 2024-01-01 and 2024-06-30   (dates: seconds since 1970, UTC, as stored; both days included)

Values: a quoted string ("..." or '...'), a number, ``true``/``false``, a date ``YYYY-MM-DD`` (read
as its UTC midnight in seconds), or a bare word (a string). Chroma compares numbers only with
``<``/``<=``/``>``/``>=``; a string there is refused with one line. :func:`check_fields` names the
collection's fields when a filter asks for another.

:func:`matches` applies the same dict to one item's metadata (the store's client-side filter), for
every operator the language produces: ``$eq $ne $in $nin $gt $gte $lt $lte $contains $and $or``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from lookalike.errors import InputError

OPERATORS = {"=": "$eq", "==": "$eq", "!=": "$ne", "<": "$lt", "<=": "$lte", ">": "$gt", ">=": "$gte"}
_TOKEN = re.compile(
    r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?P<op><=|>=|==|!=|=|<|>)|(?P<punct>[\[\],])|(?P<word>[^\s\[\],=<>!"']+))"""
)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DAY_END = 86_399  # a date read as an upper bound (<=, between's HIGH) or after (>) means its last second
_FIELD = re.compile(r"^[^\s$][^\s]*$")
HELP = "e.g. --where 'width >= 1000', --where 'camera = \"Pixel 7\"', --where 'split in [train, test]'"


def parse_where(expressions: Sequence[str] | None) -> dict[str, Any] | None:
    """Chroma's ``where`` dict for ``--where`` expressions (AND of them); None for none; InputError naming the fix."""
    clauses = [_parse_one(e) for e in expressions or ()]
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def combine(*wheres: dict[str, Any] | None) -> dict[str, Any] | None:
    """The AND of the filters given (None ones skipped)."""
    parts: list[dict[str, Any]] = []
    for w in wheres:
        if not w:
            continue
        parts.extend(w["$and"] if set(w) == {"$and"} else [w])
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else {"$and": parts}


def fields_of(where: dict[str, Any] | None) -> set[str]:
    """The metadata fields a filter reads."""
    out: set[str] = set()
    for key, cond in (where or {}).items():
        if key in ("$and", "$or"):
            for c in cond:
                out |= fields_of(c)
        else:
            out.add(key)
    return out


def check_fields(where: dict[str, Any] | None, known: Iterable[str], collection: str) -> None:
    """InputError listing the collection's fields when ``where`` names another."""
    have = set(known)
    unknown = sorted(fields_of(where) - have)
    if unknown:
        raise InputError(f"collection {collection!r} has no field {unknown[0]!r}: filter on one of {', '.join(sorted(have))}")


COMPARISONS = ("$eq", "$ne", "$in", "$nin", "$gt", "$gte", "$lt", "$lte", "$contains")


def validate(where: Any) -> None:
    """InputError unless ``where`` is a filter :func:`matches` (and Chroma) can apply: every clause, every operator."""
    if not isinstance(where, dict) or not where:
        raise InputError("a filter is a dict like {'width': {'$gte': 1000}} (Chroma's where form)")
    for key, cond in where.items():
        if key in ("$and", "$or"):
            if not isinstance(cond, list) or not cond:
                raise InputError(f"{key} takes a list of filters")
            for c in cond:
                validate(c)
        elif key.startswith("$"):
            raise InputError(f"unknown filter operator {key!r}: use {' '.join(COMPARISONS)} $and $or")
        elif isinstance(cond, dict):
            for op, value in cond.items():
                if op not in COMPARISONS:
                    raise InputError(f"unknown filter operator {op!r}: use {' '.join(COMPARISONS)} $and $or")
                if op in ("$in", "$nin") and not isinstance(value, list):
                    raise InputError(f"{op} takes a list of values")
                if op in ("$gt", "$gte", "$lt", "$lte") and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                    raise InputError(f"{op} compares numbers only, got {value!r}: filter on a number")


def matches(meta: dict[str, Any], where: dict[str, Any]) -> bool:
    """Whether metadata ``meta`` satisfies a Chroma ``where`` filter (ValueError for an operator it does not know)."""
    for key, cond in where.items():
        if key == "$and":
            ok = all(matches(meta, c) for c in cond)
        elif key == "$or":
            ok = any(matches(meta, c) for c in cond)
        elif key.startswith("$"):
            raise ValueError(key)
        elif isinstance(cond, dict):
            ok = all(_compare(meta.get(key), op, value) for op, value in cond.items())
        else:
            ok = _same(meta.get(key), cond)
        if not ok:
            return False
    return True


def _same(have: Any, want: Any) -> bool:
    # Chroma keeps bools apart from numbers (True is not 1), and compares ints with floats by value
    return have == want and isinstance(have, bool) == isinstance(want, bool)


def _compare(have: Any, op: str, value: Any) -> bool:
    if op == "$eq":
        return _same(have, value)
    if op == "$ne":
        return not _same(have, value)
    if op == "$in":
        return any(_same(have, v) for v in value)
    if op == "$nin":
        return not any(_same(have, v) for v in value)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        if not isinstance(have, (int, float)) or isinstance(have, bool):
            return False  # a missing field or another type never matches a range
        return {"$gt": have > value, "$gte": have >= value, "$lt": have < value, "$lte": have <= value}[op]
    if op == "$contains":  # a list field (tags) holding the value
        return isinstance(have, list) and any(_same(h, value) for h in have)
    raise ValueError(op)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise InputError(f"cannot read --where {text!r} at {text[pos:]!r}: {HELP}")
        kind = next(k for k, v in m.groupdict().items() if v is not None)
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _value(kind: str, text: str) -> Any:
    if kind == "str":
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    if kind != "word":
        raise InputError(f"expected a value, got {text!r}: {HELP}")
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?", text):
        return float(text)
    if _DATE.match(text):
        try:
            return int(datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())
        except ValueError:
            raise InputError(f"{text!r} is not a date (YYYY-MM-DD)") from None
    return text


def _is_date(token: tuple[str, str]) -> bool:
    return token[0] == "word" and bool(_DATE.match(token[1]))


def _number(value: Any, text: str) -> Any:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InputError(f"--where {text!r}: <, <=, >, >= and between compare numbers (or dates), not {value!r}")
    return value


def _parse_one(text: str) -> dict[str, Any]:
    toks = _tokens(text)
    if len(toks) < 3 or toks[0][0] != "word" or not _FIELD.match(toks[0][1]):
        raise InputError(f"cannot read --where {text!r}: write FIELD OPERATOR VALUE, {HELP}")
    field, rest = toks[0][1], toks[1:]
    head = rest[0][1].lower() if rest[0][0] == "word" else rest[0][1]
    if rest[0][0] == "op":
        if len(rest) > 2 and OPERATORS[rest[0][1]] in ("$eq", "$ne") and all(kind == "word" for kind, _ in rest[1:]):
            return {field: {OPERATORS[rest[0][1]]: " ".join(w for _, w in rest[1:])}}  # camera = Pixel 7: words, one string
        if len(rest) != 2:
            raise InputError(f"cannot read --where {text!r}: one value after {rest[0][1]!r} (quote a text with spaces), {HELP}")
        op = OPERATORS[rest[0][1]]
        value = _value(*rest[1])
        if op in ("$lt", "$lte", "$gt", "$gte"):
            value = _number(value, text) + (DAY_END if op in ("$lte", "$gt") and _is_date(rest[1]) else 0)
        return {field: {op: value}}
    if head == "has":
        if len(rest) != 2:
            raise InputError(f"cannot read --where {text!r}: write FIELD has VALUE (one tag; quote one with spaces)")
        return {field: {"$contains": _value(*rest[1])}}
    if head == "between":
        words = rest[1:]
        if len(words) != 3 or words[1][0] != "word" or words[1][1].lower() != "and":
            raise InputError(f"cannot read --where {text!r}: write FIELD between LOW and HIGH")
        low, high = _number(_value(*words[0]), text), _number(_value(*words[2]), text)
        high += DAY_END if _is_date(words[2]) else 0  # a date as the upper end: the whole of that day
        return {"$and": [{field: {"$gte": low}}, {field: {"$lte": high}}]}
    negate = False
    if head == "not" and len(rest) > 1 and rest[1][0] == "word" and rest[1][1].lower() == "in":
        negate, rest = True, rest[1:]
        head = "in"
    if head == "in":
        body = rest[1:]
        if len(body) < 2 or body[0] != ("punct", "[") or body[-1] != ("punct", "]"):
            raise InputError(f"cannot read --where {text!r}: write FIELD in [A, B, ...]")
        values = [_value(*t) for t in body[1:-1] if t != ("punct", ",")]
        if not values:
            raise InputError(f"--where {text!r}: the list is empty")
        return {field: {"$nin" if negate else "$in": values}}
    ops = ", ".join(sorted(set(OPERATORS)))
    raise InputError(f"--where {text!r}: unknown operator {rest[0][1]!r}: use one of {ops}, in, not in, between, has")
