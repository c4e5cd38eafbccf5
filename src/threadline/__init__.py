"""Threadline: one conversation API for every chat engine.

Dify keeps its own conversations; OpenAI-compatible engines and Gemini keep none. Threadline owns
the conversation id and the history, packs it into stateless requests, passes Dify its own id, and
lets a conversation move between engines.
"""

from .api import AsyncThreadline, Conversation, MemoryEntry, Message, Threadline
from .compaction import Compaction
from .config import AppConfig, EngineConfig, Settings
from .errors import (
    CompactionUnavailableError,
    ConfigError,
    ConversationBusyError,
    InvalidParamError,
    NotFoundError,
    RateLimitedError,
    ThreadlineError,
    UnsupportedParameterError,
    UpstreamError,
)
from .messages import (
    AgentStep,
    AnswerReplaced,
    FunctionCall,
    FunctionResult,
    GenerationParams,
    ImagePart,
    ReasoningDelta,
    Reply,
    ResponseFormat,
    TextDelta,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
    TurnCompleted,
    TurnFailed,
    TurnStarted,
    Usage,
)

__all__ = [
    "AgentStep",
    "AnswerReplaced",
    "AppConfig",
    "AsyncThreadline",
    "Compaction",
    "CompactionUnavailableError",
    "ConfigError",
    "Conversation",
    "ConversationBusyError",
    "EngineConfig",
    "FunctionCall",
    "FunctionResult",
    "GenerationParams",
    "ImagePart",
    "InvalidParamError",
    "MemoryEntry",
    "Message",
    "NotFoundError",
    "RateLimitedError",
    "ReasoningDelta",
    "Reply",
    "ResponseFormat",
    "Settings",
    "TextDelta",
    "Threadline",
    "ThreadlineError",
    "ToolCallDelta",
    "ToolChoice",
    "ToolSpec",
    "TurnCompleted",
    "TurnFailed",
    "TurnStarted",
    "UnsupportedParameterError",
    "UpstreamError",
    "Usage",
]
__version__ = "0.1.0"
