"""Selecting parameters by name: exact names or regular expressions prefixed with ``re:``."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence


def name_patterns(params: Sequence[str] | str | None, argname: str = "params") -> list[str] | None:
    """Normalize a ``params`` argument: ``None`` stays ``None`` (the caller's default selection),
    a single pattern becomes a list, an empty or non-list value is rejected."""
    if params is None:
        return None
    if isinstance(params, str):
        params = [params]
    if not isinstance(params, Sequence) or not params:
        raise ValueError(
            f"{argname}={params!r} is invalid: expected None or a non-empty list of parameter names "
            "or 're:<regex>' patterns."
        )
    return list(params)


def match_names(names: Iterable[str], patterns: Sequence[str] | str, argname: str = "params") -> list[str]:
    """Names (in their original order) matched by any pattern; every pattern must match something.

    A pattern is an exact parameter name, or ``"re:<regex>"`` matched with ``re.fullmatch``.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    names = list(names)
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{argname} entry {pattern!r} is invalid: expected a parameter name or 're:<regex>'.")
        if pattern.startswith("re:"):
            try:
                rx = re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(f"{argname} entry {pattern!r} is not a valid regular expression: {err}.") from None
            hits = [n for n in names if rx.fullmatch(n)]
        else:
            hits = [n for n in names if n == pattern]
        if not hits:
            shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
            raise ValueError(f"{argname} entry {pattern!r} matches no parameter; available names: {shown}.")
        chosen.update(hits)
    return [n for n in names if n in chosen]
