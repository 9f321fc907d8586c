"""Time and cost to train, and one job planned on several clusters side by side.

`training_cost` is the one place where a throughput becomes days, GPU-hours and dollars: `planner plan`,
`planner predict`, `planner compare` and the dashboard all call it. `compare` plans the same model, batch and
pins on each cluster given; a cluster on which nothing fits is a row with the reason, not an error."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from typing import Sequence

from planner.errors import MeshplanError, SpecError
from planner.plan import Plan, plan_to_dict
from planner.specs import ClusterSpec, DeviceProfile, ModelSpec

SECONDS_PER_DAY = 86_400
# Token counts are written like 15e12, 15T, 300B or 1.5M; the suffixes are decimal (B = 1e9, as in "300B tokens").
TOKEN_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12, "P": 10**15}
_TOKENS = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtTpP]?)\s*$")


@dataclass(frozen=True)
class TrainingCost:
    """What training on `tokens` tokens takes at a plan's predicted throughput."""

    tokens: int
    """Training tokens, in total over the run."""
    tokens_per_s: float
    """The plan's predicted throughput (all devices together)."""
    gpus: int
    """Devices the run holds for its whole length."""
    days: float
    """Wall-clock days: tokens / tokens_per_s / 86,400."""
    gpu_hours: float
    """days x 24 x gpus."""
    gpu_hour_price_usd: float | None = None
    """What one device costs per hour, US dollars; None when not given."""
    cost_usd: float | None = None
    """gpu_hours x gpu_hour_price_usd; None without a price."""


def training_cost(tokens_per_s: float, gpus: int, tokens: int, gpu_hour_price_usd: float | None = None) -> TrainingCost:
    """Days, GPU-hours and (with a price) dollars to train `tokens` tokens at `tokens_per_s` on `gpus` devices.
    The arithmetic is exactly: days = tokens / tokens_per_s / 86,400; GPU-hours = days x 24 x GPUs;
    cost = GPU-hours x price (no utilisation, restart or checkpoint overheads are added)."""
    if not tokens_per_s > 0:
        raise ValueError(f"tokens_per_s must be positive, got {tokens_per_s}")
    days = tokens / tokens_per_s / SECONDS_PER_DAY
    gpu_hours = days * 24 * gpus
    cost = None if gpu_hour_price_usd is None else gpu_hours * gpu_hour_price_usd
    return TrainingCost(tokens, tokens_per_s, gpus, days, gpu_hours, gpu_hour_price_usd, cost)


def plan_training_cost(plan: Plan, tokens: int, gpu_hour_price_usd: float | None = None) -> TrainingCost:
    """training_cost at a priced plan's throughput, on every device of its cluster."""
    return training_cost(plan.prediction.tokens_per_s, plan.cluster.gpus, tokens, gpu_hour_price_usd)


def cost_to_dict(cost: TrainingCost) -> dict:
    return dataclasses.asdict(cost)


# ---------------------------------------------------------------- input at the edge

def parse_tokens(text: str, source: str = "--tokens") -> int:
    """A token count: a whole number, in any of 15000000000000, 15_000_000_000_000, 15e12, 1.5e13 or 15T (K, M,
    B/G, T, P: decimal). Anything else, zero, or a fraction of a token is a SpecError naming `source`."""
    m = _TOKENS.match(str(text))
    if not m:
        raise SpecError(source, "tokens", f"expected a number of tokens such as 15e12, 15T or 300B, got {text!r}")
    number, suffix = m.groups()
    value = float(number.replace("_", "")) * TOKEN_SUFFIXES[suffix.upper()]
    if not math.isfinite(value) or value > 1e21:
        raise SpecError(source, "tokens", f"{text!r} is beyond any training run (more than 1e21 tokens)")
    if value < 1 or value != math.floor(value):
        raise SpecError(source, "tokens", f"expected a whole number of tokens, at least 1, got {text!r}")
    return int(value)


