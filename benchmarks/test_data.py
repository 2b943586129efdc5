"""Corpora larger than memory: preparation throughput beside ``tokenizers``' own
``encode_batch``, and a phase-1 run's peak RSS and time to its first step on a prepared
corpus beside the embedded one.

    LSNN_BENCH_CORPUS_MB=100,1000,4000 python -m pytest benchmarks/test_data.py --benchmark-only

Each size is generated under ``$LSNN_BENCH_DIR`` (default: a temporary directory; set it
to reuse the corpora), prepared with ``lsnn prepare`` and trained on, each command in its
own process under ``/usr/bin/time`` (``bigdata.py``; it also runs alone and writes JSON).
The timed call is the whole preparation, once: it is minutes long, a round is enough.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from benchmarks import bigdata

SIZES = [int(s) for s in os.environ.get("LSNN_BENCH_CORPUS_MB", "100").split(",")]


@pytest.fixture(scope="module")
def workdir() -> Path:
    path = Path(os.environ.get("LSNN_BENCH_DIR") or tempfile.mkdtemp(prefix="lsnn-bench-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def env(workdir) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "LSNN_CACHE_DIR": str(workdir / "cache"),
            "PYTHONPATH": str(bigdata.ROOT)}


@pytest.fixture(scope="module")
def embedded(workdir, env) -> dict:
    return bigdata.bench_embedded(workdir, env)


@pytest.mark.parametrize("megabytes", SIZES)
def test_prepare_and_train(benchmark, workdir, env, embedded, megabytes):
    result = benchmark.pedantic(bigdata.bench_size, args=(megabytes, workdir, env), rounds=1, iterations=1)
    prep, train = result["prepare"], result["train"]
    benchmark.extra_info.update(
        machine=bigdata.machine(), chars=result["chars"], tokens=result["tokens"],
        prepare_mb_per_s=prep["mb_per_s"], encode_mb_per_s=result["chars"] / 1e6 / prep["timing"]["encode_s"],
        encode_batch_mb_per_s=result["encode_batch_mb_per_s"], prepare_peak_rss_mb=prep["peak_rss_mb"],
        train_peak_rss_mb=train["peak_rss_mb"], first_step_s=train["first_step_s"],
        embedded_peak_rss_mb=embedded["peak_rss_mb"], embedded_first_step_s=embedded["first_step_s"])
    assert train["peak_rss_mb"] < 1536, "the phase-1 target: at most 1.5 GB whatever the corpus"
