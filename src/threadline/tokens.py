"""Offline token estimates.

A gateway must never download a tokenizer at run time, and no public tokenizer is exact for
Gemini, DeepSeek or Grok anyway. So we estimate cheaply (pure Python, no vocab file), store the
estimate with each message at write time, and correct the estimate per engine with the usage the
provider reports (`Calibration`).
"""

from __future__ import annotations

PER_MESSAGE_OVERHEAD = 4
IMAGE_TOKENS = 258  # Gemini's flat per-image figure; OpenAI's low-detail cost is 85. Estimate high.


def estimate_text(text: str) -> int:
    """~4 ASCII characters per token, one token per CJK/other wide character (cl100k-like ratios).
    Counted with C-level string operations: every answer is estimated when it is stored, and a
    character loop in Python cost about 50 µs per thousand characters."""
    if not text:
        return 0
    ascii_count = len(text) if text.isascii() else len(text.encode("ascii", "ignore"))
    return -(-ascii_count // 4) + len(text) - ascii_count


def estimate_message(text: str, images: int = 0) -> int:
    return estimate_text(text) + PER_MESSAGE_OVERHEAD + images * IMAGE_TOKENS


class Calibration:
    """Keeps a per-engine ratio of reported to estimated prompt tokens (an EMA, clamped).

    Packing divides its budget by this ratio, so an engine whose tokenizer is denser than our
    estimate gets less history rather than a context-length error.
    """

    def __init__(self) -> None:
        self._ratio: dict[str, float] = {}

    def ratio(self, engine: str) -> float:
        return self._ratio.get(engine, 1.15)  # 15% safety margin until we hear from the provider

    def observe(self, engine: str, estimated: int, reported: int) -> None:
        if estimated <= 0 or reported <= 0:
            return
        r = max(0.5, min(3.0, reported / estimated))
        old = self._ratio.get(engine)
        self._ratio[engine] = r if old is None else 0.7 * old + 0.3 * r
