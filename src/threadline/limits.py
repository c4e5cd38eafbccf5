"""Rate limits and budgets per key and per app, and a per-user limit on concurrent turns.

Configured per app in threadline.toml (`[apps.NAME.limits]`) and per key when it is created
(`threadline keys create --rpm ...`); a turn must pass every limit that applies to it. What a
limit counts:

- `requests_per_minute`: turns admitted in the current UTC minute (a fixed window: the count starts
  over on the minute, and a refusal says how many seconds are left of it);
- `tokens_per_day`: the day's (UTC) total tokens, prompt plus completion, as the engine reported
  them (estimated when it reported none). A turn is admitted while the day's total is under the
  limit, so the turn that crosses it still finishes: a turn's tokens are known only at its end;
- `spend_per_day`: the day's total price of turns priced in the limit's `currency` (the engine's
  `price_*_per_mtok`, or the price a Dify app reports). Other currencies are not converted;
- `concurrent_turns_per_user` (apps only): turns of one user of the app running at once.

A refused turn raises RateLimitedError before anything is stored: no conversation, no message,
and it does not count as a request. Turns refused for another reason after admission (a busy or
unknown conversation) do count, as requests hitting the server.

The counts live in the store (store/counters.py), so every server process on it shares them.

Cost per turn. Without limits on the app or the key: nothing, no read and no write (the app's
limits are in its config; a key's, fixed at creation, are remembered per process, primed by the
server's key lookup). With limits: one small write when the turn is admitted and one when it ends.
Measured with bench/'s upstream and load generator (blocking chat-messages, one process, main and
this code interleaved on a 2-core machine that other jobs shared, so absolute numbers run high):

    c=1, SQLite       p50 latency   server CPU per turn
    main              2.00 ms       1703 us
    no limits         2.09 ms       1721 us
    app rpm           2.47 ms       1999 us
    every limit       2.65 ms       2184 us   (key rpm, tokens, spend; app the same + concurrency)
    c=1, PostgreSQL
    main              8.26 ms       5271 us
    no limits         8.22 ms       5385 us
    app rpm           10.14 ms      6068 us
    every limit       11.22 ms      7051 us

At c=16 on SQLite an admission shares group commits with other turns' writes: 1409 us of CPU per
turn without limits, 1460 with an app rpm limit, 1671 with every limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, RateLimitedError
from .store import Store, new_id
from .store.counters import DAY, MINUTE, Charge, Counters, Refused, ScopeCheck, SlotClaim

if TYPE_CHECKING:
    from .config import AppConfig
    from .messages import Usage

log = logging.getLogger("threadline.limits")

# A running turn's slot lives SLOT_TTL seconds past its process's last renewal (every SLOT_RENEW):
# a crashed process's turns stop counting against their users within that.
SLOT_TTL = 30.0
SLOT_RENEW = 10.0
CONCURRENT_RETRY_AFTER = 1.0
KEY_CACHE_SIZE = 10_000
MAX_INT32 = 2**31 - 1
MAX_TOKENS = 2**62
MAX_SPEND = Decimal(10**9)  # nano-units of it still fit a 64-bit counter
NANO = Decimal(10**9)

LIMIT_FIELDS = ("requests_per_minute", "tokens_per_day", "spend_per_day", "currency", "concurrent_turns_per_user")

_CODES = {"requests_per_minute": "rate_limit_exceeded", "tokens_per_day": "token_quota_exceeded",
          "spend_per_day": "spend_cap_exceeded", "concurrent_turns_per_user": "too_many_requests"}


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None
    spend_per_day: Decimal | None = None
    currency: str = "USD"
    concurrent_turns_per_user: int | None = None

    @property
    def counted(self) -> bool:
        """Whether a turn writes to this scope's counters (the concurrency limit has its own rows)."""
        return self.requests_per_minute is not None or self.budgeted

    @property
    def budgeted(self) -> bool:
        return self.tokens_per_day is not None or self.spend_per_day is not None

    def check(self, scope: str) -> ScopeCheck:
        spend = None if self.spend_per_day is None else nanos(self.spend_per_day)
        return ScopeCheck(scope, self.requests_per_minute, self.tokens_per_day, spend)

    def key_columns(self) -> dict[str, Any]:
        """The api_keys columns that hold a key's limits."""
        return {"limit_rpm": self.requests_per_minute, "limit_tokens_per_day": self.tokens_per_day,
                "limit_spend_per_day": None if self.spend_per_day is None else _plain(self.spend_per_day),
                "limit_currency": self.currency if self.spend_per_day is not None else None}

    @classmethod
    def from_key_row(cls, row: Mapping[str, Any] | None) -> Limits | None:
        """A key's limits from its row; None when it has none (the common case, and the free one)."""
        if not row:
            return None
        rpm, tokens, spend = row.get("limit_rpm"), row.get("limit_tokens_per_day"), row.get("limit_spend_per_day")
        if rpm is None and tokens is None and spend is None:
            return None
        return cls(requests_per_minute=rpm, tokens_per_day=tokens,
                   spend_per_day=None if spend is None else Decimal(spend),
                   currency=row.get("limit_currency") or "USD")

    def describe(self) -> str:
        parts = []
        if self.requests_per_minute is not None:
            parts.append(f"{self.requests_per_minute} requests/min")
        if self.tokens_per_day is not None:
            parts.append(f"{self.tokens_per_day} tokens/day")
        if self.spend_per_day is not None:
            parts.append(f"{_plain(self.spend_per_day)} {self.currency}/day")
        if self.concurrent_turns_per_user is not None:
            parts.append(f"{self.concurrent_turns_per_user} concurrent turns/user")
        return ", ".join(parts) or "none"


