#!/usr/bin/env python3
"""How small loupelive's batches are on real logs, and how fast they encode and decode.

For each system of the corpus (see ``scripts/corpus.py``), in bytes per record:

* ``json``: JSON lines, one compact object per record with the ``Record`` fields
  (``Record.to_json()``, ``separators=(",", ":")``, UTF-8);
* ``json+br/N``: those lines through one streaming brotli context (quality 5,
  lgwin 18, text mode, as loupelive uses), flushed after every batch of N records;
* ``loupe/N``: loupelive's :class:`BatchEncoder` (quality 5) at N records per
  batch: the sum of the BATCH payloads *including* their varint headers; the
  brotli bytes alone (``br only``) and the compact encoding before brotli
  (``raw``) are reported too;
* ``q11``: ``brotli.compress(quality=11)`` over the whole JSON-lines file at
  once, a reference no live stream can reach (it sees the whole file before it
  emits a byte).

Then the cost of source locations (``source_locations`` in the JSON): the same
records with what ``LiveHandler`` adds to each (file, function, module and line
of the logging call; process and thread ids), encoded by ``loupe/N`` as above,
against the records without them.  Call sites are synthetic but shaped like an
application's: SOURCE_SITES sites in SOURCE_MODULES modules, each record's site
chosen by its logger and message template (so a statement always logs the same
kind of message and the busiest templates make the busiest sites); one process
id per system, one thread id per distinct ``thread`` of the corpus (a CPython
``threading.get_ident()``-sized number).

Then the throughput, in records per second, of ``BatchEncoder.encode`` at 100
records per batch and of ``BatchDecoder.decode`` on those batches, next to the
same work done with JSON lines (``json.dumps`` + the brotli stream above;
brotli + ``json.loads`` + building the ``Record``), measured in the same round
so that the ratio survives a noisy machine.  Every decoded batch is checked
against the records that went in.

Writes everything (with the machine) to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import brotli

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import corpus_or_synthetic

import loupelive
from loupelive import Level, Record
from loupelive.records import BatchDecoder, BatchEncoder, BatchHeader

BATCH_SIZES: Final = (1, 10, 100, 1000)
THROUGHPUT_BATCH: Final = 100
QUALITY: Final = 5
LGWIN: Final = 18
REPO_ROOT: Final = Path(__file__).resolve().parent.parent

#: Synthetic call sites for the source-location measurement.
SOURCE_SITES: Final = 48
SOURCE_MODULES: Final = 12
_FUNCTIONS: Final = (
    "handle_request",
    "run",
    "process_batch",
    "on_message",
    "connect",
    "_retry",
    "commit",
    "schedule",
    "validate",
    "__init__",
    "close",
    "dispatch",
)
#: Digits and hex runs: masked to group messages by template.
_VARIABLE: Final = re.compile(r"[0-9a-fA-F]{2,}|\d+")


def source_version() -> dict[str, Any]:
    """The commit measured, and whether loupelive/ had uncommitted changes."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "loupelive_modified": bool(git("status", "--porcelain", "loupelive")),
    }


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "load_average": load,
        "brotli": getattr(brotli, "__version__", "?"),
        "loupelive": loupelive.__version__,
        "source": source_version(),
    }


