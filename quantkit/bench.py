"""Kernel benchmark: the fast CPU int8xint4 / int8xint8 kernels against torch on Llama 3.2 shapes.

:func:`bench_kernel` times, for every linear shape of Llama 3.2 1B / 3B, every token count ``M``
and thread count: ours (:mod:`quantkit.kernels.cpu`, with its load-time repack cached), the
pure-torch reference, ``F.linear`` in float32 and bfloat16, and torch's weight-only integer op
(``aten._weight_int4pack_mm_for_cpu`` for int4 layers, ``aten._weight_int8pack_mm`` for the int8
head). It measures the machine's DRAM read bandwidth (sum over a large buffer, best of a few) and
reports, for M=1, the GB/s of weight bytes each implementation streams and its share of that
bandwidth. A "16-layer decode" case runs the 7 linears of 16 Llama 3.2 1B layers with distinct
weights (far larger than L3) at M=1 and reports tokens/s.

Timings are medians of repeated calls after warmup. Weights are random codes (the values do not
matter for speed). :func:`render_kernel_bench` turns the JSON-able result into a rich table.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

GROUP_SIZE = 32

# name -> (hidden, intermediate, q heads, kv heads, head dim, vocab)
MODELS = {
    "llama-3.2-1b": (2048, 8192, 32, 8, 64, 128256),
    "llama-3.2-3b": (3072, 8192, 24, 8, 128, 128256),
}

IMPLS = ("ours", "reference", "fp32", "bf16", "torch_int")


def model_linears(model: str) -> list[tuple[str, int, int, str]]:
    """``(name, N, K, kind)`` of one decoder layer's 7 linears plus the int8 ``lm_head``."""
    hidden, inter, nq, nkv, hd, vocab = MODELS[model]
    return [
        ("q_proj", nq * hd, hidden, "int4"),
        ("k_proj", nkv * hd, hidden, "int4"),
        ("v_proj", nkv * hd, hidden, "int4"),
        ("o_proj", hidden, nq * hd, "int4"),
        ("gate_proj", inter, hidden, "int4"),
        ("up_proj", inter, hidden, "int4"),
        ("down_proj", hidden, inter, "int4"),
        ("lm_head", vocab, hidden, "int8"),
    ]


