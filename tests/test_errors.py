"""One error class per meaning: each has its own stable code and status, a class's status matches its
meaning (not-found is 404 everywhere), and code sites raise classes instead of passing codes by hand."""

from __future__ import annotations

import re
from pathlib import Path

import threadline.errors as errors
from threadline.errors import InvalidParamError, NotFoundError, ThreadlineError, UpstreamError

SRC = Path(errors.__file__).resolve().parent


def _classes() -> list[type[ThreadlineError]]:
    out, todo = [], [ThreadlineError]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return out


def test_each_class_has_its_own_code_and_a_status_that_fits_its_meaning():
    classes = [c for c in _classes() if c.__module__ == errors.__name__]
    codes: dict[str, type] = {}
    # The one shared code: Dify's own 404 relayed from a Dify engine means what ours means.
    # And Dify's code for a failed workflow run, relayed as Dify sends it.
    shared = {"not_found": {"NotFoundError", "UpstreamNotFoundError"},
              "invalid_param": {"InvalidParamError", "WorkflowFailedError"}}
    for c in classes:
        assert c.code not in codes or {c.__name__, codes[c.code].__name__} <= shared.get(c.code, set()), \
            f"{c.__name__} and {codes[c.code].__name__} share the code {c.code!r}"
        codes[c.code] = c
        if issubclass(c, NotFoundError):
            assert c.status == 404, c
        if issubclass(c, InvalidParamError):
            assert c.status == 400, c
        if issubclass(c, UpstreamError) and c is not UpstreamError:
            assert c.status in (400, 404, 429, 502, 504), c
    assert len(classes) >= 25


def test_no_code_site_passes_an_error_code_by_hand():
    """Codes live on the classes in errors.py; everywhere else raises the class that means it."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "errors.py" or "server" in path.parts:  # the HTTP surfaces render their own shapes
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(Error|Lost|Truncated|Timeout)\(.*code=\"", line):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert offenders == []
