"""The serving benchmark's measurements and reports: no engine, no Redis, no network here.

A :class:`Sample` is one job as its consumer saw it; :func:`summarize` turns a level's
samples into one row; the writers turn the rows into a text table, Markdown, JSON and a PNG.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WAY_ORDER = ("direct", "vllm-serve", "queue", "queue-result", "gateway")
# The ways compared with the others beside the queue: (way, key stem, the ways it is set
# against). The gateway's TTFT is compared with vllm-serve's (both HTTP + SSE).
MORE_WAYS = (
    ("queue-result", "queue_result", ("direct", "vllm-serve", "queue")),
    ("gateway", "gateway", ("direct", "vllm-serve", "queue")),
)


@dataclass
class Sample:
    """One job as its consumer saw it, on this process's clock (``time.perf_counter``).

    ``arrived`` is called for every piece of output that reaches the consumer (a delta, an
    SSE chunk, a stream event); the gaps between consecutive arrivals are the inter-token
    latency as the consumer sees it, whatever number of tokens each piece carried."""

    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    finished: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    # Wall clock (time.time) at the start and at the first arrival: the worker's timestamps
    # are wall clock, and the queue's time to first token is split into stages with them.
    wall_start: float = field(default_factory=time.time)
    wall_first: float | None = None
    stages: dict[str, float] = field(default_factory=dict)  # seconds, see ttft_stages()

    def arrived(self, tokens: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.first is None:
            self.first = now
            self.wall_first = time.time()
        elif self.last is not None:
            self.gaps.append(now - self.last)
        self.last = now
        self.tokens += tokens

    def end(self, now: float | None = None) -> None:
        self.finished = time.perf_counter() if now is None else now

    @property
    def ttft_s(self) -> float:
        assert self.finished is not None, "end() first"
        return (self.first if self.first is not None else self.finished) - self.start

    @property
    def latency_s(self) -> float:
        assert self.finished is not None, "end() first"
        return self.finished - self.start

    def ttft_stages(self, started_at: float | None, first_token_at: float | None) -> None:
        """Split this job's time to first token with the worker's timestamps (same host,
        same clock): ``to_claim`` (submit, queue, delivery, validation and rendering, up
        to the worker's claim), ``engine`` (claim to the engine's first token, in the
        worker) and ``to_consumer`` (stream write and read). ``queue_path`` is the part
        that is not the engine's: what the queue itself adds."""
        if started_at is None or first_token_at is None or self.wall_first is None:
            return
        self.stages = {
            "to_claim": started_at - self.wall_start,
            "engine": first_token_at - started_at,
            "to_consumer": self.wall_first - first_token_at,
        }
        self.stages["queue_path"] = self.stages["to_claim"] + self.stages["to_consumer"]


STAGES = ("to_claim", "engine", "to_consumer", "queue_path")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linearly interpolated between ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(
    way: str, concurrency: int, wall_s: float, samples: Sequence[Sample]
) -> dict[str, Any]:
    """One table row: a way at one concurrency level."""
    tokens = sum(s.tokens for s in samples)
    gaps = [g * 1000 for s in samples for g in s.gaps]
    tpot = [(s.latency_s - s.ttft_s) * 1000 / (s.tokens - 1) for s in samples if s.tokens > 1]
    return {
        "way": way,
        "concurrency": concurrency,
        "jobs": len(samples),
        "output_tokens": tokens,
        "wall_s": wall_s,
        "jobs_per_s": len(samples) / wall_s,
        "tokens_per_s": tokens / wall_s,
        "ttft_p50_ms": percentile([s.ttft_s * 1000 for s in samples], 50),
        "ttft_p99_ms": percentile([s.ttft_s * 1000 for s in samples], 99),
        "itl_p50_ms": percentile(gaps, 50),
        "itl_p99_ms": percentile(gaps, 99),
        "tpot_p50_ms": percentile(tpot, 50),
        "latency_p50_ms": percentile([s.latency_s * 1000 for s in samples], 50),
        "arrivals_per_job": sum(len(s.gaps) + (s.first is not None) for s in samples)
        / max(1, len(samples)),
        **{
            f"ttft_{stage}_p50_ms": percentile(
                [s.stages[stage] * 1000 for s in samples if stage in s.stages], 50
            )
            for stage in STAGES
            if any(stage in s.stages for s in samples)
        },
    }