def parse_price(text: str, source: str = "--gpu-hour-price") -> float:
    """US dollars per device-hour: a finite number above zero (2.5, not $2.5), else a SpecError naming `source`."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise SpecError(source, "gpu_hour_price", f"expected US dollars per GPU-hour such as 2.50, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise SpecError(source, "gpu_hour_price", f"expected a price above 0 US dollars per GPU-hour, got {text!r}")
    return value


def check_tokens(tokens: int, model: ModelSpec, global_batch: int, source: str = "--tokens") -> None:
    """A run shorter than one iteration is a typo (15e6 for 15e12, say), not a plan to price."""
    per_iteration = global_batch * model.seq_len
    if tokens < per_iteration:
        raise SpecError(source, "tokens", f"{tokens:,} tokens are fewer than one iteration's {per_iteration:,} "
                                          f"(global batch {global_batch} x seq_len {model.seq_len}); give the whole run's tokens")


# ---------------------------------------------------------------- side by side

@dataclass(frozen=True)
class CompareTarget:
    """One cluster to plan on, loaded at the edge."""

    cluster: ClusterSpec
    device: DeviceProfile
    gpu_hour_price_usd: float | None = None


def targets_from_flags(flags: Sequence[tuple[str, object]]) -> list[CompareTarget]:
    """`planner compare`'s (flag, value) pairs in command-line order to targets. Each --cluster starts a target; the
    --nodes, --gpus-per-node, --device and --gpu-hour-price after it are its own. A --gpu-hour-price before the first
    --cluster prices every cluster that gives none; either every cluster ends up with a price or none does (a cost
    column with holes compares nothing). Refusals are SpecErrors naming the flag."""
    from planner.specs import load_cluster, load_device

    default_price, entries = None, []
    for flag, value in flags:
        if flag == "--cluster":
            entries.append({"--cluster": value})
        elif not entries and flag == "--gpu-hour-price" and default_price is None:
            default_price = parse_price(value)
        elif not entries:
            what = "given twice before the first --cluster" if flag == "--gpu-hour-price" else "comes before any --cluster"
            raise SpecError(flag, flag[2:].replace("-", "_"), f"{what}; give it after the --cluster it belongs to")
        elif flag in entries[-1]:
            raise SpecError(flag, flag[2:].replace("-", "_"), f"given twice for --cluster {entries[-1]['--cluster']}; give it once")
        else:
            entries[-1][flag] = value
    unpriced = [e["--cluster"] for e in entries if "--gpu-hour-price" not in e]
    if default_price is None and unpriced and len(unpriced) < len(entries):
        raise SpecError("--gpu-hour-price", "gpu_hour_price", f"given for some clusters but not for --cluster {unpriced[0]}; give one "
                                                              "after every --cluster, or one before the first --cluster for all")
    targets = []
    for e in entries:
        cluster = load_cluster(e["--cluster"], e.get("--nodes"), e.get("--gpus-per-node"), e.get("--device"))
        price = parse_price(e["--gpu-hour-price"]) if "--gpu-hour-price" in e else default_price
        targets.append(CompareTarget(cluster, load_device(cluster.device), price))
    return targets


@dataclass(frozen=True)
class CompareRow:
    """The best plan on one cluster, or why there is none."""

    cluster: ClusterSpec
    device: DeviceProfile
    plan: Plan | None
    """The fastest plan that fits; None when nothing fits."""
    reason: str
    """Why nothing fits ('' when a plan does)."""
    cost: TrainingCost | None
    """Days, GPU-hours and cost at the plan's throughput; None when nothing fits (or no tokens were given)."""
    search_s: float
    gpu_hour_price_usd: float | None = None
    """The target's price, kept for a row that has no cost."""

    @property
    def fits(self) -> bool:
        return self.plan is not None


def compare(model: ModelSpec, global_batch: int, tokens: int | None, targets: Sequence[CompareTarget], pins: dict | None = None,
            **search_options) -> tuple[CompareRow, ...]:
    """Search each target for the fastest plan (search_options go to planner.search.search) and price the run
    (no cost without tokens). A target on which no configuration fits, or none satisfies the pins, is a row with
    the planner's reason."""
    from planner.search import search

    rows = []
    for t in targets:
        start = time.perf_counter()
        try:
            result = search(model, t.cluster, t.device, global_batch, dict(pins or {}), top=1, **search_options)
        except MeshplanError as e:  # e.g. pins that no configuration of this cluster's size satisfies
            rows.append(CompareRow(t.cluster, t.device, None, str(e), None, time.perf_counter() - start, t.gpu_hour_price_usd))
            continue
        best = result.plans[0] if result.plans else None
        elapsed = time.perf_counter() - start
        if best is None or not best.prediction.fits:
            reason = best.prediction.reason if best is not None else "no configuration to price"
            rows.append(CompareRow(t.cluster, t.device, None, f"nothing fits: {reason}", None, elapsed, t.gpu_hour_price_usd))
            continue
        cost = None if tokens is None else plan_training_cost(best, tokens, t.gpu_hour_price_usd)
        rows.append(CompareRow(t.cluster, t.device, best, "", cost, elapsed, t.gpu_hour_price_usd))
    return tuple(rows)


def row_to_dict(row: CompareRow) -> dict:
    c, pr = row.cluster, (row.plan.prediction if row.plan else None)
    return {"cluster": c.name, "nodes": c.nodes, "gpus_per_node": c.gpus_per_node, "gpus": c.gpus, "device": row.device.name,
            "profile": row.device.label, "fits": row.fits, "reason": row.reason,
            "tokens_per_s": pr.tokens_per_s if pr else None, "mfu": pr.mfu if pr else None,
            "peak_memory_gib": pr.peak_memory_gib if pr else None,
            "gpu_hour_price_usd": row.gpu_hour_price_usd, "training": cost_to_dict(row.cost) if row.cost else None,
            "plan": plan_to_dict(row.plan) if row.plan else None, "search_s": round(row.search_s, 3)}