def nanos(amount: Decimal) -> int:
    """An amount in nano-units, rounded up: a cap is never passed by rounding."""
    return int((amount * NANO).to_integral_value(rounding=ROUND_CEILING))


def _plain(d: Decimal) -> str:
    return format(d.normalize(), "f")


def _whole(value: Any, name: str, where: str, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {name} must be a whole number of at least 1, got {value!r} "
                          "(leave it out for no limit)")
    if value > top:
        raise ConfigError(f"{where}: {name} must be at most {top}, got {value}")
    return value


def parse_limits(raw: Any, where: str, *, concurrency: bool = True) -> Limits | None:
    """Validate a limits table (`[apps.NAME.limits]`, or a key's flags); None when it sets no limit."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table of limits ({', '.join(LIMIT_FIELDS)})")
    allowed = set(LIMIT_FIELDS) if concurrency else set(LIMIT_FIELDS) - {"concurrent_turns_per_user"}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {', '.join(sorted(allowed))}")
    rpm = raw.get("requests_per_minute")
    tokens = raw.get("tokens_per_day")
    slots = raw.get("concurrent_turns_per_user")
    spend_raw = raw.get("spend_per_day")
    spend: Decimal | None = None
    if spend_raw is not None:
        try:
            if isinstance(spend_raw, bool) or not isinstance(spend_raw, int | float | str | Decimal):
                raise InvalidOperation
            spend = Decimal(str(spend_raw).strip())
        except InvalidOperation:
            raise ConfigError(f"{where}: spend_per_day must be a number, got {spend_raw!r}") from None
        if not spend.is_finite() or spend <= 0:
            raise ConfigError(f"{where}: spend_per_day must be more than 0, got {spend_raw!r} "
                              "(leave it out for no limit)")
        if spend > MAX_SPEND:
            raise ConfigError(f"{where}: spend_per_day must be at most {MAX_SPEND}, got {spend_raw!r}")
    currency = raw.get("currency", "USD")
    if not isinstance(currency, str) or not currency.strip() or len(currency.strip()) > 16:
        raise ConfigError(f"{where}: currency must be a currency code such as \"USD\", got {currency!r}")
    limits = Limits(
        requests_per_minute=None if rpm is None else _whole(rpm, "requests_per_minute", where, MAX_INT32),
        tokens_per_day=None if tokens is None else _whole(tokens, "tokens_per_day", where, MAX_TOKENS),
        spend_per_day=spend,
        currency=currency.strip(),
        concurrent_turns_per_user=None if slots is None else _whole(slots, "concurrent_turns_per_user", where,
                                                                    MAX_INT32),
    )
    if limits.counted or limits.concurrent_turns_per_user is not None:
        return limits
    return None


class Ticket:
    """An admitted turn: the scopes it counted against and the slot it holds, until it is settled."""

    __slots__ = ("scopes", "settled", "slot")

    def __init__(self, scopes: list[tuple[str, Limits]], slot: SlotClaim | None) -> None:
        self.scopes = scopes
        self.slot = slot
        self.settled = False


_UNKNOWN: Any = object()


class Limiter:
    def __init__(self, store: Store) -> None:
        self.counters = Counters(store)
        self._keys: dict[str, Limits | None] = {}
        self._slots: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None

    # ---- key limits ---------------------------------------------------------------------------------

    def remember_key(self, key_id: str, limits: Limits | None) -> None:
        """A key's limits as just read from the store (the server's key lookup passes them on, so a
        turn through the server never reads them itself). They never change after creation."""
        if len(self._keys) >= KEY_CACHE_SIZE and key_id not in self._keys:
            self._keys.clear()
        self._keys[key_id] = limits

    async def _key_limits(self, key_id: str) -> Limits | None:
        limits: Limits | None = self._keys.get(key_id, _UNKNOWN)
        if limits is _UNKNOWN:
            limits = Limits.from_key_row(await self.counters.key_limits(key_id))
            self.remember_key(key_id, limits)
        return limits

    # ---- admission and settlement ---------------------------------------------------------------------

    async def admit(self, app: AppConfig, user: str, key_id: str | None) -> Ticket | None:
        """Count the turn against its key's and app's limits and take a slot for its user, or raise
        RateLimitedError having written nothing. None when no limit applies."""
        key = self._keys.get(key_id, _UNKNOWN) if key_id is not None else None
        if key is _UNKNOWN:
            key = await self._key_limits(key_id)  # type: ignore[arg-type]
        app_limits = app.limits
        if key is None and app_limits is None:
            return None
        scopes: list[tuple[str, Limits]] = []
        if key is not None and key.counted:
            scopes.append((f"key:{key_id}", key))
        if app_limits is not None and app_limits.counted:
            scopes.append((f"app:{app.name}", app_limits))
        now = time.time()
        slot = None
        if app_limits is not None and app_limits.concurrent_turns_per_user is not None:
            slot = SlotClaim(new_id(), app.name, user, app_limits.concurrent_turns_per_user, now + SLOT_TTL)
        if not scopes and slot is None:
            return None
        refused = await self.counters.admit([lim.check(scope) for scope, lim in scopes], slot, now)
        if refused is not None:
            raise _refusal(refused, scopes, app, now)
        if slot is not None:
            self._slots.add(slot.id)
            if self._renewer is None or self._renewer.done():
                self._renewer = asyncio.get_running_loop().create_task(self._renew())
        return Ticket(scopes, slot)

    def settle(self, ticket: Ticket, usage: Usage | None = None, price: Mapping[str, Any] | None = None) -> (
            Awaitable[None] | None):
        """Charge a finished turn's tokens and spend and free its slot (no usage: just free it). The
        write is queued now; await what this returns (None when there is nothing to write)."""
        if ticket.settled:
            return None
        ticket.settled = True
        if ticket.slot is not None:
            self._slots.discard(ticket.slot.id)
        charges = []
        if usage is not None:
            spent = _spent(price)
            for scope, lim in ticket.scopes:
                if lim.budgeted:
                    spend = spent[1] if spent is not None and spent[0] == lim.currency else 0
                    if usage.total_tokens or spend:
                        charges.append(Charge(scope, max(0, int(usage.total_tokens)), spend))
        if not charges and ticket.slot is None:
            return None
        try:
            return self._quietly(self.counters.settle(charges, ticket.slot, time.time()))
        except Exception as exc:  # accounting must never fail the turn it accounts for
            log.error("usage accounting failed: %s", type(exc).__name__)
            return None

    @staticmethod
    async def _quietly(pending: Awaitable[None]) -> None:
        try:
            await pending
        except Exception as exc:
            log.error("usage accounting failed: %s", type(exc).__name__)

    async def _renew(self) -> None:
        while self._slots:
            await asyncio.sleep(SLOT_RENEW)
            try:
                await self.counters.renew(list(self._slots), time.time() + SLOT_TTL)
            except Exception as exc:
                log.warning("renewing running-turn slots failed: %s", type(exc).__name__)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()


def _spent(price: Mapping[str, Any] | None) -> tuple[str, int] | None:
    if not price:
        return None
    try:
        amount = Decimal(str(price.get("total_price") or "0"))
    except InvalidOperation:
        return None
    if not amount.is_finite() or amount <= 0:
        return None
    return str(price.get("currency") or ""), nanos(amount)


def _wait(seconds: float) -> str:
    seconds = max(1, math.ceil(seconds))
    if seconds < 120:
        return f"{seconds} s"
    hours, minutes = divmod(math.ceil(seconds / 60), 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def _refusal(refused: Refused, scopes: list[tuple[str, Limits]], app: AppConfig, now: float) -> RateLimitedError:
    if refused.index < 0:
        n = app.limits.concurrent_turns_per_user if app.limits else 0
        return RateLimitedError(
            f"Too many turns at once: this user already has {n} turn{'s' if n != 1 else ''} running in app "
            f"{app.name!r}, the most it allows. Retry when one ends.",
            limit=refused.limit, scope="app", code=_CODES[refused.limit], retry_after=CONCURRENT_RETRY_AFTER)
    scope, lim = scopes[refused.index]
    kind = scope.split(":", 1)[0]
    whose = "this key" if kind == "key" else f"app {app.name!r}"
    if refused.limit == "requests_per_minute":
        wait = MINUTE - now % MINUTE
        message = (f"Rate limit reached: {whose} allows {lim.requests_per_minute} requests per minute. "
                   f"Retry in {_wait(wait)}.")
    else:
        wait = DAY - now % DAY
        if refused.limit == "tokens_per_day":
            message = f"Token quota used up: {whose} allows {lim.tokens_per_day} tokens per day (UTC)."
        else:
            message = (f"Spend cap reached: {whose} allows {_plain(lim.spend_per_day or Decimal(0))} "
                       f"{lim.currency} per day (UTC).")
        message += f" It resets at 00:00 UTC, in {_wait(wait)}."
    return RateLimitedError(message, limit=refused.limit, scope=kind, code=_CODES[refused.limit], retry_after=wait)
