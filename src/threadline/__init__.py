"""Threadline: one conversation API for every chat engine.

Dify keeps its own conversations; OpenAI-compatible engines and Gemini keep none. Threadline owns
the conversation id and the history, packs it into stateless requests, passes Dify its own id, and
lets a conversation move between engines.
"""

from .api import AsyncThreadline, Conversation, MemoryEntry, Message, Threadline
from .config import AppConfig, EngineConfig, Settings
from .errors import (
    ConfigError,
    ConversationBusyError,
    InvalidParamError,
    NotFoundError,
    RateLimitedError,
    ThreadlineError,
    UpstreamError,
)
from .messages import (
    AnswerReplaced,
    ImagePart,
    ReasoningDelta,
    Reply,
    TextDelta,
    TurnCompleted,
    TurnFailed,
    TurnStarted,
    Usage,
)

__all__ = [
    "AnswerReplaced",
    "AppConfig",
    "AsyncThreadline",
    "ConfigError",
    "Conversation",
    "ConversationBusyError",
    "EngineConfig",
    "ImagePart",
    "InvalidParamError",
    "MemoryEntry",
    "Message",
    "NotFoundError",
    "RateLimitedError",
    "ReasoningDelta",
    "Reply",
    "Settings",
    "TextDelta",
    "Threadline",
    "ThreadlineError",
    "TurnCompleted",
    "TurnFailed",
    "TurnStarted",
    "UpstreamError",
    "Usage",
]
__version__ = "0.1.0"
