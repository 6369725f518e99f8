"""Cost per million inferences, from measured throughput and an instance's hourly list price.

The price table ships with the package (``optiserve/data/prices.yaml``); a user file of the same shape
replaces or adds instance types. Two figures per variant × runtime:

- **max-throughput-at-slo**: the replicas measured (``serving.replicas``, one unless set) kept at the
  highest throughput they served together whose p99 met the SLO with no errors:
  ``price_per_hour × replicas ÷ (throughput_rps × 3600) × 1e6``.
- **offered-load**: ``replicas = ceil(offered_rps ÷ that throughput per replica)``, each paid for whether
  busy or not: ``price_per_hour × replicas ÷ (offered_rps × 3600) × 1e6``.

One replica is priced as one instance.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from optiserve.errors import ConfigError
from optiserve.types import BenchResult, CostEstimate, Frozen

PACKAGED_PRICES = "data/prices.yaml"
"""The packaged table, relative to the ``optiserve`` package."""


class GPU(Frozen):
    model: str
    count: int = Field(default=1, ge=1)


class InstancePrice(Frozen):
    """One instance type: its on-demand hourly price and what it has."""

    provider: str
    region: str
    usd_per_hour: float = Field(gt=0)
    vcpu: int = Field(ge=1)
    memory_gib: float = Field(gt=0)
    gpu: GPU | None = None


class PriceTable(Frozen):
    note: str = Field(default="", description="where and when the prices come from")
    instances: dict[str, InstancePrice]

    def get(self, name: str) -> InstancePrice:
        try:
            return self.instances[name]
        except KeyError:
            known = ", ".join(sorted(self.instances))
            raise ConfigError(f"unknown instance type {name!r}; the price table has: {known}") from None

    def default_instance(self, cpus: int | None = None) -> str:
        """A CPU-only instance with ``cpus`` vCPUs (default: this machine's), the first in table order.

        Without an exact match: the smallest CPU-only instance with more vCPUs, else the largest one.
        """
        want = cpus or os.cpu_count() or 1
        cpu_only = [(name, inst) for name, inst in self.instances.items() if inst.gpu is None]
        if not cpu_only:
            raise ConfigError("the price table has no CPU-only instance to default to; pass an instance type")
        exact = [name for name, inst in cpu_only if inst.vcpu == want]
        if exact:
            return exact[0]
        bigger = [(inst.vcpu, i, name) for i, (name, inst) in enumerate(cpu_only) if inst.vcpu > want]
        if bigger:
            return min(bigger)[2]
        return max(cpu_only, key=lambda item: item[1].vcpu)[0]


_ALLOWED_BY_DEPTH: dict[int, type[Frozen]] = {1: PriceTable, 3: InstancePrice, 4: GPU}
"""Which model a key at this depth of the file belongs to (``instances.<name>.gpu.<key>`` is depth 4)."""


def _describe(errors: list[Any]) -> str:
    """One line naming the key. A misspelt key is reported before the missing one it explains."""
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        model = _ALLOWED_BY_DEPTH.get(len(error["loc"]))
        allowed = f"; allowed here: {', '.join(model.model_fields)}" if model else ""
        return f"unknown key {where!r}{allowed}"
    given = error.get("input")
    shown = "" if given is None or isinstance(given, dict | list) else f" (got {given!r})"
    return f"{where}: {error['msg']}{shown}"


def _parse(text: str, source: str) -> PriceTable:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'instances' at the top level")
    try:
        return PriceTable.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e.errors())}") from e


def packaged_prices() -> PriceTable:
    # Beside this module rather than importlib.resources: `optiserve` is a namespace package (no
    # __init__.py), which importlib.resources.files() cannot read on Python 3.11.
    path = Path(__file__).resolve().parent / PACKAGED_PRICES
    return _parse(path.read_text(encoding="utf-8"), f"optiserve/{PACKAGED_PRICES}")


def load_prices(path: Path | None = None) -> PriceTable:
    """The packaged table, with the entries of ``path`` (same schema) replacing or adding instance types."""
    table = packaged_prices()
    if path is None:
        return table
    if not path.is_file():
        raise ConfigError(f"price file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (expected YAML)") from e
    override = _parse(text, str(path))
    note = f"{table.note} Overridden by {path}: {override.note}".strip() if override.note else table.note
    return PriceTable(note=note, instances={**table.instances, **override.instances})


def usd_per_million(price_per_hour: float, replicas: int, throughput_rps: float) -> float:
    """``price_per_hour × replicas ÷ (throughput_rps × 3600) × 1e6``."""
    if throughput_rps <= 0:
        raise ValueError(f"throughput must be positive, got {throughput_rps}")
    return price_per_hour * replicas / (throughput_rps * 3600.0) * 1e6


def meets_slo(result: BenchResult, slo_ms: float) -> bool:
    """p99 within the SLO, no errors, and something was served."""
    return (
        result.latency_ms is not None
        and result.latency_ms.p99 <= slo_ms
        and result.error_rate == 0
        and result.throughput_rps > 0
    )


def best_at_slo(results: Iterable[BenchResult], slo_ms: float) -> BenchResult | None:
    """The load level with the highest throughput among those that meet the SLO; None when none does."""
    ok = [r for r in results if meets_slo(r, slo_ms)]
    return max(ok, key=lambda r: r.throughput_rps) if ok else None


def cost_at_slo(
    results: Iterable[BenchResult], instance: str, price: InstancePrice, slo_ms: float
) -> CostEstimate | None:
    best = best_at_slo(results, slo_ms)
    if best is None:
        return None
    measured = best.endpoint.service.replicas
    return CostEstimate(
        instance=instance,
        price_per_hour=price.usd_per_hour,
        replicas=measured,
        basis="max-throughput-at-slo",
        throughput_rps=best.throughput_rps / measured,
        slo_ms=slo_ms,
        usd_per_million=usd_per_million(price.usd_per_hour, measured, best.throughput_rps),
    )


def cost_at_offered_load(
    results: Iterable[BenchResult], instance: str, price: InstancePrice, slo_ms: float, offered_rps: float
) -> CostEstimate | None:
    """Replicas enough to serve ``offered_rps`` within the SLO; the idle share of the last one is paid too."""
    if offered_rps <= 0:
        raise ConfigError(f"offered load must be positive, got {offered_rps} req/s")
    best = best_at_slo(results, slo_ms)
    if best is None:
        return None
    per_replica = best.throughput_rps / best.endpoint.service.replicas
    replicas = max(1, math.ceil(offered_rps / per_replica))
    return CostEstimate(
        instance=instance,
        price_per_hour=price.usd_per_hour,
        replicas=replicas,
        basis="offered-load",
        throughput_rps=per_replica,
        slo_ms=slo_ms,
        offered_rps=offered_rps,
        usd_per_million=usd_per_million(price.usd_per_hour, replicas, offered_rps),
    )


def estimate_costs(
    results: Iterable[BenchResult],
    prices: PriceTable,
    instance: str,
    slo_ms: float,
    offered_rps: float | None = None,
) -> tuple[CostEstimate, ...]:
    """The estimates that can be made for one variant × runtime (none when no level met the SLO)."""
    results = list(results)
    price = prices.get(instance)
    found = [cost_at_slo(results, instance, price, slo_ms)]
    if offered_rps is not None:
        found.append(cost_at_offered_load(results, instance, price, slo_ms, offered_rps))
    return tuple(c for c in found if c is not None)


def format_usd(value: float) -> str:
    """Readable at any scale: ``$1,234``, ``$12.30``, ``$0.0472``."""
    if value >= 100:
        return f"${value:,.0f}"
    if value >= 1:
        return f"${value:.2f}"
    return f"${value:.3g}"


def describe(cost: CostEstimate) -> str:
    """One line: ``$0.0472 / 1M on c6i.large (max throughput at p99 ≤ 100 ms: 500 req/s)``."""
    if cost.basis == "offered-load":
        how = (
            f"{cost.replicas} × {cost.instance} for {cost.offered_rps:g} req/s offered, "
            f"p99 ≤ {cost.slo_ms:g} ms"
        )
    else:
        how = f"{cost.instance}, max throughput at p99 ≤ {cost.slo_ms:g} ms: {cost.throughput_rps:.1f} req/s"
    return f"{format_usd(cost.usd_per_million)} / 1M ({how})"