def one_line(row: Mapping[str, Any]) -> str:
    return (
        f"{row['tokens_per_s']:.0f} tok/s, {row['jobs_per_s']:.2f} jobs/s, "
        f"TTFT p50 {row['ttft_p50_ms']:.0f} ms, ITL p50 {row['itl_p50_ms']:.1f} ms, "
        f"{row.get('redis_cmds_per_token', math.nan):.3f} Redis cmds/token, "
        f"{row.get('cpu_ms_per_token_outside_engine', math.nan):.3f} CPU ms/token outside "
        "the engine"
    )


def call_deltas(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, int]:
    """Calls per command between two INFO commandstats, most called first, zeros left out."""
    deltas = {
        name.removeprefix("cmdstat_"): int(stat["calls"])
        - int(before.get(name, {}).get("calls", 0))
        for name, stat in after.items()
    }
    return dict(sorted(((k, v) for k, v in deltas.items() if v), key=lambda kv: -kv[1]))


CPU_PARTS = ("front_end", "engine", "redis", "clients")


def cpu_per_token(cpu_s: Mapping[str, float], tokens: int) -> dict[str, float]:
    """CPU milliseconds per generated token by part, and outside the engine in all (front
    end, Redis and clients: what the way itself costs). Empty without figures."""
    if not cpu_s:
        return {}
    per = {f"cpu_ms_per_token_{p}": cpu_s.get(p, 0.0) * 1000 / max(1, tokens) for p in CPU_PARTS}
    per["cpu_ms_per_token_outside_engine"] = sum(
        v for k, v in per.items() if k != "cpu_ms_per_token_engine"
    )
    return per


