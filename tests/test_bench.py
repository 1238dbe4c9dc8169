"""Smoke test of the kernel benchmark (quick mode)."""

from __future__ import annotations

import json
import math

from quantkit.bench import IMPLS, bench_kernel, render_kernel_bench


def test_bench_kernel_quick_structure():
    result = bench_kernel(threads=(1,), quick=True)
    json.dumps(result)  # JSON-able
    assert result["quick"] is True
    assert result["machine"]["cpu"]
    bw = result["bandwidth_gbps"]["1"]
    assert math.isfinite(bw) and bw > 0.1

    rows = result["rows"]
    assert {r["layer"] for r in rows} == {"q_proj/o_proj", "k_proj/v_proj", "down_proj"}
    for row in rows:
        assert row["M"] == 1 and row["threads"] == 1 and row["kind"] == "int4"
        for impl in ("reference", "fp32", "bf16"):
            assert impl in row["ms"], row["errors"]
        for impl, ms in row["ms"].items():
            assert impl in IMPLS and math.isfinite(ms) and ms > 0
            assert math.isfinite(row["gbps"][impl]) and row["bw_share"][impl] > 0
        if result["kernel"]["unavailable_reason"] is None:
            assert "ours" in row["ms"]
            assert all(math.isfinite(v) and v > 0 for v in row["speedup_vs"].values())

    dec = result["decode"]
    assert dec["layers"] == 2
    for impl in ("reference", "bf16"):
        tps = dec["tokens_per_s"][impl]["1"]
        assert math.isfinite(tps) and tps > 0
    if result["kernel"]["unavailable_reason"] is None:
        assert dec["tokens_per_s"]["ours"]["1"] > dec["tokens_per_s"]["reference"]["1"]

    table = render_kernel_bench(result)
    assert table.row_count == len(rows) + 1


def test_summary_is_computed_from_the_rows():
    rows = [{"M": m, "threads": 2, "kind": "int4", "ms": {"ours": 1.0, "bf16": b}}
            for m, b in ((64, 2.0), (64, 8.0), (512, 1.5))]
    result = {"bandwidth_gbps": {"1": 30.0, "2": 40.0}, "rows": rows,
              "decode": {"tokens_per_s": {"ours": {"2": 100.0}, "torch_int": {"2": 50.0}},
                         "weight_gb": {"ours": 0.3, "torch_int": 0.4}}}
    from quantkit.bench import summarize_kernel_bench

    s = summarize_kernel_bench(result)
    assert s["threads"] == 2 and s["dram_gbps"] == 40.0
    assert math.isclose(s["decode16_gbps"], 30.0) and math.isclose(s["decode16_bandwidth_share"], 0.75)
    assert s["decode16_speedup_vs_torch_int4wo"] == 2.0
    # torch streams 0.4 GB x 50 tok/s = 20 GB/s (half of 40); ours at 40 GB/s would run 133 tok/s = 2.67x torch
    assert math.isclose(s["decode16_torch_int4wo_bandwidth_share"], 0.5)
    assert math.isclose(s["decode16_speedup_ceiling_vs_torch_int4wo"], 40.0 / 0.3 / 50.0)
    assert math.isclose(s["prefill64_speedup_vs_torch_bf16"], 4.0)  # geometric mean of 2 and 8
    assert math.isclose(s["prefill512_speedup_vs_torch_bf16"], 1.5)
