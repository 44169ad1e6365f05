"""Polling a live feed and applying what it says (the fleet file's `feeds:`).

A `FeedPoller` fetches its feed (an HTTP GET, or a file read) every `interval_s`,
reads it (gateway.control.feeds.formats) and applies each backend's new figure through
a `FeedTarget` (the control plane: `ControlFeedTarget`). Only figures that changed
since the feed last applied them are applied, so a price set through the admin API
stands until the feed's own price for the backend next changes (the last change wins,
as with the fleet file and the price schedule).

A poll that fails (no answer, an HTTP error, an answer that cannot be read or lacks a
selector's entry) keeps the last good figures, sets `switchyard_feed_up` 0 and says why
in a log line (once per reason); it is retried after 1 s, doubling up to `interval_s`.
With no good poll for `stale_after_s` the feed's backends fall back to their list
figures (`switchyard_feed_stale` 1, a log line) until a poll succeeds again.

Time is injected: `clock` (monotonic seconds) times polls and staleness, `wall_clock`
(seconds since the epoch) says which entries are in force.

Imports the standard library's HTTP client, the control plane and the metrics: no grpc,
no protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from gateway.config import BackendSettings, FeedSelector, FeedSettings
from gateway.control.feeds.formats import FeedError, evaluate, parse, parse_gcp_skus
from gateway.control.plane import Control
from gateway.serving.metrics import GatewayMetrics

log = logging.getLogger("switchyard.control")

MAX_RESPONSE_BYTES = 32 * 1024 * 1024
"""The largest answer a feed may give (one page)."""
MAX_PAGES = 100
"""gcp-billing: the most pages one poll follows (`nextPageToken`)."""
RETRY_BASE_S = 1.0
"""A failed poll is retried after this, doubling with each failure in a row, at most
the feed's `interval_s`."""

Fetch = Callable[[FeedSettings, str | None], Awaitable[bytes]]
"""Fetches a feed's answer (with a page token: that page); FeedError saying why not."""


class FeedTarget(Protocol):
    """What a feed's figures apply to: the control plane, or a test's fake."""

    def covered(self, selector: FeedSelector) -> list[str]:
        """The live backends `selector` covers."""
        ...

    def apply(self, backend: str, value: float | None, source: str) -> None:
        """Puts the feed's figure for `backend` in force; None: its list figure."""
        ...


def where(feed: FeedSettings) -> str:
    """The feed's source for logs: a URL without its query (which may hold a key)."""
    if feed.url is None:
        return str(feed.file)
    parts = urlsplit(feed.url)
    return urlunsplit(parts._replace(query="", fragment=""))


def _headers(feed: FeedSettings) -> dict[str, str]:
    headers = {"Accept": "application/json, text/csv, */*", "User-Agent": "switchyard"}
    if feed.auth_token_file is not None:
        try:
            token = feed.auth_token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise FeedError(f"cannot read auth_token_file {feed.auth_token_file}: {exc}") from exc
        if not token:
            raise FeedError(f"auth_token_file {feed.auth_token_file} is empty")
        if feed.auth_header.lower() == "authorization":
            token = f"Bearer {token}"
        headers[feed.auth_header] = token
    return headers


def _with_page(url: str, page_token: str | None) -> str:
    if page_token is None:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "pageToken"]
    query.append(("pageToken", page_token))
    return urlunsplit(parts._replace(query=urlencode(query)))


def _get(url: str, headers: dict[str, str], timeout_s: float, shown: str) -> bytes:
    request = urllib.request.Request(url, headers=headers)
    # No proxies from the environment: a feed is fetched from where the fleet file says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout_s) as response:
            data: bytes = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise FeedError(f"HTTP {exc.code} {exc.reason} from {shown}") from exc
    except urllib.error.URLError as exc:
        raise FeedError(f"cannot fetch {shown}: {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise FeedError(f"cannot fetch {shown}: {type(exc).__name__}: {exc}") from exc
    if len(data) > MAX_RESPONSE_BYTES:
        raise FeedError(f"{shown} answered more than {MAX_RESPONSE_BYTES} bytes")
    return data


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_RESPONSE_BYTES + 1)
    except OSError as exc:
        raise FeedError(f"cannot read {path}: {exc}") from exc
    if len(data) > MAX_RESPONSE_BYTES:
        raise FeedError(f"{path} is larger than {MAX_RESPONSE_BYTES} bytes")
    return data


