"""Per-model quirks as data, not `if`s scattered through the engines (the pydantic-ai idea).

A profile says where reasoning comes from, how the system prompt is delivered, which field limits
output, whether `stream_options` may be sent, and which request fields the provider documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import EngineConfig

# The documented request fields Threadline may send (providers.md §1.1, §2): an allow-list, so an
# internal field such as conversation_id can never leak into a provider body.
OPENAI_ALLOWED = frozenset({"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                            "temperature", "top_p", "stop", "seed", "tools", "tool_choice", "parallel_tool_calls",
                            "response_format", "presence_penalty", "frequency_penalty", "reasoning_effort"})
# llama.cpp's server (the local engine): what its /v1/chat/completions honours, checked against the
# embedded server (xllamacpp 2026.10.11549). It ignores unknown fields instead of refusing them, so
# the allow-list is what keeps anything else out.
LLAMA_CPP_ALLOWED = OPENAI_ALLOWED | frozenset({
    "n", "logprobs", "top_logprobs", "logit_bias", "top_k", "min_p", "repeat_penalty"})

# Which caller parameters (GenerationParams fields) each provider takes; any other one a caller sets
# is refused with a 400 naming it. From providers.md: NIM answers 422 to n / penalties (garak's
# suppressed_params) and documents model, messages, stream, max_tokens, temperature, top_p, stop,
# seed, tools, tool_choice; xAI's reasoning models reject penalties; DeepSeek has no seed;
# reasoning_effort only where the provider documents it.
SAMPLING = frozenset({"temperature", "top_p", "max_tokens", "stop"})
COMMON_PARAMS = SAMPLING | {"seed", "presence_penalty", "frequency_penalty", "response_format", "parallel_tool_calls"}
@dataclass(frozen=True)
class Profile:
    name: str
    think_tags: bool = False          # reasoning inside content as <think>…</think> (NIM R1)
    system: str = "system"            # "system" | "developer" | "fold" (into the first user turn)
    max_tokens_field: str = "max_tokens"
    stream_usage: bool = True         # send stream_options.include_usage
    temperature: float | None = None
    replay_reasoning_tool_calls: bool = False  # DeepSeek thinking mode needs it back on tool-call turns
    images: bool = True               # False: a text-only model; turns with images are refused (400)
    allowed: frozenset[str] = field(default=OPENAI_ALLOWED)
    params: frozenset[str] = field(default=COMMON_PARAMS)  # GenerationParams fields forwarded
    tools: bool = True                # caller-defined function tools


NIM_PARAMS = SAMPLING | {"seed"}
PROFILES: dict[str, Profile] = {
    "default": Profile("default"),
    "openai": Profile("openai", max_tokens_field="max_completion_tokens", params=COMMON_PARAMS | {"reasoning_effort"}),
    # NIM-hosted R1: think tags in content; no system role advised; stream_options reported to hang.
    "deepseek-r1": Profile("deepseek-r1", think_tags=True, system="fold", stream_usage=False, temperature=0.6,
                           params=NIM_PARAMS),
    "nim": Profile("nim", stream_usage=False, params=NIM_PARAMS),
    "deepseek-reasoner": Profile("deepseek-reasoner", replay_reasoning_tool_calls=True,
                                 params=SAMPLING | {"presence_penalty", "frequency_penalty", "response_format"}),
    "grok": Profile("grok", params=SAMPLING | {"seed", "response_format", "parallel_tool_calls"}),
    # The embedded llama.cpp server: no vision projector is loaded, so images are refused up front
    # (llama.cpp itself answers 500 "image input is not supported"). 0.2 as the old local engine did.
    # Tools: the small default model's template has no tool format, so tools are refused (400).
    "local": Profile("local", temperature=0.2, images=False, allowed=LLAMA_CPP_ALLOWED, tools=False),
}


def resolve_profile(cfg: EngineConfig) -> Profile:
    if cfg.profile:
        if cfg.profile not in PROFILES:
            from ..errors import ConfigError

            raise ConfigError(f"engine {cfg.name!r}: unknown profile {cfg.profile!r} (known: {sorted(PROFILES)})")
        return PROFILES[cfg.profile]
    model = cfg.model.lower()
    url = cfg.base_url.lower()
    if "nvidia.com" in url:
        return PROFILES["deepseek-r1"] if "deepseek-r1" in model else PROFILES["nim"]
    if "deepseek.com" in url or model.startswith("deepseek-reasoner"):
        return PROFILES["deepseek-reasoner"]
    if "x.ai" in url or model.startswith("grok"):
        return PROFILES["grok"]
    if "api.openai.com" in url:
        return PROFILES["openai"]
    return PROFILES["default"]


class ThinkTagSplitter:
    """Splits `<think>…</think>` out of streamed content, tags possibly cut across chunks.

    R1 chat templates may drop the opening tag, so with `assume_open` text before the first
    `</think>` is reasoning; if the stream ends without any tag, `finish()` reports that everything
    was answer after all, so the caller can move it.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, assume_open: bool = True) -> None:
        self.assume_open = assume_open
        self.mode = "start"  # start | think | answer
        self.saw_tag = False
        self.buf = ""
        self.answer_started = False
        self.reasoning_seen = False

    def feed(self, chunk: str) -> list[tuple[str, str]]:
        """Returns (kind, text) pairs, kind in {"reasoning", "text"}."""
        self.buf += chunk
        out: list[tuple[str, str]] = []
        while self.buf:
            if self.mode == "start":
                s = self.buf.lstrip()
                if not s or (self.OPEN.startswith(s) and s != self.OPEN):
                    break  # whitespace or a partial "<thi": wait for more
                if s.startswith(self.OPEN):
                    self.saw_tag, self.mode, self.buf = True, "think", s[len(self.OPEN):]
                    continue
                self.mode = "think" if self.assume_open else "answer"
                continue
            if self.mode == "think":
                idx = self.buf.find(self.CLOSE)
                if idx >= 0:
                    self._emit(out, "reasoning", self.buf[:idx])
                    self.buf = self.buf[idx + len(self.CLOSE):]
                    self.saw_tag, self.mode = True, "answer"
                    continue
                keep = self._partial_suffix(self.buf, self.CLOSE)
                self._emit(out, "reasoning", self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                break
            self._emit(out, "text", self.buf)
            self.buf = ""
        return out

    def _emit(self, out: list[tuple[str, str]], kind: str, text: str) -> None:
        if kind == "text" and not self.answer_started:
            text = text.lstrip("\n")
            if text:
                self.answer_started = True
        if not text:
            return
        if kind == "reasoning":
            self.reasoning_seen = True
        out.append((kind, text))

    @staticmethod
    def _partial_suffix(buf: str, tag: str) -> int:
        for n in range(min(len(tag) - 1, len(buf)), 0, -1):
            if buf.endswith(tag[:n]):
                return n
        return 0

    def finish(self) -> tuple[list[tuple[str, str]], bool]:
        """Flush; the bool is True when no tag was ever seen and the 'reasoning' was really answer."""
        out: list[tuple[str, str]] = []
        rest, self.buf = self.buf, ""
        self._emit(out, "reasoning" if self.mode == "think" else "text", rest)
        return out, (not self.saw_tag and self.reasoning_seen)
