"""Smoke test of the decoding benchmark: `valuemix.bench.main` end to end on tiny models (no timing assertions)."""

from __future__ import annotations

import json

from valuemix.bench import BenchConfig, main, make_parser

TINY = ["--layers", "2", "--hidden", "32", "--intermediate", "64", "--attention-heads", "4", "--kv-heads", "2",
        "--vocab", "300", "--top-k", "5", "--new-tokens", "3", "--prompt-tokens", "4", "--repeats", "1",
        "--warmup", "1", "--train-prompts", "2", "--train-per-prompt", "2", "--train-prompt-tokens", "3",
        "--train-new-tokens", "3", "--train-repeats", "1", "--lora-layers", "1", "--no-progress"]
ROWS = ["plain", "plain (model.generate)", "reference VAS (1 head)", "valuemix 1 head",
        "valuemix 1 head (model.generate)", "valuemix 2 heads", "valuemix 2 heads (model.generate)", "valuemix 4 heads",
        "valuemix 4 heads (model.generate)", "valuemix 1 shared-trunk head", "valuemix 1 shared-trunk head (model.generate)",
        "valuemix 2 shared-trunk heads", "valuemix 2 shared-trunk heads (model.generate)", "valuemix 4 shared-trunk heads",
        "valuemix 4 shared-trunk heads (model.generate)", "valuemix 1 head, top-p 0.5",
        "valuemix 1 head, top-p 0.5 (model.generate)", "valuemix 1 head, cross-tokenizer path",
        "valuemix 1 head, cross-tokenizer path (model.generate)"]


def test_parser_defaults_match_config():
    from valuemix.options import parse

    assert parse(make_parser(), [], "bench") == (BenchConfig(),)


def test_settings_can_come_from_a_config_file(tmp_path):
    from valuemix.options import parse

    (tmp_path / "bench.yaml").write_text("top_k: 7\nheads: [1, 4]\nreference: false\n")
    (args,) = parse(make_parser(), ["--config", str(tmp_path / "bench.yaml"), "--top-k", "9"], "bench")
    assert (args.top_k, args.heads, args.reference) == (9, [1, 4], False)


def test_bench_end_to_end(tmp_path, capsys):
    out, md = tmp_path / "b" / "bench.json", tmp_path / "bench.md"
    main(TINY + ["--top-p", "0.5", "--out", str(out), "--markdown", str(md)])

    results = json.loads(out.read_text())
    assert [r["name"] for r in results["rows"]] == ROWS
    for row in results["rows"]:
        assert row["batch"] == 1
        assert row["ms_per_token"] > 0 and row["loop_ms_per_token"] > 0 and row["tokens_per_second"] > 0
        assert len(row["ms_per_token_runs"]) == 1
    assert [r["name"] for r in results["ratios"]] == [
        "reference VAS (1 head) / valuemix 1 head", "valuemix 4 heads / valuemix 1 head", "valuemix 1 head / plain",
        "valuemix 4 shared-trunk heads / valuemix 1 head", "valuemix 4 shared-trunk heads / valuemix 1 shared-trunk head",
        "valuemix 1 head, top-p 0.5 / plain", "valuemix 1 head, cross-tokenizer path / valuemix 1 head",
        "valuemix 1 head (model.generate) / valuemix 1 head",
        "valuemix 1 head, top-p 0.5 (model.generate) / valuemix 1 head, top-p 0.5",
        "model.generate / own loop, geometric mean of the 8 valuemix rows"]
    sizes = {r["name"]: r["mean_set_size"] for r in results["rows"]}
    assert 1 <= sizes["valuemix 1 head, top-p 0.5"] <= 5 and sizes["valuemix 1 head"] is None
    assert all(r["value"] > 0 for r in results["ratios"])
    training = results["training"]
    assert training["status"] == "ok", training["status"]
    assert training["states"] > 0 and training["states_per_second"] > 0
    assert results["head_size"]["bytes"] > 0 and results["head_size"]["parameters"] > 0
    assert results["machine"]["torch_threads"] >= 1 and results["machine"]["cpu_count"] >= 1

    printed = capsys.readouterr().out
    assert "| valuemix 4 heads | 1 |" in printed
    assert md.read_text() in printed
    assert not list(out.parent.glob(".*.tmp"))  # the atomic write left no temp file


def test_batch_option_adds_rows(tmp_path):
    out = tmp_path / "bench.json"
    results = main(TINY + ["--batch", "1", "2", "--heads", "1", "--no-reference", "--no-train", "--no-hf-generate",
                           "--lora-layers", "0", "--no-cross-tokenizer",
                           "--top-p", "0.5", "--out", str(out)])
    assert [(r["name"], r["batch"]) for r in results["rows"]] == [
        ("plain", 1), ("valuemix 1 head", 1), ("valuemix 1 head, top-p 0.5", 1),
        ("plain", 2), ("valuemix 1 head", 2), ("valuemix 1 head, top-p 0.5", 2)]
    assert results["training"] is None
    assert json.loads(out.read_text())["rows"][5]["tokens_per_second"] > 0