async def fetch_feed(feed: FeedSettings, page_token: str | None) -> bytes:
    """The feed's answer: a GET of its URL (with `pageToken` for a page after the first)
    in a thread, within `timeout_s`; or its file's bytes."""
    if feed.file is not None:
        return await asyncio.to_thread(_read, feed.file)
    assert feed.url is not None
    url = _with_page(feed.url, page_token)
    headers = _headers(feed)
    try:
        async with asyncio.timeout(feed.timeout_s):
            return await asyncio.to_thread(_get, url, headers, feed.timeout_s, where(feed))
    except TimeoutError as exc:
        raise FeedError(f"{where(feed)} did not answer within {feed.timeout_s:g} s") from exc


class FeedPoller:
    """Polls one feed and applies its figures (see the module's docstring)."""

    def __init__(
        self,
        feed: FeedSettings,
        target: FeedTarget,
        metrics: GatewayMetrics,
        *,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        fetch: Fetch = fetch_feed,
    ) -> None:
        self.feed = feed
        self._target = target
        self._clock = clock
        self._wall_clock = wall_clock
        self._fetch = fetch
        self._metrics = metrics
        self._gauges = (metrics.feed_up, metrics.feed_last_success, metrics.feed_stale)
        self._source = f"feed {feed.name}"
        self._what = "prices" if feed.sets_prices else "carbon intensities"
        self._reset()

    def start(self) -> None:
        """A fresh start (`run` makes one): nothing applied yet, not stale, the staleness
        counted from now, and the feed's metrics reported from here."""
        self._reset()
        self._metrics.feed_up.labels(self.feed.name).set(0)
        self._metrics.feed_stale.labels(self.feed.name).set(0)

    def _reset(self) -> None:
        self._since_s = self._clock()
        """When the feed last polled well (at first: when the poller started)."""
        self.applied: dict[str, float] = {}
        """Per backend, the figure this feed applied and keeps in force."""
        self.stale = False
        self.failures = 0
        """Failed polls in a row."""
        self.problem: str | None = None
        """Why the last poll failed; None after a good one."""

    def targets(self) -> dict[str, list[FeedSelector]]:
        """Each live backend the feed covers, with its selectors."""
        targets: dict[str, list[FeedSelector]] = {}
        for selector in self.feed.selectors:
            for backend in self._target.covered(selector):
                targets.setdefault(backend, []).append(selector)
        return targets

    async def _pages(self) -> list[bytes]:
        first = await self._fetch(self.feed, None)
        if self.feed.kind != "gcp-billing" or self.feed.url is None:
            return [first]
        pages = [first]
        token = parse_gcp_skus(first).next_page_token
        while token:
            if len(pages) >= MAX_PAGES:
                raise FeedError(f"more than {MAX_PAGES} pages of SKUs; narrow the URL's filter")
            pages.append(await self._fetch(self.feed, token))
            token = parse_gcp_skus(pages[-1]).next_page_token
        return pages

    async def poll(self) -> bool:
        """Fetches, reads and applies the feed once; whether it was good."""
        try:
            pages = await self._pages()
            readings = parse(self.feed.kind, pages)
            evaluation = evaluate(self.feed.kind, readings, self.targets(), self._wall_clock())
            if evaluation.missing:
                raise FeedError("; ".join(evaluation.missing))
        except FeedError as exc:
            self._failed(str(exc))
            return False
        if self.stale:
            log.info("feed %s: polled well again; its %s apply", self.feed.name, self._what)
            self.stale = False
            self._metrics.feed_stale.labels(self.feed.name).set(0)
        elif self.problem is not None:
            log.info("feed %s: polled well again", self.feed.name)
        for backend, value in sorted(evaluation.values.items()):
            if self.applied.get(backend) != value:
                try:
                    self._target.apply(backend, value, self._source)
                except Exception as exc:  # one backend's failure leaves the others applied
                    log.error(
                        "feed %s: %s not applied to %s: %s", self.feed.name, value, backend, exc
                    )
                    continue
                self.applied[backend] = value
        self.failures = 0
        self.problem = None
        self._since_s = self._clock()
        self._metrics.feed_up.labels(self.feed.name).set(1)
        self._metrics.feed_stale.labels(self.feed.name).set(0)
        self._metrics.feed_last_success.labels(self.feed.name).set(self._wall_clock())
        return True

    def _failed(self, why: str) -> None:
        self.failures += 1
        self._metrics.feed_up.labels(self.feed.name).set(0)
        if why != self.problem:
            log.warning(
                "feed %s (%s) keeps the last good %s: %s",
                self.feed.name,
                where(self.feed),
                self._what,
                why,
            )
        self.problem = why

    def check_stale(self) -> bool:
        """Falls back to the list figures once the feed has had no good poll for
        `stale_after_s`; whether it is stale."""
        if self.stale:
            return True
        quiet_s = self._clock() - self._since_s
        if quiet_s < self.feed.stale_after_s:
            return False
        self.stale = True
        self._metrics.feed_stale.labels(self.feed.name).set(1)
        fallen = sorted(self.applied)
        log.warning(
            "feed %s is stale (no good poll for %.0f s, stale_after_s %g): %s fall back to "
            "their list %s (last problem: %s)",
            self.feed.name,
            quiet_s,
            self.feed.stale_after_s,
            ", ".join(fallen) or "its backends",
            "prices" if self.feed.sets_prices else "carbon figures",
            self.problem or "none",
        )
        for backend in fallen:
            try:
                self._target.apply(backend, None, f"{self._source} stale")
            except Exception as exc:
                log.error("feed %s: %s's list figure not applied: %s", self.feed.name, backend, exc)
        self.applied.clear()
        return True

    def delay_s(self) -> float:
        """How long until the next poll: `interval_s`, or the retry's backoff after a
        failure; never past the moment the feed goes stale."""
        delay = self.feed.interval_s
        if self.failures:
            delay = min(delay, RETRY_BASE_S * 2 ** min(self.failures - 1, 30))
        if not self.stale:
            until_stale = self._since_s + self.feed.stale_after_s - self._clock()
            delay = min(delay, max(until_stale, 0.0))
        return delay

    async def run(self, stop: asyncio.Event) -> None:
        """Polls until `stop`; then its metrics go (another gateway may poll it next)."""
        self.start()
        try:
            while not stop.is_set():
                self.check_stale()
                await self.poll()
                self.check_stale()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.delay_s()):
                        await stop.wait()
        finally:
            for gauge in self._gauges:
                with contextlib.suppress(KeyError):
                    gauge.remove(self.feed.name)


