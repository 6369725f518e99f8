"""The search space of `optiserve tune`, and the checks that refuse an empty or contradictory one.

A candidate is one serving configuration: a deployment (variant × runtime, with OpenVINO's stream count
folded in, since only that runtime has streams), a maximum batch size, a batching deadline and the
runtime's intra-op threads, and the replicas serving it together (worker processes of one server on
this machine, each on its own share of the server CPUs when there are enough; pods on Kubernetes).
Every dimension is categorical, so the grid, random and TPE strategies search
exactly the same candidates and a study can be resumed with any of them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optiserve.errors import ConfigError

if TYPE_CHECKING:
    import optuna

    from optiserve.config import ExperimentConfig
    from optiserve.pipeline import Plan
    from optiserve.types import Variant

PARAMS = ("deployment", "max_batch_size", "max_latency_ms", "intra_op_threads", "replicas")
"""Optuna parameter names, in the order a candidate's label shows them."""


@dataclass(frozen=True)
class Deployment:
    variant_id: str
    runtime: str
    streams: int = 1

    @property
    def key(self) -> str:
        return f"{self.variant_id}@{self.runtime}" + (f"/streams={self.streams}" if self.streams != 1 else "")


@dataclass(frozen=True)
class Candidate:
    deployment: Deployment
    max_batch_size: int
    max_latency_ms: int
    intra_op_threads: int
    replicas: int = 1

    def label(self) -> str:
        replicas = f" ×{self.replicas} replicas" if self.replicas != 1 else ""
        return (
            f"{self.deployment.key} batch≤{self.max_batch_size} deadline {self.max_latency_ms} ms "
            f"threads {self.intra_op_threads}{replicas}"
        )

    def params(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment.key,
            "max_batch_size": self.max_batch_size,
            "max_latency_ms": self.max_latency_ms,
            "intra_op_threads": self.intra_op_threads,
            "replicas": self.replicas,
        }

    def overrides(self) -> dict[str, Any]:
        """The experiment-config keys this candidate sets (for ``with_overrides``)."""
        return {
            "serving.runtimes": [self.deployment.runtime],
            "serving.batching.max_batch_size": self.max_batch_size,
            "serving.batching.max_latency_ms": self.max_latency_ms,
            "serving.threads.intra_op": self.intra_op_threads,
            "serving.threads.streams": self.deployment.streams,
            "serving.replicas": self.replicas,
        }


@dataclass(frozen=True)
class SearchSpace:
    deployments: tuple[Deployment, ...]
    max_batch_size: tuple[int, ...]
    max_latency_ms: tuple[int, ...]
    intra_op_threads: tuple[int, ...]
    variants: dict[str, Variant]
    replicas: tuple[int, ...] = (1,)

    @property
    def grid_size(self) -> int:
        return math.prod(len(values) for values in self.choices().values())

    def choices(self) -> dict[str, list[Any]]:
        """Every parameter's values (Optuna's GridSampler takes this as it is)."""
        return {
            "deployment": [d.key for d in self.deployments],
            "max_batch_size": list(self.max_batch_size),
            "max_latency_ms": list(self.max_latency_ms),
            "intra_op_threads": list(self.intra_op_threads),
            "replicas": list(self.replicas),
        }

    def suggest(self, trial: optuna.Trial) -> Candidate:
        return self.from_params(
            {name: trial.suggest_categorical(name, values) for name, values in self.choices().items()}
        )

    def from_params(self, params: dict[str, Any]) -> Candidate:
        by_key = {d.key: d for d in self.deployments}
        return Candidate(
            deployment=by_key[params["deployment"]],
            max_batch_size=int(params["max_batch_size"]),
            max_latency_ms=int(params["max_latency_ms"]),
            intra_op_threads=int(params["intra_op_threads"]),
            replicas=int(params.get("replicas", 1)),  # studies from before replicas were searched
        )

    def all(self) -> list[Candidate]:
        names = list(self.choices())
        return [
            self.from_params(dict(zip(names, values, strict=True)))
            for values in itertools.product(*self.choices().values())
        ]

    def describe(self) -> str:
        sizes = " × ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in self.choices().items())
        return f"{self.grid_size} configurations ({sizes})"


def build_space(config: ExperimentConfig, plan: Plan, server_cpus: int) -> SearchSpace:
    """The candidates for ``plan``'s servable, accuracy-gated pairs, within ``config.tune.space``;
    ConfigError (exit 2, one line naming the key) when that is empty or contradicts itself or the machine."""
    from optiserve.services.runtimes.base import Runtime

    space = config.tune.space
    pairs = list(plan.pairs)
    if space.variants is not None:
        known = {v.id for v in plan.variants}
        unknown = [v for v in space.variants if v not in known]
        if unknown:
            listed = ", ".join(sorted(known)) or "(none)"
            raise ConfigError(f"tune.space.variants: unknown variant {unknown[0]!r}; known: {listed}")
        pairs = [(v, rt) for v, rt in pairs if v.id in space.variants]
        if not pairs:
            raise ConfigError(
                f"tune.space.variants: none of {list(space.variants)} can be served here "
                f"(rejected by the accuracy gate, or no available runtime serves it: {plan.skipped})"
            )
    if space.runtimes is not None:
        for name in space.runtimes:
            Runtime.get(name)  # unknown: a config error naming it
        pairs = [(v, rt) for v, rt in pairs if rt in space.runtimes]
        if not pairs:
            raise ConfigError(
                f"tune.space.runtimes: none of {list(space.runtimes)} serves the variants searched "
                "(see `optiserve doctor` and tune.space.variants)"
            )
    if not pairs:
        raise ConfigError(
            "tune.space: no variant × runtime pair to search", hint="run `optiserve optimize` first"
        )
    for key, values in (
        ("max_batch_size", space.max_batch_size),
        ("max_latency_ms", space.max_latency_ms),
        ("intra_op_threads", space.intra_op_threads),
        ("streams", space.streams),
        ("replicas", space.replicas),
    ):
        low = 2 if key == "max_batch_size" else 1
        bad = [v for v in values if v < low]
        if bad:
            raise ConfigError(f"tune.space.{key}: {bad[0]} is below the least allowed value, {low}")
    too_many = [t for t in space.intra_op_threads if t > server_cpus]
    if too_many:
        raise ConfigError(
            f"tune.space.intra_op_threads: {too_many[0]} threads, but the servers get {server_cpus} "
            "CPU(s) here (serving.cpus, or the machine's CPUs less the load generator's)"
        )
    if config.tune.min_rate >= config.tune.max_rate:
        raise ConfigError(
            f"tune.min_rate ({config.tune.min_rate:g}) must be below tune.max_rate ({config.tune.max_rate:g})"
        )
    deployments = []
    for variant, runtime in pairs:
        streams = sorted(set(space.streams)) if Runtime.get(runtime).uses_streams else [1]
        deployments += [Deployment(variant.id, runtime, s) for s in streams]
    return SearchSpace(
        deployments=tuple(deployments),
        max_batch_size=tuple(sorted(set(space.max_batch_size))),
        max_latency_ms=tuple(sorted(set(space.max_latency_ms))),
        intra_op_threads=tuple(sorted(set(space.intra_op_threads))),
        variants={v.id: v for v, _ in pairs},
        replicas=tuple(sorted(set(space.replicas))),
    )
