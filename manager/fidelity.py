"""How faithfully one agent's model calls became training rows, and the batch report summed over agents."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Fidelity:
    """Counts for one agent (or, merged, for a batch); every count is a plain sum, so merging adds them.

    calls: model calls given; calls_used: calls whose tokens entered the chaining.
    sampled_tokens: completion tokens of the used calls; trainable_tokens: env_mask 1 tokens in the rows;
    dropped_tokens: sampled tokens trained in no row (sampled - trainable).
    clean_joins: calls that extended a chain exactly; realigned_joins / forked_joins: calls that did not and were
    realigned into the one row / started a new row.
    calls_without_ids: answered calls the server sent no token ids for; ids_set_aside: those of them whose ids it did
    send but which disagree with its usage count (vLLM before PR #29074 skipping stream chunks a parser swallowed: the
    ids have holes), see the call's ``ids_problem``; inexact_calls: calls without ids rebuilt with the caller's
    tokenizer (the rest were skipped). retries_skipped: attempts at a request not used (superseded by a
    client retry, or a second sample the agent did not go on with);
    failed_calls: calls without a usable answer. truncated: rows whose last completion did not end in eos.
    missing_logprobs: trainable tokens without a server logprob (their row's logprobs is None);
    logprobs_set_aside: used calls whose logprobs the server sent, but not one per completion id (ignored).
    rows: rows built; empty_rows: safe empty rows substituted because no call was usable; agents: agents counted.
    """

    calls: int = 0
    calls_used: int = 0
    sampled_tokens: int = 0
    trainable_tokens: int = 0
    dropped_tokens: int = 0
    clean_joins: int = 0
    realigned_joins: int = 0
    forked_joins: int = 0
    calls_without_ids: int = 0
    ids_set_aside: int = 0
    inexact_calls: int = 0
    retries_skipped: int = 0
    failed_calls: int = 0
    truncated: int = 0
    missing_logprobs: int = 0
    logprobs_set_aside: int = 0
    rows: int = 0
    empty_rows: int = 0
    agents: int = 1

    @property
    def coverage(self) -> float:
        """Share of sampled tokens that are trained; 1.0 when nothing was sampled, 0.0 when nothing was
        sampled because the calls came without token ids. Calls without ids never count as sampled, so in
        a mix they do not lower it: ``calls_without_ids`` counts them."""
        if self.sampled_tokens:
            return self.trainable_tokens / self.sampled_tokens
        return 0.0 if self.calls_without_ids else 1.0

    def as_dict(self) -> dict[str, Any]:
        """All counts plus coverage, for logs and JSON reports."""
        return {**asdict(self), "coverage": self.coverage}

    def merge(self, others: Iterable[Fidelity]) -> Fidelity:
        """This report plus others, field by field."""
        totals = {f.name: getattr(self, f.name) for f in fields(self)}
        for other in others:
            for name in totals:
                totals[name] += getattr(other, name)
        return replace(self, **totals)


def batch_fidelity(reports: Iterable[Fidelity]) -> Fidelity:
    """The sum of many agents' reports; an empty batch gives zero agents."""
    return Fidelity(agents=0).merge(reports)