def json_line(record: Record) -> bytes:
    """One record as a JSON line (what a naive log shipper would send)."""
    return json.dumps(record.to_json(), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def batches(records: Sequence[Record], size: int) -> list[Sequence[Record]]:
    return [records[i : i + size] for i in range(0, len(records), size)]


def json_brotli_sizes(lines: Sequence[bytes], size: int) -> int:
    """Bytes of the JSON lines through one brotli stream flushed every ``size`` lines."""
    compressor = brotli.Compressor(mode=brotli.MODE_TEXT, quality=QUALITY, lgwin=LGWIN)
    total = 0
    for start in range(0, len(lines), size):
        data = b"".join(lines[start : start + size])
        total += len(compressor.process(data)) + len(compressor.flush())
    return total


def loupe_encode(records: Sequence[Record], size: int) -> list[bytes]:
    """BATCH payloads for ``records`` in batches of ``size`` (one context, like a live stream)."""
    encoder = BatchEncoder(quality=QUALITY)
    payloads = []
    for index, batch in enumerate(batches(records, size)):
        payloads.append(
            encoder.encode(batch, first_seq=batch[0].seq, last_seq=batch[-1].seq, sync=index == 0)
        )
    return payloads


def loupe_decode(payloads: Sequence[bytes]) -> list[Record]:
    decoder = BatchDecoder()
    out: list[Record] = []
    for payload in payloads:
        out.extend(decoder.decode(payload)[1])
    return out


def json_encode(records: Sequence[Record], size: int) -> list[bytes]:
    compressor = brotli.Compressor(mode=brotli.MODE_TEXT, quality=QUALITY, lgwin=LGWIN)
    chunks = []
    for batch in batches(records, size):
        data = b"".join(json_line(r) for r in batch)
        chunks.append(compressor.process(data) + compressor.flush())
    return chunks


def inflate(decompressor: brotli.Decompressor, data: bytes) -> bytes:
    """Everything ``data`` inflates to (brotli 1.2 returns at most ~32 KiB per call)."""
    parts = [decompressor.process(data)]
    while parts[-1]:
        parts.append(decompressor.process(b""))
    return b"".join(parts)


def json_decode(chunks: Sequence[bytes]) -> list[Record]:
    decompressor = brotli.Decompressor()
    out: list[Record] = []
    for chunk in chunks:
        for line in inflate(decompressor, chunk).splitlines():
            obj = json.loads(line)
            out.append(
                Record(
                    seq=obj["seq"],
                    timestamp=obj["timestamp"],
                    level=Level[obj["level"]],
                    logger=obj["logger"],
                    thread=obj["thread"],
                    message=obj["message"],
                    exception=obj["exception"],
                    fields=obj["fields"],
                )
            )
    return out


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_sizes(records: Sequence[Record]) -> dict[str, Any]:
    n = len(records)
    lines = [json_line(r) for r in records]
    whole = b"".join(lines)
    result: dict[str, Any] = {
        "records": n,
        "json": len(whole) / n,
        "json_brotli": {},
        "loupe": {},
        "loupe_brotli_only": {},
        "loupe_raw": {},
        "loupe_header": {},
        "loupe_batches": {},
        "q11": len(brotli.compress(whole, quality=11)) / n,
    }
    for size in BATCH_SIZES:
        result["json_brotli"][str(size)] = json_brotli_sizes(lines, size) / n
        payloads = loupe_encode(records, size)
        decoded = loupe_decode(payloads)
        if decoded != list(records):
            raise SystemExit(f"BatchDecoder did not return the records that went in (batch {size})")
        total = sum(len(p) for p in payloads)
        headers = [BatchHeader.parse(p) for p in payloads]
        raw = sum(header.raw_len for header, _ in headers)
        header_bytes = sum(length for _, length in headers)
        result["loupe"][str(size)] = total / n
        result["loupe_brotli_only"][str(size)] = (total - header_bytes) / n
        result["loupe_header"][str(size)] = header_bytes / n
        result["loupe_raw"][str(size)] = raw / n
        result["loupe_batches"][str(size)] = len(payloads)
    return result


def call_sites(system: str) -> list[tuple[str, str, str, int]]:
    """SOURCE_SITES (file, function, module, line) in SOURCE_MODULES modules of one application."""
    package = re.sub(r"[^a-z0-9]+", "_", system.lower()).strip("_") or "app"
    modules = [f"{package}_{name}" for name in ("server", "handlers", "db", "cache", "auth", "jobs")]
    modules += [
        f"{name}_{i}" for i, name in enumerate(("util", "client", "worker", "api", "models", "tasks"))
    ]
    sites = []
    for i in range(SOURCE_SITES):
        module = modules[i % SOURCE_MODULES]
        file = f"/srv/{package}/lib/python3.11/site-packages/{package}/{module}.py"
        function = _FUNCTIONS[(i * 7) % len(_FUNCTIONS)]
        line = 20 + (zlib.crc32(f"{system}:{i}".encode()) % 1500)
        sites.append((file, function, module, line))
    return sites


def thread_ident(thread: str) -> int:
    """A ``threading.get_ident()``-like number (0x7f.. pthread address) per thread name."""
    return 0x7F00_0000_0000 + (zlib.crc32(thread.encode()) & 0xFFFF_FFFF) * 4096


def with_source(system: str, records: Sequence[Record]) -> list[Record]:
    """``records`` with the source locations and ids a LiveHandler would give them."""
    sites = call_sites(system)
    process = 1000 + zlib.crc32(system.encode()) % 60000
    out = []
    for record in records:
        template = _VARIABLE.sub("#", record.message)[:48]
        file, function, module, line = sites[zlib.crc32(f"{record.logger}|{template}".encode()) % len(sites)]
        out.append(
            attrs.evolve(
                record,
                file=file,
                function=function,
                module=module,
                line=line,
                process=process,
                thread_id=thread_ident(record.thread or "MainThread"),
            )
        )
    return out


def measure_source_cost(system: str, records: Sequence[Record]) -> dict[str, Any]:
    """Bytes per record of loupe/N with and without source locations (same records otherwise)."""
    located = with_source(system, records)
    n = len(records)
    result: dict[str, Any] = {
        "records": n,
        "sites_used": len({(r.file, r.function, r.line) for r in located}),
        "threads": len({r.thread_id for r in located}),
        "without": {},
        "with": {},
        "difference": {},
        "raw_without": {},
        "raw_with": {},
    }
    for size in BATCH_SIZES:
        for key, batch in (("without", records), ("with", located)):
            payloads = loupe_encode(batch, size)
            if loupe_decode(payloads) != list(batch):
                raise SystemExit(
                    f"BatchDecoder did not return the records that went in ({key}, batch {size})"
                )
            result[key][str(size)] = sum(len(p) for p in payloads) / n
            raw = sum(BatchHeader.parse(p)[0].raw_len for p in payloads)
            result[f"raw_{key}"][str(size)] = raw / n
        result["difference"][str(size)] = result["with"][str(size)] - result["without"][str(size)]
    return result


def aggregate_source_cost(costs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    total = sum(c["records"] for c in costs.values())
    result: dict[str, Any] = {"records": total}
    for key in ("without", "with", "difference", "raw_without", "raw_with"):
        result[key] = {
            str(b): sum(c[key][str(b)] * c["records"] for c in costs.values()) / total for b in BATCH_SIZES
        }
    return result


def print_source_cost(costs: dict[str, dict[str, Any]]) -> None:
    width = max(len(n) for n in costs) + 1
    print()
    print(
        f"Source locations (file, function, module, line, process and thread ids; "
        f"{SOURCE_SITES} call sites): bytes per record, loupe/N"
    )
    print(
        f"{'system':<{width}} "
        + " ".join(f"{'without/' + str(b):>10} {'with/' + str(b):>8} {'+':>5}" for b in BATCH_SIZES)
        + f" {'raw +/100':>9}"
    )
    for name, c in costs.items():
        print(
            f"{name:<{width}} "
            + " ".join(
                f"{c['without'][str(b)]:10.1f} {c['with'][str(b)]:8.1f} {c['difference'][str(b)]:5.1f}"
                for b in BATCH_SIZES
            )
            + f" {c['raw_with']['100'] - c['raw_without']['100']:9.1f}"
        )


def measure_throughput(records: Sequence[Record], rounds: int) -> dict[str, Any]:
    """Records/s of encode and decode at THROUGHPUT_BATCH, loupelive and JSON, per round."""
    n = len(records)
    payloads = loupe_encode(records, THROUGHPUT_BATCH)
    chunks = json_encode(records, THROUGHPUT_BATCH)
    if json_decode(chunks) != list(records):
        raise SystemExit("the JSON reference did not round-trip")
    samples: dict[str, list[float]] = {
        "loupe_encode": [],
        "json_encode": [],
        "loupe_decode": [],
        "json_decode": [],
    }
    for _ in range(rounds):
        samples["loupe_encode"].append(n / timed(lambda: loupe_encode(records, THROUGHPUT_BATCH)))
        samples["json_encode"].append(n / timed(lambda: json_encode(records, THROUGHPUT_BATCH)))
        samples["loupe_decode"].append(n / timed(lambda: loupe_decode(payloads)))
        samples["json_decode"].append(n / timed(lambda: json_decode(chunks)))
    encode_ratios = [a / b for a, b in zip(samples["loupe_encode"], samples["json_encode"], strict=True)]
    decode_ratios = [a / b for a, b in zip(samples["loupe_decode"], samples["json_decode"], strict=True)]
    return {
        "batch": THROUGHPUT_BATCH,
        "rounds": rounds,
        "median": {key: statistics.median(values) for key, values in samples.items()},
        "best": {key: max(values) for key, values in samples.items()},
        "encode_ratio_vs_json_median": statistics.median(encode_ratios),
        "decode_ratio_vs_json_median": statistics.median(decode_ratios),
        "samples": samples,
    }


def aggregate(sizes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """All systems together: total bytes over total records (each system its own stream)."""
    total = sum(s["records"] for s in sizes.values())

    def weighted(key: str, batch: int | None = None) -> float:
        values = [s[key] if batch is None else s[key][str(batch)] for s in sizes.values()]
        return float(sum(v * s["records"] for v, s in zip(values, sizes.values(), strict=True)) / total)

    result: dict[str, Any] = {"records": total, "json": weighted("json"), "q11": weighted("q11")}
    for key in ("json_brotli", "loupe", "loupe_brotli_only", "loupe_raw"):
        result[key] = {str(b): weighted(key, b) for b in BATCH_SIZES}
    return result


def print_tables(sizes: dict[str, dict[str, Any]], throughput: dict[str, dict[str, Any]]) -> None:
    names = list(sizes)
    width = max(len(n) for n in names) + 1
    head = (
        f"{'system':<{width}} {'json':>7} "
        + " ".join(f"{'json+br/' + str(b):>10}" for b in BATCH_SIZES)
        + " "
        + " ".join(f"{'loupe/' + str(b):>8}" for b in BATCH_SIZES)
        + f" {'q11':>6}"
    )
    print("Bytes per record (loupe/N includes the batch header)")
    print(head)
    for name, s in sizes.items():
        print(
            f"{name:<{width}} {s['json']:7.1f} "
            + " ".join(f"{s['json_brotli'][str(b)]:10.1f}" for b in BATCH_SIZES)
            + " "
            + " ".join(f"{s['loupe'][str(b)]:8.1f}" for b in BATCH_SIZES)
            + f" {s['q11']:6.1f}"
        )
    print()
    print("loupe/N ÷ json+br/N (same batches; < 1: loupelive is smaller), and brotli bytes alone")
    print(
        f"{'system':<{width}} "
        + " ".join(f"{'ratio/' + str(b):>8}" for b in BATCH_SIZES)
        + " "
        + " ".join(f"{'br only/' + str(b):>10}" for b in BATCH_SIZES)
        + f" {'raw/100':>8} {'÷q11/100':>9}"
    )
    for name, s in sizes.items():
        print(
            f"{name:<{width}} "
            + " ".join(f"{s['loupe'][str(b)] / s['json_brotli'][str(b)]:8.2f}" for b in BATCH_SIZES)
            + " "
            + " ".join(f"{s['loupe_brotli_only'][str(b)]:10.1f}" for b in BATCH_SIZES)
            + f" {s['loupe_raw']['100']:8.1f} {s['loupe']['100'] / s['q11']:9.2f}"
        )
    if not throughput:
        return
    print()
    print(
        f"Throughput at {THROUGHPUT_BATCH} records/batch, records/s (median of rounds; ratio vs JSON per round)"
    )
    print(
        f"{'system':<{width}} {'encode':>9} {'json enc':>9} {'ratio':>6} {'decode':>9} {'json dec':>9} {'ratio':>6}"
    )
    for name, t in throughput.items():
        m = t["median"]
        print(
            f"{name:<{width}} {m['loupe_encode']:9.0f} {m['json_encode']:9.0f} "
            f"{t['encode_ratio_vs_json_median']:6.2f} {m['loupe_decode']:9.0f} {m['json_decode']:9.0f} "
            f"{t['decode_ratio_vs_json_median']:6.2f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus", help="directory of *_structured.csv files (default: the shared loghub corpus)"
    )
    parser.add_argument(
        "--out", default=str(REPO_ROOT / "benchmarks" / "compression.json"), help="JSON output"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="throughput rounds per system (median reported)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic records (no corpus)")
    args = parser.parse_args(argv)
    if args.rounds < 0:
        parser.error("--rounds must not be negative")

    info = machine_info()
    corpus, source = corpus_or_synthetic(args.corpus, seed=args.seed)
    corpus = {name: records for name, records in corpus.items() if records}
    if not corpus:
        print("the corpus has no records", file=sys.stderr)
        return 1
    print(f"corpus: {source} ({len(corpus)} systems, {sum(map(len, corpus.values()))} records)")
    print(f"machine: {info['cpu_count']} CPUs, Python {info['python']}, load {info['load_average']}")
    print()
    sizes = {name: measure_sizes(records) for name, records in corpus.items()}
    throughput = (
        {name: measure_throughput(records, args.rounds) for name, records in corpus.items()}
        if args.rounds
        else {}
    )
    source_cost = {name: measure_source_cost(name, records) for name, records in corpus.items()}
    if len(sizes) > 1:
        sizes["(all)"] = aggregate(sizes)
        source_cost["(all)"] = aggregate_source_cost(source_cost)
    print_tables(sizes, throughput)
    print_source_cost(source_cost)
    info["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    result = {
        "benchmark": "compression",
        "machine": info,
        "corpus": source,
        "settings": {
            "quality": QUALITY,
            "lgwin": LGWIN,
            "batch_sizes": list(BATCH_SIZES),
            "header": "varint (flags, first_seq, span, count, raw_len); see loupe_header",
        },
        "bytes_per_record": sizes,
        "source_locations": {
            "sites": SOURCE_SITES,
            "modules": SOURCE_MODULES,
            "bytes_per_record": source_cost,
        },
        "throughput": throughput,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
