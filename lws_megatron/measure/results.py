"""The GPU measurement's results: a row's checks, a line per row as it is measured, the table,
and the few files a device machine hands back (at most 8, each under 16 MiB, none in a
subfolder): here at most six."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

from lws_megatron.fileio import write_bytes_atomic, write_json_atomic, write_text_atomic
from lws_megatron.measure.compile_cache import pack

LOSS_TOLERANCE = 1e-2  # relative: bf16 arithmetic against fp32 at the same weights
PREFIX = "gpu_measure: "  # marks the lines a measuring process shows on the console
LOG_TAIL_BYTES = 4 * 2**20  # of each log, in the tarball


def check(result: dict, reference: float | None, sync_free: bool) -> tuple[dict, list[str]]:
    """What a row's figures rest on, and what of it failed: its first step's loss against
    `reference` (the same weights in fp32; None: only that it is finite), no host wait inside
    a sync-free row's steps, no graph break in a compiled row."""
    first = result["first_loss"] if result["first_loss"] is not None else math.nan
    checks = {k: result[k] for k in ("first_loss", "syncs_in_steps", "graph_breaks")}
    failures = []
    if reference is None:
        if not math.isfinite(first):
            failures.append(f"first step's loss is {first}")
    else:
        rel = abs(first - reference) / abs(reference) if reference else math.inf
        checks.update(fp32_loss=reference, relative_difference=rel)
        if not rel <= LOSS_TOLERANCE:
            failures.append(
                f"first step's loss {first:.5f} against {reference:.5f} in fp32 at the same "
                f"weights: relative difference {rel:.1e} > {LOSS_TOLERANCE:.0e}"
            )
    if sync_free and result["syncs_in_steps"]:
        failures.append(f"{result['syncs_in_steps']} host wait(s) inside a log interval's steps")
    if result["compile"] != "none" and result["graph_breaks"]:
        failures.append(f"{result['graph_breaks']} graph break(s)")
    return checks, failures


def _figures(result: dict) -> str:
    syncs = result.get("syncs_per_step")
    waits = (
        f", {result['grad_wait_ms']:.1f} ms waiting for gradients after backward, "
        f"{result['optimizer_ms']:.1f} ms optimizer, "
        f"{result.get('gather_wait_ms', 0.0):.1f} ms waiting for the weight gather"
        if result.get("data_parallel", 1) > 1
        else ""
    )
    return (
        f"{result['tokens_per_s']:,.0f} tokens/s, MFU {100 * result['mfu']:.1f}%, step "
        f"{1000 * result['step_time_median_s']:.1f} ms ({1000 * result['step_time_min_s']:.1f}"
        f"-{1000 * result['step_time_max_s']:.1f}), "
        f"{'-' if syncs is None else f'{syncs:.2f}'} syncs/step{waits}"
    )


def row_line(record: dict) -> str:
    """One row for the console, the moment it is done."""
    head = f"[{record['index']}] {record['config']}, {record['row']}: "
    status = record["status"]
    if status in ("skipped", "not run"):
        return head + f"{status}: {record['reason']}"
    figures = _figures(record["result"]) + ", " if "result" in record else ""
    verdict = "checks passed" if status == "measured" else f"FAILED: {record['error']}"
    seconds = f" ({record['seconds']:.0f} s)" if "seconds" in record else ""
    return head + figures + verdict + seconds


