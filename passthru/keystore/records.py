"""What the key store takes and returns: its records and Protocols (the per-call side apart from the /key/* side),
free of SQLAlchemy, so the app's modules (auth, key_api, spend, store) use them at run time while the driver loads
only with the store (store.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class KeyInfo:
    """A key as stored, which is everything but the key itself."""

    token: str
    key_name: str
    key_alias: str | None
    created_at: float
    expires: float | None
    blocked: bool
    max_budget: float | None
    spend: float
    rpm_limit: int | None
    allowed_routes: tuple[str, ...] | None  # None: every route
    metadata: Mapping[str, Any]
    tpm_limit: int | None = None
    budget_duration: str | None = None  # LiteLLM's "30d", "1mo": spend goes back to 0 at budget_reset_at
    budget_reset_at: float | None = None
    prompt_tokens: int = 0  # the key's tokens so far, as its calls' answers reported them
    completion_tokens: int = 0
    total_tokens: int = 0
    max_parallel_requests: int | None = None  # its calls in flight at once on each host (limits.py, not the store)

    @property
    def counted(self) -> bool:
        """Whether each call must be decided and charged by the store before it is made (admit, or a lease).

        A key with an rpm_limit, a tpm_limit, a max_budget or an expiry has something for the store to decide on
        every call, on its own clock (leases.py lets a worker ask for a busy key's calls a few at a time). A key with
        none of them has only `blocked`, which a worker may know up to a second late anyway (auth.CACHE_SECONDS): its
        calls skip the per-call write, and their cost reaches its spend with the spend log entries (SpendWriter),
        within about a tenth of a second.
        """
        return (
            self.rpm_limit is not None
            or self.tpm_limit is not None
            or self.max_budget is not None
            or self.expires is not None
        )


@dataclass(frozen=True)
class NewKey:
    """A key to create, already validated; `duration` is seconds from now on the store's clock (None: never ends)."""

    token: str
    key_name: str
    key_alias: str | None = None
    duration: float | None = None
    max_budget: float | None = None
    rpm_limit: int | None = None
    allowed_routes: tuple[str, ...] | None = None
    metadata: Mapping[str, Any] | None = None
    tpm_limit: int | None = None
    budget_duration: str | None = None  # validated (key_fields.budget_duration); the first reset is one from now
    max_parallel_requests: int | None = None


@dataclass(frozen=True)
class Charge:
    """A finished pass-through call, as the spend log writes it and its key is charged (spend.SpendWriter.add)."""

    request_id: str  # the exchange's id: what the caller got in x-request-id
    token: str | None  # the key's token (sha256 hex); the master key's hash for its calls; None on an open route
    route: str  # the configured route path
    status: int
    spend: float  # the call's whole cost: cost_per_request + tokens x prices, or the upstream's response cost
    precharged: float  # what the store already added to the key's spend at admission (counted keys); 0 otherwise
    seconds: float  # from the call's start to its answer's end
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    target: str | None = None
    logged: bool = True  # False (general_settings.disable_spend_logs): the key is charged, no entry is written


@dataclass(frozen=True)
class SpendEntry:
    """One pass-through call as the spend log holds it. Unknown usage is None, not 0."""

    request_id: str  # the entry's own id (spend.entry_id), its primary key: time-ordered, unlike the call's id
    token: str | None  # None: a call on an open route
    route: str
    status: int
    spend: float
    start_time: float
    duration: float
    call_id: str | None = None  # the call's id, as the caller saw it in x-request-id (None when not known)
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    target: str | None = None


@dataclass(frozen=True)
class Tally:
    """What one batch of spend log entries adds to one key: the spend it was not charged at admission, and tokens."""

    spend: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0  # also what its tpm window counts


@dataclass(frozen=True)
class GroupTotal:
    """What the spend log holds for one key, route or model over a range of time (tokens None: none known)."""

    group: str | None  # the key's token, the route or the model; None: no key (open route), or no model known
    spend: float
    calls: int
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None


@dataclass(frozen=True)
class ReportRow(GroupTotal):
    """One day and group of /global/spend/report."""

    day: int = 0  # days since 1970-01-01, UTC


@dataclass(frozen=True)
class Refusal:
    """Why the store refused a call; auth.py turns it into LiteLLM's error."""

    reason: Literal["unknown", "blocked", "expired", "budget", "rpm", "tpm"]
    retry_after: int = 0  # rpm, tpm: seconds until the key's window ends
    spend: float = 0.0
    max_budget: float | None = None


@dataclass(frozen=True)
class Unused:
    """Calls of a key or a route that a worker leased (leases.py) and did not use, to give back to it; and a route's
    calls that a key then refused, which never went upstream."""

    token: str  # the key's token, or the route's path
    calls: int
    amount: float  # what they were charged (a route's: nothing)
    window_start: float  # the rpm window they were counted in: the count goes back only while it lasts
    route: bool = False  # a route's rpm window (windows.py), not a key's


# Fields /key/update may change; "duration" sets a new expiry counted from now, "budget_duration" a new reset time.
UPDATABLE = frozenset({"key_alias", "duration", "max_budget", "spend", "rpm_limit", "tpm_limit", "budget_duration",
                       "allowed_routes", "metadata", "blocked", "max_parallel_requests"})  # fmt: skip
ReportGroup = Literal["api_key", "route", "model"]


class KeyReads(Protocol):
    """What both sides of the store read: a key by its token, whether the store answers, how often keys changed."""

    # How many key changes (create, update, block, delete) this process made through the store: what a worker
    # remembers of keys (auth.RecentKeys) is out of date once it moves, so a change is seen at once by the worker that
    # made it.
    edits: int

    def find(self, token: str) -> KeyInfo | None: ...

    def ping(self) -> None: ...


class RouteCounts(Protocol):
    """Routes' rpm_limit windows (windows.RouteWindows): a call counted one by one (the window's start, when it is
    known, to give the call back in; or why not), or several at once (a lease: the window's start, or None)."""

    def admit(self, route: str, limit: int) -> float | Refusal | None: ...

    def lease(self, route: str, limit: int, calls: int, room: int, hold: float) -> float | None: ...


class CallStore(KeyReads, Protocol):
    """The per-call side: admitting a counted key's call (one by one or in leases), counting a route's calls, and
    writing spend entries."""

    @property
    def routes(self) -> RouteCounts: ...

    def admit(self, token: str, cost: float) -> Refusal | None: ...

    def lease(self, token: str, cost: float, calls: int, room: int, hold: float) -> float | None: ...

    def record(
        self, entries: Sequence[SpendEntry], charges: Mapping[str, Tally] | None = None, unused: Sequence[Unused] = ()
    ) -> None: ...


class KeyAdmin(KeyReads, Protocol):
    """The /key/* side (and `passthru keys`): keys made, changed, listed and deleted, and the spend log read."""

    def create(self, new: NewKey) -> KeyInfo: ...

    def update(self, token: str, changes: Mapping[str, Any]) -> KeyInfo | None: ...

    def delete(self, tokens: Sequence[str]) -> list[str]: ...

    def page(
        self, page: int, size: int, key_alias: str | None = None, alias_contains: str | None = None
    ) -> tuple[list[KeyInfo], int]: ...

    def find_many(self, tokens: Sequence[str]) -> list[KeyInfo]: ...

    def spend_logs(
        self, token: str | None, start: float | None, end: float | None, limit: int, route: str | None = None,
        status: int | None = None,
    ) -> list[SpendEntry]: ...  # fmt: skip

    def spend_entry(self, request_id: str) -> SpendEntry | None: ...

    def spend_report(self, group: ReportGroup, start: float, end: float, limit: int) -> list[ReportRow]: ...

    def spend_totals(self, group: ReportGroup, start: float, end: float, limit: int) -> list[GroupTotal]: ...


class KeyStore(CallStore, KeyAdmin, Protocol):
    """A whole key store (sql.SqlKeyStore): both sides, and closing it."""

    def close(self) -> None: ...


class Admission(Protocol):
    """Admits a counted key's call or counts a route's, by the store or from a lease this worker holds
    (leases.Leases)."""

    def admit(self, info: KeyInfo, cost: float) -> Refusal | None: ...

    def admit_route(self, route: str, limit: int) -> float | Refusal | None: ...

    def give_back_route(self, route: str, window_start: float) -> None: ...


class SpendLog(Protocol):
    """Queues a finished call's spend log entry, written in batches off the request thread (spend.SpendWriter)."""

    def add(self, charge: Charge) -> None: ...


class Opened(Protocol):
    """The store as a worker uses it once opened (store.OpenedStore)."""

    @property
    def keys(self) -> CallStore: ...

    @property
    def admin(self) -> KeyAdmin: ...

    @property
    def leases(self) -> Admission: ...

    @property
    def spend(self) -> SpendLog: ...


class Store(Protocol):
    """The key store of a server process, opened by the first call that needs it (store.LazyStore): what auth,
    health and the key API depend on, so that none of them imports the store's driver."""

    def open(self) -> Opened: ...