class ControlFeedTarget:
    """A feed's figures applied through the control plane: prices with
    `Control.set_price`, carbon intensity with `Control.set_carbon` (both shared, with a
    shared store, as the price schedule's prices are: one gateway polls the feed)."""

    def __init__(self, control: Control, prices: bool) -> None:
        self._control = control
        self._prices = prices

    def _entry(self, backend: str) -> BackendSettings | None:
        """The fleet file's entry of a live backend (a discovered one's: its group's)."""
        for entry in self._control.config.backends:
            if entry.name == backend:
                return entry
        for entry in self._control.config.backends:
            if entry.discovery is not None and backend.startswith(f"{entry.name}-"):
                return entry
        return None

    def covered(self, selector: FeedSelector) -> list[str]:
        names = []
        for name, state in self._control.fleet.backends.items():
            entry = self._entry(name)
            if entry is not None and selector.covers(entry.name, state.hardware_class):
                names.append(name)
        return names

    def apply(self, backend: str, value: float | None, source: str) -> None:
        entry = self._entry(backend)
        if self._prices:
            if value is None:
                listed = self._control.backend(backend).price_usd_per_hour
                value_usd = entry.price_usd_per_hour if entry is not None else listed
                self._control.set_price(backend, value_usd, source)
            else:
                self._control.set_price(backend, value, source, scheduled=True)
            return
        state = self._control.backend(backend)
        if value is None:
            in_file = self._control.fleet_carbon(backend)
            g_per_kwh = state.carbon_g_per_kwh if in_file is None else in_file[0]
            self._control.set_carbon(backend, g_per_kwh, state.power_w, source, listed=True)
        else:
            self._control.set_carbon(backend, value, state.power_w, source)
