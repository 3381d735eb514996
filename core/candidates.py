"""Candidate generation as declared steps: every channel (fail-open), then the merge (fail-closed).

The same object serves the retrieval service and the offline build (quota tuning, training lists,
evaluation), so what the build measures is what retrieval serves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from core.channels import Channel
from core.filters import Filter, apply_filters, blocked_count
from core.limits import DEFAULT_CANDIDATES
from core.merge import CandidateMerger, MergedCandidates
from core.pipeline import Step, run_steps, run_steps_yielding
from core.types import EMPTY, ChannelResult, RetrievalQuery


@dataclass
class Retrieval:
    """What one query produced; filled in step by step."""
    query: RetrievalQuery
    want: int
    total: int
    quotas: dict[str, int]
    fetch: int | None = None                                  # what each channel is asked for
    results: dict[str, ChannelResult] = field(default_factory=dict)
    candidates: MergedCandidates | None = None
    removed: dict[str, int] = field(default_factory=dict)     # filter name -> items taken out
    failed: list[str] = field(default_factory=list)           # channels that raised (they fail open)
    stage_ms: dict[str, float] = field(default_factory=dict)

    @property
    def skipped(self) -> list[str]:
        """Channels that gave nothing (e.g. cf for a user with no history) or failed."""
        return [c for c, r in self.results.items() if len(r.items) == 0]


class CandidateGenerator:
    def __init__(self, channels: list[Channel], filters: list[Filter], quotas: dict[str, int],
                 merger: CandidateMerger | None = None) -> None:
        self.channels = {c.name: c for c in channels}
        self.filters = filters
        self.quotas = dict(quotas)
        self.merger = merger or CandidateMerger()

    def steps(self, names: list[str] | None = None) -> list[Step[Retrieval]]:
        channels = [self.channels[n] for n in (names or list(self.channels))]
        return [*(Step(f"channel_{c.name}", self._channel_step(c), fail_open=True, reason=c.name)
                  for c in channels),
                Step("merge", self._merge, fail_open=False)]

    def _channel_step(self, channel: Channel):
        def run(r: Retrieval) -> None:
            r.results[channel.name] = EMPTY   # stays empty if the channel fails
            if r.fetch is None:   # once per query: every channel over-fetches by the same amount
                r.fetch = r.want + blocked_count(self.filters, r.query)
            raw = channel.retrieve(r.query, r.fetch)
            r.results[channel.name] = apply_filters(self.filters, raw, r.query, r.removed).head(r.want)
        return run

    def _merge(self, r: Retrieval) -> None:
        r.candidates = self.merger.merge(r.results, r.quotas, r.total)

    def retrieve(self, query: RetrievalQuery, total: int = DEFAULT_CANDIDATES,
                 quotas: dict[str, int] | None = None) -> Retrieval:
        """Seen, excluded and deleted items never return."""
        r = self._retrieval(query, total, quotas)
        return run_steps(self.steps(), r, r.stage_ms, r.failed)

    async def retrieve_yielding(self, query: RetrievalQuery, total: int = DEFAULT_CANDIDATES,
                                quotas: dict[str, int] | None = None) -> Retrieval:
        """retrieve(), yielding to the event loop between its steps (the retrieval service)."""
        r = self._retrieval(query, total, quotas)
        return await run_steps_yielding(self.steps(), r, r.stage_ms, r.failed)

    def _retrieval(self, query: RetrievalQuery, total: int, quotas: dict[str, int] | None) -> Retrieval:
        quotas = dict(self.quotas if not quotas else quotas)
        # Ask each channel for enough to fill the whole list alone if the others come up short.
        want = max(total, max(quotas.values(), default=0))
        return Retrieval(query, want, total, quotas)

    def channel_results(self, query: RetrievalQuery, want: int,
                        names: list[str] | None = None) -> dict[str, ChannelResult]:
        """Each channel's filtered top `want`, without merging (quota tuning, evaluation)."""
        r = Retrieval(query, want, want, self.quotas)
        run_steps(self.steps(names)[:-1], r, r.stage_ms, r.failed)
        return r.results

