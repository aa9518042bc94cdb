"""Benchmark results: one row per metric, with its target check, printed as markdown and saved as JSON.

Rows carry the number of runs behind each median, so a reader can tell a 1-run quick number from a
10-run one, and the JSON keeps the raw samples so a later look can recompute anything.
"""

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Target:
    """A goal for a metric: value <= limit (``at_most``) or value >= limit."""

    limit: float
    at_most: bool

    def met(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit

    def describe(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.limit:g}"


def at_most(limit: float) -> Target:
    return Target(limit, at_most=True)


def at_least(limit: float) -> Target:
    return Target(limit, at_most=False)


@dataclass
class Row:
    """One line of the table: a metric, its value and unit, how many runs, and its target if it has one.

    ``samples`` are the raw measurements behind the value; for a latency ratio, the numerator's seconds.
    """

    group: str
    metric: str
    value: float
    unit: str
    n: Optional[int] = None
    target: Optional[Target] = None
    samples: list[float] = field(default_factory=list)

    @property
    def met(self) -> Optional[bool]:
        return None if self.target is None else self.target.met(self.value)

    def to_json(self) -> dict:
        data = asdict(self)
        data["target"] = None if self.target is None else self.target.describe()
        data["met"] = self.met
        return data


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def format_value(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value:,.0f} B"
    if unit == "x":
        return f"{value:.3f}x"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}" if abs(value) < 10 else f"{value:.1f} {unit}"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| group | metric | value | n | target | met |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        target = row.target.describe() if row.target else ""
        met = "" if row.met is None else ("met" if row.met else "NOT met")
        n = "" if row.n is None else str(row.n)
        lines.append(f"| {row.group} | {row.metric} | {format_value(row.value, row.unit)} | {n} | {target} | {met} |")
    return "\n".join(lines)


def write_json(path: Path, rows: list[Row], context: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**context, "rows": [row.to_json() for row in rows]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