def memory_trend(points: Sequence[tuple[int, float]]) -> dict[str, Any]:
    """RSS samples (jobs done, MiB) -> growth per 1000 jobs, fitted over the second half
    (the first half includes warm-up: caches and pools that fill once)."""
    tail = list(points[len(points) // 2 :])
    slope = 0.0
    if len(tail) >= 2:
        mean_x = sum(x for x, _ in tail) / len(tail)
        mean_y = sum(y for _, y in tail) / len(tail)
        var = sum((x - mean_x) ** 2 for x, _ in tail)
        if var:
            slope = sum((x - mean_x) * (y - mean_y) for x, y in tail) / var
    rss = [y for _, y in points]
    return {
        "jobs": points[-1][0] if points else 0,
        "rss_first_mib": rss[0] if rss else math.nan,
        "rss_last_mib": rss[-1] if rss else math.nan,
        "rss_max_mib": max(rss) if rss else math.nan,
        "growth_mib_per_1000_jobs": slope * 1000,
        "points": [[x, round(y, 2)] for x, y in points],
    }


# CPU features that change a CPU engine's speed several-fold: runs on machines that differ
# in them are not comparable (vLLM's CPU kernels use AVX-512 where it exists; bfloat16
# without AVX-512 BF16 or AMX is emulated).
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_info(cpuinfo: str) -> dict[str, Any]:
    """The CPU's model name and which of :data:`CPU_FEATURES` it has, from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if not sep:
            if fields:  # the first processor's block is enough
                break
            continue
        fields.setdefault(name.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "cpu_model": fields.get("model name"),
        "cpu_features": [f for f in CPU_FEATURES if f in flags],
    }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):  # not Linux: the model and features stay unknown
        info.update(cpu_info(Path("/proc/cpuinfo").read_text()))
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        info["gpus"] = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return info


# --- tables --------------------------------------------------------------------------------

# (label, key, format); ratios and differences are added per concurrency level.
METRICS = (
    ("output tokens/s", "tokens_per_s", "{:.0f}"),
    ("jobs/s", "jobs_per_s", "{:.2f}"),
    ("TTFT p50 (ms)", "ttft_p50_ms", "{:.1f}"),
    ("TTFT p99 (ms)", "ttft_p99_ms", "{:.1f}"),
    ("- submit to claim p50 (ms)", "ttft_to_claim_p50_ms", "{:.1f}"),
    ("- engine, in the worker p50 (ms)", "ttft_engine_p50_ms", "{:.1f}"),
    ("- first token to consumer p50 (ms)", "ttft_to_consumer_p50_ms", "{:.1f}"),
    ("- queue path (not engine) p50 (ms)", "ttft_queue_path_p50_ms", "{:.1f}"),
    ("ITL p50 (ms)", "itl_p50_ms", "{:.1f}"),
    ("ITL p99 (ms)", "itl_p99_ms", "{:.1f}"),
    ("TPOT p50 (ms)", "tpot_p50_ms", "{:.2f}"),
    ("latency p50 (ms)", "latency_p50_ms", "{:.0f}"),
    ("arrivals per job", "arrivals_per_job", "{:.1f}"),
    ("Redis cmds/token", "redis_cmds_per_token", "{:.3f}"),
    ("Redis cmds/job", "redis_cmds_per_job", "{:.1f}"),
    ("CPU ms/token outside the engine", "cpu_ms_per_token_outside_engine", "{:.3f}"),
    ("- front end (server or worker)", "cpu_ms_per_token_front_end", "{:.3f}"),
    ("- Redis server", "cpu_ms_per_token_redis", "{:.3f}"),
    ("- clients (this benchmark)", "cpu_ms_per_token_clients", "{:.3f}"),
    ("CPU ms/token in the engine (core, workers)", "cpu_ms_per_token_engine", "{:.3f}"),
    ("RSS server process (MiB)", "rss_main_mib", "{:.0f}"),
)


def _cell(fmt: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def by_level(rows: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, Mapping[str, Any]]]:
    levels: dict[int, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        levels.setdefault(int(row["concurrency"]), {})[str(row["way"])] = row
    return dict(sorted(levels.items()))


def comparisons(ways: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """queue / direct and queue / vllm-serve throughput; queue - direct TTFT."""
    out: dict[str, float] = {}
    queue = ways.get("queue")
    if queue is None:
        return out
    cpu = "cpu_ms_per_token_outside_engine"
    for other, name in (("direct", "direct"), ("vllm-serve", "vllm_serve")):
        if other not in ways:
            continue
        out[f"tokens_per_s_vs_{name}"] = queue["tokens_per_s"] / ways[other]["tokens_per_s"]
        if ways[other].get(cpu) and queue.get(cpu) is not None:
            out[f"cpu_outside_engine_vs_{name}"] = queue[cpu] / ways[other][cpu]
    if "direct" in ways:
        out["added_ttft_p50_ms"] = queue["ttft_p50_ms"] - ways["direct"]["ttft_p50_ms"]
        out["added_ttft_p99_ms"] = queue["ttft_p99_ms"] - ways["direct"]["ttft_p99_ms"]
    return out


def more_comparisons(ways: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """queue-result and gateway throughput over each other way; the gateway's TTFT p50
    minus vllm-serve's (``gateway_added_ttft_p50_ms``)."""
    out: dict[str, float] = {}
    for way, stem, others in MORE_WAYS:
        if way not in ways:
            continue
        for other in others:
            if other in ways and ways[other]["tokens_per_s"]:
                ratio = ways[way]["tokens_per_s"] / ways[other]["tokens_per_s"]
                out[f"{stem}_tokens_per_s_vs_{other.replace('-', '_')}"] = ratio
    if "gateway" in ways and "vllm-serve" in ways:
        out["gateway_added_ttft_p50_ms"] = (
            ways["gateway"]["ttft_p50_ms"] - ways["vllm-serve"]["ttft_p50_ms"]
        )
    return out


def round_ratios(
    ways: Mapping[str, Mapping[str, Any]], other: str, way: str = "queue"
) -> list[float]:
    """``way`` / ``other`` throughput in each round (rounds interleave the ways, so round k
    of one way ran beside round k of the other); empty without per-round figures."""
    queue, them = ways.get(way, {}), ways.get(other, {})
    mine, theirs = queue.get("round_tokens_per_s"), them.get("round_tokens_per_s")
    if not mine or not theirs or len(mine) != len(theirs):
        return []
    return [a / b for a, b in zip(mine, theirs, strict=True) if b]


def round_differences(
    ways: Mapping[str, Mapping[str, Any]], other: str, way: str, key: str
) -> list[float]:
    """``way``'s ``key`` (a per-round list) less ``other``'s, round by round; empty without
    per-round figures."""
    mine, theirs = ways.get(way, {}).get(key), ways.get(other, {}).get(key)
    if not mine or not theirs or len(mine) != len(theirs):
        return []
    return [a - b for a, b in zip(mine, theirs, strict=True)]


def _ratio_cell(
    ways: Mapping[str, Mapping[str, Any]], other: str, ratio: float | None, way: str = "queue"
) -> str:
    """``0.97x``, and with rounds the lowest and highest round: ``0.97x (0.93-1.02)``."""
    cell = _cell("{:.2f}x", ratio)
    per_round = round_ratios(ways, other, way)
    if ratio is not None and len(per_round) > 1:
        cell += f" ({min(per_round):.2f}-{max(per_round):.2f})"
    return cell


def _level_table(ways: Mapping[str, Mapping[str, Any]], markdown: bool) -> list[str]:
    names = [w for w in WAY_ORDER if w in ways]
    rows = [["metric", *names]]
    for label, key, fmt in METRICS:
        cells = [_cell(fmt, ways[w].get(key)) for w in names]
        if any(c != "-" for c in cells):
            rows.append([label, *cells])
    if markdown:
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return out
    width = max(len(r[0]) for r in rows)
    return [f"{r[0]:{width}} " + " ".join(f"{c:>11}" for c in r[1:]) for r in rows]


def _comparison_lines(ways: Mapping[str, Mapping[str, Any]]) -> list[str]:
    c = comparisons(ways)
    parts = []
    if "tokens_per_s_vs_direct" in c:
        parts.append(f"queue/direct throughput {c['tokens_per_s_vs_direct']:.2f}x")
    if "tokens_per_s_vs_vllm_serve" in c:
        parts.append(f"queue/vllm-serve throughput {c['tokens_per_s_vs_vllm_serve']:.2f}x")
    if "added_ttft_p50_ms" in c:
        parts.append(f"added TTFT p50 {c['added_ttft_p50_ms']:+.1f} ms")
    path = ways.get("queue", {}).get("ttft_queue_path_p50_ms")
    if path is not None:
        parts.append(f"queue path TTFT p50 {path:.1f} ms")
    if "cpu_outside_engine_vs_vllm_serve" in c:
        parts.append(
            f"CPU/token outside the engine queue/vllm-serve "
            f"{c['cpu_outside_engine_vs_vllm_serve']:.2f}x"
        )
    more = more_comparisons(ways)
    for way, stem, others in MORE_WAYS:
        for other in others:
            key = f"{stem}_tokens_per_s_vs_{other.replace('-', '_')}"
            if key in more:
                parts.append(f"{way}/{other} throughput {more[key]:.2f}x")
    if "gateway_added_ttft_p50_ms" in more:
        parts.append(
            f"gateway TTFT p50 over vllm-serve's {more['gateway_added_ttft_p50_ms']:+.1f} ms"
        )
    return ["; ".join(parts)] if parts else []


def describe(config: Mapping[str, Any]) -> str:
    shared = ", shared system prompt" if config.get("shared_system_prompt") else ""
    rounds = config.get("rounds")
    return (
        f"model {config['model']}; {config['max_tokens']} output tokens per job, "
        f"{config['prompt_words']} prompt words{shared}; jobs per level "
        + ", ".join(f"c={c}: {n}" for c, n in config["jobs_per_level"].items())
        + (f", over {rounds} interleaved rounds" if rounds else "")
    )


def soak_line(soak: Mapping[str, Any] | None) -> str:
    if not soak:
        return ""
    return (
        f"soak: {soak['jobs']} jobs; worker RSS {soak['rss_first_mib']:.0f} -> "
        f"{soak['rss_last_mib']:.0f} MiB (max {soak['rss_max_mib']:.0f}); growth over the "
        f"second half {soak['growth_mib_per_1000_jobs']:+.2f} MiB per 1000 jobs"
    )


def text_table(result: Mapping[str, Any]) -> str:
    lines = [describe(result["config"])]
    for level, ways in by_level(result["rows"]).items():
        lines += ["", f"concurrency {level}", *_level_table(ways, markdown=False)]
        lines += _comparison_lines(ways)
    if result.get("soak"):
        lines += ["", soak_line(result["soak"])]
    return "\n".join(lines)


def markdown(result: Mapping[str, Any], title: str | None = None) -> str:
    config = result["config"]
    lines = [f"# {title or 'Serving benchmark'}", ""]
    lines += [
        f"Command: `{config['command']}`",
        "",
        f"Run {config['started']} ({config['duration_s']:.0f} s) on "
        f"{config['machine'].get('cpus')} CPUs{_cpu(config)}{_gpus(config)}; "
        f"{describe(config)}.",
        "",
        "Ratios compare the ways within this run (see benchmarks/README.md for what each row "
        "measures); in brackets, the lowest and highest of the rounds.",
        "",
    ]
    lines += ["## Summary"]
    if any(row["way"] == "queue" for row in result["rows"]):
        lines += ["", "| concurrency | queue/direct tok/s | queue/vllm-serve tok/s "
                  "| added TTFT p50 (ms) | queue path TTFT p50 (ms) | Redis cmds/token "
                  "| CPU/token outside the engine, queue/vllm-serve |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for level, ways in by_level(result["rows"]).items():
            c = comparisons(ways)
            queue = ways.get("queue", {})
            lines.append(
                f"| {level} | {_ratio_cell(ways, 'direct', c.get('tokens_per_s_vs_direct'))} "
                f"| {_ratio_cell(ways, 'vllm-serve', c.get('tokens_per_s_vs_vllm_serve'))} "
                f"| {_cell('{:+.1f}', c.get('added_ttft_p50_ms'))} "
                f"| {_cell('{:.1f}', queue.get('ttft_queue_path_p50_ms'))} "
                f"| {_cell('{:.3f}', queue.get('redis_cmds_per_token'))} "
                f"| {_cell('{:.2f}x', c.get('cpu_outside_engine_vs_vllm_serve'))} |"
            )
    lines += _more_summary(result["rows"])
    for level, ways in by_level(result["rows"]).items():
        lines += ["", f"## Concurrency {level}", "", *_level_table(ways, markdown=True)]
    if result.get("soak"):
        lines += ["", "## Memory", "", soak_line(result["soak"]) + "."]
    lines += ["", "![throughput and TTFT vs concurrency](" + config.get("png_name", "") + ")"]
    return "\n".join(lines) + "\n"


def _more_summary(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The queue-result and gateway ways' own summary, when they ran."""
    levels = by_level(rows)
    present = [m for m in MORE_WAYS if any(m[0] in ways for ways in levels.values())]
    if not present:
        return []
    lines = ["", "| concurrency | way | tok/s vs direct | tok/s vs vllm-serve | tok/s vs queue "
             "| TTFT p50 over vllm-serve's (ms) | Redis cmds/token |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for level, ways in levels.items():
        more = more_comparisons(ways)
        for way, stem, others in present:
            if way not in ways:
                continue
            cells = []
            for other in others:
                ratio = more.get(f"{stem}_tokens_per_s_vs_{other.replace('-', '_')}")
                cells.append(_ratio_cell(ways, other, ratio, way))
            added = more.get("gateway_added_ttft_p50_ms") if way == "gateway" else None
            added_cell = _cell("{:+.1f}", added)
            per_round = round_differences(ways, "vllm-serve", way, "round_ttft_p50_ms")
            if added is not None and len(per_round) > 1:
                added_cell += f" ({min(per_round):+.0f} to {max(per_round):+.0f})"
            lines.append(
                f"| {level} | {way} | {' | '.join(cells)} | {added_cell} "
                f"| {_cell('{:.3f}', ways[way].get('redis_cmds_per_token'))} |"
            )
    return lines


def _cpu(config: Mapping[str, Any]) -> str:
    model, features = config["machine"].get("cpu_model"), config["machine"].get("cpu_features")
    if model is None:
        return ""
    shown = ", ".join(features) if features else "none of " + ", ".join(CPU_FEATURES)
    return f" ({model}; {shown})"


def _gpus(config: Mapping[str, Any]) -> str:
    gpus = config["machine"].get("gpus")
    return f" and {len(gpus)} x {gpus[0]}" if gpus else ", no GPU"


def plot(result: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = by_level(result["rows"])
    soak = result.get("soak")
    panels = 3 if soak else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    for way in WAY_ORDER:
        xs = [c for c, ways in levels.items() if way in ways]
        if not xs:
            continue
        axes[0].plot(xs, [levels[c][way]["tokens_per_s"] for c in xs], marker="o", label=way)
        axes[1].plot(xs, [levels[c][way]["ttft_p50_ms"] for c in xs], marker="o", label=way)
    for ax, ylabel in ((axes[0], "output tokens/s"), (axes[1], "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[1].set_yscale("log")
    if soak:
        xs, ys = zip(*soak["points"], strict=True)
        axes[2].plot(xs, ys, marker=".")
        axes[2].set_xlabel("jobs done")
        axes[2].set_ylabel("worker RSS (MiB)")
        axes[2].set_title("queue soak")
        axes[2].grid(True, alpha=0.3)
    fig.suptitle(str(result["config"]["model"]))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(result: dict[str, Any], out: Path, title: str | None = None) -> list[Path]:
    """OUT.json, OUT.md and OUT.png; returns the paths written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".json"), out.with_suffix(".md"), out.with_suffix(".png")]
    result["config"]["png_name"] = paths[2].name
    paths[0].write_text(json.dumps(_no_nan(result), indent=2, allow_nan=False) + "\n")
    paths[1].write_text(markdown(result, title))
    plot(result, paths[2])
    return paths


def _no_nan(value: Any) -> Any:
    """NaN (a statistic of nothing) as JSON null, everywhere in the result."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    return value
