"""Smoke test of the serving benchmark: `valuemix.bench_serving.main` end to end, tiny (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from valuemix.bench_serving import main
from valuemix.compose.vllm_processor import ENV_BACKBONE, ENV_HEADS, ENV_NUM_LAYERS

CONFIGURATIONS = {"vLLM plain", "vLLM, no mix", "vLLM + valuemix 1 head", "vLLM + valuemix 4 heads",
                  "valuemix generate, plain", "valuemix generate 1 head", "valuemix generate 4 heads",
                  "valuemix generate, plain, 1 thread", "valuemix generate 1 head, 1 thread",
                  "vLLM + valuemix 1 head, cross-tokenizer path"}


def test_serving_bench_end_to_end(tmp_path, capsys, monkeypatch):
    for key in (ENV_BACKBONE, ENV_HEADS, ENV_NUM_LAYERS):  # the benchmark sets them for its engine; undone after
        monkeypatch.setenv(key, "")
    out = tmp_path / "serving.json"
    results = main(["--concurrency", "1", "2", "--new-tokens", "3", "--repeats", "1", "--warmup", "0",
                    "--max-model-len", "512", "--kv-cache-gib", "0.25", "--cross-tokenizer", "--out", str(out),
                    "--markdown", str(tmp_path / "serving.md")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    rows = {(r["configuration"], r["concurrency"]): r for r in results["rows"]}
    assert set(rows) == {(c, n) for c in CONFIGURATIONS for n in (1, 2)}
    for (_, n), row in rows.items():
        assert row["tokens_per_s"] == pytest.approx(n * 3 / row["median"]) and len(row["seconds"]) == 1
    top = [r for r in results["ratios"] if r["concurrency"] == 2 and "met" in r]
    assert len(top) == 4 and all(isinstance(r["met"], bool) for r in top)  # 2 targets × (all threads, 1 thread)
    assert {r["concurrency"] for r in results["ratios"] if "cross-tokenizer" in r["ratio"]} == {1, 2}
    markdown = (tmp_path / "serving.md").read_text()
    assert all(c in markdown for c in CONFIGURATIONS) and markdown in capsys.readouterr().out
