"""Corpora larger than memory, for ``test_data.py``: generated on the fly, never committed.

    python benchmarks/bigdata.py --sizes 100,1000,4000 --dir /tmp/lsnn-bench --json out.json

generates a corpus of each size (copies of the standard library's sources, each copy's
``def``/``class`` names suffixed with its number, so that BPE sees realistic, not identical,
text), prepares it with ``lsnn prepare``, times the ``tokenizers`` library's own
``encode_batch`` on the same text with the same tokenizer (the limit), then runs
``lsnn train --phase 1 --max-steps 10 --eval-batches 5`` on the prepared directory and on
the embedded corpus, each in its own process under ``/usr/bin/time``: peak RSS, wall time,
and the time from the start of the process to its first step line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LSNN = [sys.executable, "-m", "stability"]
TRAIN = ["train", "--phase", "1", "--max-steps", "10", "--eval-batches", "5", "--log-every", "1", "--no-report",
         "--progress", "lines"]
_NAME = re.compile(r"^(\s*(?:def|class) )(\w+)", re.MULTILINE)


def stdlib_texts() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "test" in rel.split("/")[:-1] or "site-packages" in rel:
            continue
        try:
            out.append((rel, path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def make_corpus(root: Path, megabytes: int) -> Path:
    """A directory of about ``megabytes`` MB of Python source (reused if complete)."""
    done = root / ".complete"
    if done.exists():
        return root
    texts = stdlib_texts()
    written, copy = 0, 0
    while written < megabytes * 10**6:
        for rel, text in texts:
            body = _NAME.sub(lambda m, c=copy: f"{m.group(1)}{m.group(2)}_{c}", text)
            path = root / f"copy{copy:04d}" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body, encoding="utf-8")
            written += len(body.encode())
            if written >= megabytes * 10**6:
                break
        copy += 1
    done.write_text(str(written))
    return root


def measured(argv: list[str], env: dict[str, str], marker: str | None = None) -> dict[str, float]:
    """Run ``argv`` under /usr/bin/time: wall seconds, peak RSS in MB and, with ``marker``,
    the seconds from the start until a line of its output starts with it."""
    started = time.monotonic()
    with tempfile.NamedTemporaryFile("r") as stats:
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%e %M", "-o", stats.name, *argv], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first = None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if marker and first is None and line.startswith(marker):
                first = time.monotonic() - started
        if proc.wait() != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{''.join(lines[-30:])}")
        wall, rss_kb = stats.read().split()[-2:]
    return {"wall_s": float(wall), "peak_rss_mb": int(rss_kb) / 1024, "first_step_s": first, "output": lines[-3:]}


def encode_batch_limit(prepared: Path, corpus: Path, megabytes: int = 200) -> float:
    """MB/s of ``tokenizers``' own ``encode_batch`` (all cores) on the corpus' first files
    with the prepared tokenizer: the bound for any preparation with it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    texts, size = [], 0
    for path in sorted(corpus.rglob("*.py")):
        texts.append(path.read_text(encoding="utf-8"))
        size += len(texts[-1])
        if size >= megabytes * 10**6:
            break
    started = time.monotonic()
    for i in range(0, len(texts), 256):
        tok.encode_batch_fast(texts[i:i + 256], add_special_tokens=False)
    return size / 1e6 / (time.monotonic() - started)


def bench_size(megabytes: int, workdir: Path, env: dict[str, str]) -> dict:
    corpus = make_corpus(workdir / f"corpus-{megabytes}mb", megabytes)
    prepared = workdir / f"prepared-{megabytes}mb"
    shutil.rmtree(prepared, ignore_errors=True)
    prep = measured([*LSNN, "prepare", str(corpus), str(prepared), "--progress", "lines"], env)
    manifest = json.loads((prepared / "manifest.json").read_text())
    chars = manifest["source"]["chars"]
    out = workdir / f"run-{megabytes}mb"
    shutil.rmtree(out, ignore_errors=True)
    train = measured([*LSNN, *TRAIN, "--data", str(prepared), "--output-dir", str(out)], env, marker="step 1:")
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    return {"megabytes": megabytes, "chars": chars, "tokens": tokens, "files": manifest["source"]["documents"],
            "prepare": {**prep, "mb_per_s": chars / 1e6 / prep["wall_s"], "timing": manifest["timing"],
                        "tokenizer_sample": manifest["tokenizer"]["sample"]},
            "encode_batch_mb_per_s": encode_batch_limit(prepared, corpus),
            "train": train, "shard_bytes": sum(r["bytes"] for r in manifest["files"].values())}


def bench_embedded(workdir: Path, env: dict[str, str]) -> dict:
    out = workdir / "run-embedded"
    shutil.rmtree(out, ignore_errors=True)
    measured([*LSNN, *TRAIN, "--output-dir", str(out)], env)  # prepares the cache once
    shutil.rmtree(out)
    return measured([*LSNN, *TRAIN, "--output-dir", str(out)], env, marker="step 1:")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "lsnn-bench")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LSNN_CACHE_DIR": str(args.dir / "cache"),
           "PYTHONPATH": str(ROOT)}
    args.dir.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "embedded": bench_embedded(args.dir, env), "sizes": []}
    print(json.dumps(results["embedded"]), flush=True)
    for mb in (int(s) for s in args.sizes.split(",")):
        results["sizes"].append(bench_size(mb, args.dir, env))
        print(json.dumps(results["sizes"][-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
