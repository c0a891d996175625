"""bench/bench_all.py's writers on fabricated figures, and the sampling every benchmark
shares: no server, kernel or container is started."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

pytest.importorskip("matplotlib")  # the bench extra: pip install -e .[bench]
bench_all = pytest.importorskip("bench_all")
from measure import interleaved, pct  # noqa: E402
from suite_phases import pool_filled  # noqa: E402


def fabricated() -> dict:
    tally = bench_all.Tally()
    for who, base in (("raw", 0.001), ("kg", 0.04), ("era-local", 0.002), ("era-docker", 0.003)):
        for i in range(10):
            tally.add("warm", who, base + i * 1e-4)
            tally.add("execute_cold", who, 0.8 + i * 0.01)
            tally.add("first_cold", who, 0.7 + i * 0.01)
            if who != "raw":
                tally.add("execute_pooled", who, base * 5)
                tally.add("first_pooled", who, base * 10)
        if who != "raw":
            tally.values[("load", who)] = {"throughput": 200.0, "p50": 40.0, "p99": 120.0, "errors": 0}
        tally.values[("memory", who)] = {"mib": 50.0, "kernels": 3}
        if who.startswith("era"):
            for i in range(10):
                tally.add("ws", who, base)
    tally.fail("era-docker", ("memory",), RuntimeError("no container"))
    machine = {"date": "2026-01-01 00:00 UTC", "cpu_count": 2, "python": "3.11", "ipykernel": "7",
               "jupyter_client": "8", "kernel_gateway": "3.0.1"}
    return bench_all.build_results(tally, dict(bench_all.QUICK), machine, ["a note"], {}, wall_s=1.0)


def test_writers_produce_markdown_json_and_png(tmp_path: Path) -> None:
    results = fabricated()
    text = bench_all.write_all(results, tmp_path)

    md = (tmp_path / "benchmark.md").read_text()
    assert md == text
    for _, label, unit, *_ in bench_all.FIGURES:
        rows = [line for line in md.splitlines() if line.startswith(f"| {label} ({unit}) |")]
        assert len(rows) == 1, label
        assert rows[0].count("|") == len(bench_all.CONTENDERS) + 3
    assert "Kernel Gateway 3.0.1" in md and "n/a" in md and "failed" in md
    pooled = next(line for line in md.splitlines() if line.startswith("| /api/execute pooled p50"))
    assert "≤ 25 ERA local: ok" in pooled and "≤ 40 ERA Docker: ok" in pooled

    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert data["machine"]["cpu_count"] == 2
    assert [f["key"] for f in data["figures"]] == [f[0] for f in bench_all.FIGURES]
    warm = data["figures"][0]["values"]
    assert warm["raw"] == pytest.approx(1.45) and warm["kg"] > warm["era-local"]
    ws = next(f for f in data["figures"] if f["key"] == "ws_p50")["values"]
    assert ws["raw"] is None and ws["kg"] == warm["kg"]  # the gateway's only run path is its WebSocket

    assert (tmp_path / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_skipped_contender_is_not_applicable(tmp_path: Path) -> None:
    results = fabricated()
    results = bench_all.build_results(bench_all.Tally(), {}, results["machine"], [], {"era-docker": "--no-docker"})
    assert all(f["values"]["era-docker"] is None for f in results["figures"])
    bench_all.write_all(results, tmp_path)  # nothing measured at all still writes all three
    assert (tmp_path / "benchmark.png").stat().st_size > 0


def test_pool_refill_reading() -> None:
    assert pool_filled({"pool": {"size": 0, "pools": {}}}) is None
    full = {"pool": {"size": 2, "pools": {"python:local": {"ready": 2, "starting": 0, "target": 2}}}}
    assert pool_filled(full) is True
    full["pool"]["pools"]["python:local"].update(ready=1, starting=1)
    assert pool_filled(full) is False


def test_interleaved_rotates_drops_warmup_and_benches_a_failing_step() -> None:
    calls: list[str] = []

    def step(name: str, fail_on: int | None = None):
        async def one() -> dict:
            calls.append(name)
            if fail_on is not None and calls.count(name) == fail_on:
                raise RuntimeError("boom")
            return {name: 0.001 * len(calls)}
        return one

    failures: list = []
    samples = asyncio.run(interleaved({"a": step("a"), "b": step("b"), "c": step("c", fail_on=2)}, rounds=3,
                                      warmup=1, on_error=lambda name, exc: failures.append((name, str(exc)))))
    assert calls == ["a", "b", "c", "b", "c", "a", "a", "b", "a", "b"]  # rotating order; c out after failing
    assert failures == [("c", "boom")]
    assert len(samples["a"]) == len(samples["b"]) == 3 and "c" not in samples
    with pytest.raises(RuntimeError):  # without on_error a failure stops the run
        asyncio.run(interleaved({"c": step("c", fail_on=3)}, rounds=1, warmup=0))
    assert pct([0.001, 0.002, 0.003, float("nan")], 50) == pytest.approx(2.0)