def _median_time(fn: Callable[[], object], min_reps: int, max_reps: int, budget_s: float) -> float:
    """Median seconds of ``fn`` after two warmup calls; at least ``min_reps`` timed calls."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_bandwidth(nbytes: int, reps: int = 5) -> float:
    """DRAM read bandwidth in GB/s: the best of ``reps`` streaming reads of an ``nbytes`` buffer.

    With the fast kernel built, the read is its ``read_bandwidth_probe`` (threads stream their
    share with plain vector loads, as the kernels stream weights, so a kernel cannot beat it);
    otherwise a torch ``sum`` over float32, which on this machine reads 20-30% slower than the
    memory can deliver and so understates the bandwidth.
    """
    read = _bandwidth_reader()
    buf = torch.ones(nbytes // 128 * 128, dtype=torch.uint8)
    read(buf)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        read(buf)
        best = min(best, time.perf_counter() - t0)
    del buf
    return nbytes // 128 * 128 / best / 1e9


def _bandwidth_reader():
    from quantkit.kernels import cpu

    if cpu.unavailable_reason() is None:
        return torch.ops.quantkit.read_bandwidth_probe
    return lambda buf: buf.view(torch.float32).sum()


def machine_info() -> dict:
    flags: list[str] = []
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = sorted(f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                                               "avx_vnni", "avx512_bf16", "amx_int8") if f in have)
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "flags": flags,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# Implementations: each builder returns (call(x), weight bytes streamed per call) or raises.
# --------------------------------------------------------------------------------------------


def _random_int4(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, k // GROUP_SIZE, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
    return qweight, scales


def _random_int8(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = torch.rand(n, 1, generator=gen) * 0.01 + 1e-3
    return qweight, scales


def _build(impl: str, kind: str, n: int, k: int, gen: torch.Generator):
    from quantkit.kernels import cpu, reference

    if impl in ("fp32", "bf16"):
        dt = torch.float32 if impl == "fp32" else torch.bfloat16
        w = (torch.rand(n, k, generator=gen) - 0.5).to(dt)
        return (lambda x: F.linear(x.to(dt), w)), w.numel() * w.element_size()
    if kind == "int4":
        qweight, scales = _random_int4(n, k, gen)
        nbytes = qweight.numel() + scales.numel() * scales.element_size()
        if impl == "ours":
            reason = cpu.unavailable_reason()
            if reason is not None:
                raise RuntimeError(reason)
            cache: dict = {}
            cpu.linear_int4(torch.zeros(1, k), qweight, scales, GROUP_SIZE, 8, None, cache)  # repack once
            return (lambda x: cpu.linear_int4(x, qweight, scales, GROUP_SIZE, 8, None, cache)), nbytes
        if impl == "reference":
            return (lambda x: reference.linear_int4(x, qweight, scales, GROUP_SIZE, 8, None)), nbytes
        # torch weight-only int4 (tinygemm layout): uint4 values, bf16 scale and zero per group
        w_int = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w_int, 2)
        del w_int
        sz = torch.stack((scales.t(), torch.zeros_like(scales.t())), dim=-1).contiguous()  # [K/g, N, 2]
        return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, sz)), (
            packed.numel() + sz.numel() * sz.element_size()
        )
    qweight, scales = _random_int8(n, k, gen)
    nbytes = qweight.numel() + scales.numel() * 4
    if impl == "ours":
        reason = cpu.unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        cache = {}
        cpu.linear_int8(torch.zeros(1, k), qweight, scales, 8, None, cache)
        return (lambda x: cpu.linear_int8(x, qweight, scales, 8, None, cache)), nbytes
    if impl == "reference":
        return (lambda x: reference.linear_int8(x, qweight, scales, 8, None)), nbytes
    s_bf = scales.reshape(n).to(torch.bfloat16)
    return (lambda x: torch.ops.aten._weight_int8pack_mm(x, qweight, s_bf)), nbytes


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def bench_kernel(
    threads: tuple[int, ...] = (1, 2),
    ms: tuple[int, ...] = (1, 64, 512),
    models: tuple[str, ...] = ("llama-3.2-1b", "llama-3.2-3b"),
    quick: bool = False,
) -> dict:
    """Time the kernels on Llama 3.2 shapes; returns a JSON-able dict (see the module docstring).

    ``quick=True`` keeps one model, the smallest M, three layer shapes (no lm_head), a 2-layer
    decode case, a 256 MiB bandwidth buffer and few repetitions: seconds, for smoke tests.
    """
    gen = torch.Generator().manual_seed(0)
    saved_threads = torch.get_num_threads()
    notes: list[str] = []
    if quick:
        models = tuple(models[:1])
        ms = (min(ms),)
    reps = (3, 5, 0.05) if quick else (5, 50, 0.5)
    bw_bytes = (256 << 20) if quick else (1 << 30)
    decode_layers = 2 if quick else 16

    result: dict = {"machine": machine_info(), "group_size": GROUP_SIZE, "quick": quick, "bandwidth_gbps": {}}
    try:
        from quantkit.kernels import cpu

        result["kernel"] = {"unavailable_reason": cpu.unavailable_reason(), "isa": cpu.isa()}
    except Exception as exc:  # noqa: BLE001
        result["kernel"] = {"unavailable_reason": _err(exc), "isa": 0}

    rows: list[dict] = []
    try:
        for t in threads:
            torch.set_num_threads(t)
            result["bandwidth_gbps"][str(t)] = measure_bandwidth(bw_bytes, reps=3 if quick else 5)

        for model in models:
            linears = model_linears(model)
            seen: set[tuple[int, int, str]] = set()
            for name, n, k, kind in linears:
                if quick and name not in ("q_proj", "k_proj", "down_proj"):
                    continue
                if (n, k, kind) in seen:  # k_proj == v_proj, gate_proj == up_proj
                    continue
                seen.add((n, k, kind))
                same = [nm for nm, n2, k2, kd in linears if (n2, k2, kd) == (n, k, kind)]
                impls = {}
                for impl in IMPLS:
                    try:
                        impls[impl] = _build(impl, kind, n, k, gen)
                    except Exception as exc:  # noqa: BLE001
                        impls[impl] = _err(exc)
                for m in ms:
                    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
                    for t in threads:
                        torch.set_num_threads(t)
                        row = {"model": model, "layer": "/".join(same), "kind": kind, "N": n, "K": k, "M": m,
                               "threads": t, "ms": {}, "gbps": {}, "bw_share": {}, "errors": {}}
                        for impl, built in impls.items():
                            if isinstance(built, str):
                                row["errors"][impl] = built
                                continue
                            call, nbytes = built
                            slow = impl in ("reference", "fp32") and n * k * m > (1 << 31)
                            try:
                                sec = _median_time(lambda: call(x), 1 if slow else reps[0], reps[1], reps[2])
                            except Exception as exc:  # noqa: BLE001
                                row["errors"][impl] = _err(exc)
                                continue
                            row["ms"][impl] = sec * 1e3
                            if m == 1:
                                row["gbps"][impl] = nbytes / sec / 1e9
                                row["bw_share"][impl] = row["gbps"][impl] / result["bandwidth_gbps"][str(t)]
                        if "ours" in row["ms"]:
                            row["speedup_vs"] = {i: v / row["ms"]["ours"] for i, v in row["ms"].items() if i != "ours"}
                        rows.append(row)
                del impls

        result["decode"] = _decode_case(threads, decode_layers, gen, reps)
        for t in threads:  # again, next to the decode case: this machine's bandwidth drifts by 20-30%
            torch.set_num_threads(t)
            result["bandwidth_gbps"][str(t)] = max(result["bandwidth_gbps"][str(t)],
                                                   measure_bandwidth(bw_bytes, reps=3 if quick else 5))
        for row in rows:  # shares against the final (best) reading
            row["bw_share"] = {i: g / result["bandwidth_gbps"][str(row["threads"])] for i, g in row["gbps"].items()}
        if quick:
            notes.append(f"quick: {models[0]}, M={ms[0]}, 3 shapes, {decode_layers}-layer decode")
    finally:
        torch.set_num_threads(saved_threads)
    result["rows"] = rows
    result["notes"] = notes
    result["summary"] = summarize_kernel_bench(result)
    return result


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize_kernel_bench(result: dict) -> dict:
    """The flat numbers scripts check, at the largest thread count measured (None when not measured).

    ``decode16_*``: the multi-layer decode case (16 layers unless ``quick``), whose weights do not fit
    in L3; GB/s counts the weight bytes our kernel streams per token. ``prefill*_speedup_vs_torch_bf16``:
    geometric mean over the int4 layer shapes of bf16 ``F.linear`` time / our time at that M.
    """
    t = str(max(int(k) for k in result["bandwidth_gbps"])) if result.get("bandwidth_gbps") else None
    dram = result["bandwidth_gbps"].get(t) if t else None
    dec = result.get("decode", {})
    tok = {impl: v.get(t) for impl, v in dec.get("tokens_per_s", {}).items()}
    gbps = tok["ours"] * dec["weight_gb"]["ours"] if tok.get("ours") else None
    torch_gb = dec.get("weight_gb", {}).get("torch_int")
    torch_gbps = tok["torch_int"] * torch_gb if tok.get("torch_int") and torch_gb else None

    def prefill(m: int) -> float | None:
        return _geomean([r["ms"]["bf16"] / r["ms"]["ours"] for r in result.get("rows", [])
                         if r["M"] == m and str(r["threads"]) == t and r["kind"] == "int4"
                         and "ours" in r["ms"] and "bf16" in r["ms"]])

    return {
        "threads": int(t) if t else None,
        "dram_gbps": dram,
        "decode16_gbps": gbps,
        "decode16_bandwidth_share": gbps / dram if gbps and dram else None,
        "decode16_speedup_vs_torch_int4wo": tok["ours"] / tok["torch_int"] if tok.get("ours") and tok.get("torch_int")
        else None,
        # both ops are memory-bound at M=1: the speedup ours could reach at 100% of the DRAM bandwidth
        # (our bytes per token vs torch's measured tokens/s) bounds what any kernel in our format can show
        "decode16_torch_int4wo_bandwidth_share": torch_gbps / dram if torch_gbps and dram else None,
        "decode16_speedup_ceiling_vs_torch_int4wo": dram / dec["weight_gb"]["ours"] / tok["torch_int"]
        if dram and tok.get("torch_int") and dec.get("weight_gb", {}).get("ours") else None,
        "prefill64_speedup_vs_torch_bf16": prefill(64),
        "prefill512_speedup_vs_torch_bf16": prefill(512),
    }


def _decode_case(threads, n_layers: int, gen: torch.Generator, reps) -> dict:
    """The 7 linears x ``n_layers`` layers of Llama 3.2 1B at M=1, distinct weights: tokens/s."""
    linears = [lin for lin in model_linears("llama-3.2-1b") if lin[3] == "int4"]
    out: dict = {"model": "llama-3.2-1b", "layers": n_layers, "tokens_per_s": {}, "weight_gb": {}, "errors": {}}
    x_by_k = {k: torch.randn(1, k, generator=gen).to(torch.bfloat16) for _, _, k, _ in linears}
    for impl in IMPLS:
        try:
            calls = []
            nbytes = 0
            for _ in range(n_layers):
                for _, n, k, kind in linears:
                    call, nb = _build(impl, kind, n, k, gen)
                    calls.append((call, x_by_k[k]))
                    nbytes += nb
        except Exception as exc:  # noqa: BLE001
            out["errors"][impl] = _err(exc)
            continue

        def step(calls=calls):
            for call, x in calls:
                call(x)

        out["weight_gb"][impl] = nbytes / 1e9
        out["tokens_per_s"][impl] = {}
        for t in threads:
            torch.set_num_threads(t)
            slow = impl == "reference"
            sec = _median_time(step, 1 if slow else reps[0], 3 if slow else reps[1], reps[2])
            out["tokens_per_s"][impl][str(t)] = 1.0 / sec
        del calls, step
    return out


def render_kernel_bench(result: dict):
    """A rich Table of :func:`bench_kernel`'s result."""
    from rich.table import Table

    bw = ", ".join(f"{t} thr: {v:.1f} GB/s" for t, v in result.get("bandwidth_gbps", {}).items())
    m = result.get("machine", {})
    k = result.get("kernel", {})
    table = Table(
        title=f"quantkit CPU kernel vs torch (g{result.get('group_size')}) - {m.get('cpu', '?')}",
        caption=f"DRAM read bandwidth: {bw}; kernel isa={k.get('isa')} "
        f"({k.get('unavailable_reason') or 'available'}); times in ms (median)",
    )
    for col in ("model", "layer", "N x K", "M", "thr", *IMPLS, "ours GB/s (bw%)", "ours vs bf16"):
        table.add_column(col, justify="left" if col in ("model", "layer") else "right")
    for row in result.get("rows", []):
        cells = []
        for impl in IMPLS:
            v = row["ms"].get(impl)
            cells.append(f"{v:.3f}" if v is not None else ("err" if impl in row["errors"] else "-"))
        g = row["gbps"].get("ours")
        share = row["bw_share"].get("ours")
        gb = f"{g:.1f} ({share * 100:.0f}%)" if g is not None else "-"
        sp = row.get("speedup_vs", {}).get("bf16")
        table.add_row(row["model"], row["layer"], f"{row['N']}x{row['K']}", str(row["M"]), str(row["threads"]),
                      *cells, gb, f"{sp:.2f}x" if sp else "-")
    dec = result.get("decode")
    if dec:
        table.add_section()
        for t in sorted({t for v in dec["tokens_per_s"].values() for t in v}):
            cells = []
            for impl in IMPLS:
                v = dec["tokens_per_s"].get(impl, {}).get(t)
                cells.append(f"{v:.1f} tok/s" if v is not None else "-")
            ours, bf = dec["tokens_per_s"].get("ours", {}).get(t), dec["tokens_per_s"].get("bf16", {}).get(t)
            table.add_row(dec["model"], f"{dec['layers']}-layer decode", "7 linears/layer", "1", t, *cells,
                          "-", f"{ours / bf:.2f}x" if ours and bf else "-")
    return table