def table(header: dict | None, records: list[dict], meta: dict) -> str:
    lines = [f"# GPU measurement, {meta['date']}", "", f"`{meta['command']}`", ""]
    if header:
        gemm = ", ".join(f"{g['gemm']} {g['tflops']:.1f} TFLOP/s" for g in header["gemm"])
        lines += [
            f"{header['device']} x{header['gpus']}, torch {header['torch']}, CUDA "
            f"{header['cuda']}; Transformer Engine: {header['transformer_engine']}; compile "
            f"cache: {header['compile_cache']}; matmul ceiling: {gemm}; load average at the "
            f"start {', '.join(f'{x:.1f}' for x in header['load_average'])}",
            "",
        ]
    lines += [
        "| # | config | row | tokens/s | MFU | step ms median (min-max) | syncs/step | checks "
        "| s |",
        "|---|---|---|---:|---:|---|---:|---|---:|",
    ]
    lines += [_table_row(r) for r in records]
    lines += ["", f"Budget {meta['budget_s']:.0f} s, wall {meta['wall_s']:.0f} s.", *ratio(records)]
    notes = [f"- [{r['index']}] {n}" for r in records for n in r.get("notes", [])]
    lines += ["", "Notes:", *notes] if notes else []
    lines += _profiles(records)
    return "\n".join(lines) + "\n"


def _table_row(r: dict) -> str:
    head = f"| {r['index']} | {r['config']} | {r['row']} |"
    if r["status"] in ("skipped", "not run"):
        return head + f" {r['status']}: {r['reason']} | | | | | | |"
    seconds = f"{r['seconds']:.0f}" if "seconds" in r else ""
    verdict = "passed" if r["status"] == "measured" else f"FAILED: {r['error']}"
    if "result" not in r:
        return head + f" | | | | {verdict} | {seconds} |"
    x = r["result"]
    syncs = "-" if x.get("syncs_per_step") is None else f"{x['syncs_per_step']:.2f}"
    return (
        head + f" {x['tokens_per_s']:,.0f} | {100 * x['mfu']:.1f}% | "
        f"{1000 * x['step_time_median_s']:.1f} ({1000 * x['step_time_min_s']:.1f}-"
        f"{1000 * x['step_time_max_s']:.1f}) | {syncs} | {verdict} | {seconds} |"
    )


def ratio(records: list[dict]) -> list[str]:
    """Crown against baseline, both with everything on (the first row of each)."""
    first = {}
    for r in records:
        if r.get("result") and r["row"] == "all on":
            first.setdefault(r["config"], r["result"]["tokens_per_s"])
    if not {"baseline-18l", "crown-18l"} <= first.keys():
        return []
    value = first["crown-18l"] / first["baseline-18l"]
    return [f"crown-18l / baseline-18l tokens/s, all on: {value:.3f} (the target: >= 0.97)"]


def _profiles(records: list[dict]) -> list[str]:
    from lws_megatron.benchmark import BenchResult, render_profile

    lines = []
    for r in records:
        if r.get("result", {}).get("profile"):
            lines += ["", f"[{r['index']}] {r['row']}:", "```"]
            lines += [*render_profile(BenchResult.from_dict(r["result"])), "```"]
    return lines


def write_results(out: Path, scratch: Path, header, records: list[dict], meta: dict) -> list[Path]:
    """table.md, results.json, logs.tar.gz and the compile cache's parts, into `out`."""
    files = [out / "table.md", out / "results.json", out / "logs.tar.gz"]
    cache = scratch / "compile_cache.bin"
    # Three parts at most: with the rest, well under the 64 MiB a machine hands back.
    parts = pack(cache.read_bytes(), out, max_parts=3) if cache.is_file() else []
    meta["compile_cache"] = [p.name for p in parts] or (
        "too large to carry: not saved" if cache.is_file() else "nothing compiled"
    )
    write_text_atomic(files[0], table(header, records, meta))
    write_json_atomic(files[1], {"meta": meta, "device": header, "rows": records})
    write_bytes_atomic(files[2], _logs_tarball(sorted(scratch.glob("*.log"))))
    return files + parts


def _logs_tarball(logs: list[Path]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for log in logs:
            data = log.read_bytes()[-LOG_TAIL_BYTES:]
            info = tarfile.TarInfo(log.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def load_records(path: Path) -> tuple[dict | None, list[dict]]:
    """(the device record, the row records) of a session's rows.jsonl, as far as written."""
    header, rows = None, []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # the last line of a process killed mid-write
                continue
            if record.get("kind") == "device":
                header = record
            else:
                rows.append(record)
    return header, rows
