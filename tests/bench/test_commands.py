"""End-to-end tests of bench decode / prefill / kernels on the tiny preset (CPU, llvm, q0f32).

One tiny library is built for the whole session (shared cache directory); every later engine
is a cache hit. Runs are kept minimal: gen-len 4, repeats 2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import report
from bench.cli import main
from bench.config import BenchConfig
from bench.roofline import prefill_flops
from bench.tables import format_kernel_table, format_table
from gpt2_model.config import get_config

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TINY = dict(model="tiny", quantization="q0f32", device="cpu", repeats=2, warmup=1)


def _cfg(**kw) -> BenchConfig:
    """The tiny CPU run; the step anatomy (each kernel compiled and timed alone) only where a test asks."""
    return BenchConfig(**{**TINY, "anatomy": False, **kw})


def _weight_bytes_fp32(cfg) -> int:
    d, inner, v, n = cfg.n_embd, cfg.n_inner, cfg.vocab_size, cfg.n_layer
    per_layer = 2 * d + 3 * d * d + 3 * d + d * d + d + 2 * d + inner * d + inner + d * inner + d
    return 4 * (v * d + n * per_layer + 2 * d)  # wte (tied head) + layers + ln_f; wpe not read


def _hf(params):
    from bench.peers import build_hf_model

    return build_hf_model(get_config("tiny"), params=params, dtype="float32", device="cpu")


# ---------------------------------------------------------------------------------------------- runners
def test_runners_compute_the_model(tiny_engine):
    """What the benchmark times is the real computation: runner logits equal HF's."""
    from bench.runners import TvmDecodeRunner, TvmPrefillRunner

    built, params = tiny_engine
    engine = built.engine
    model = _hf(params)
    dec = TvmDecodeRunner(engine, variant="untuned", seed=7)
    assert dec.path == "token-steps"  # the device-resident step (ids in, greedy ids out)
    dec.start(batch=2, prompt_len=6, gen_len=2)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 1000, 6) for _ in range(2)]
    nxt = rng.integers(0, 1000, 2)
    first = dec.step().numpy().reshape(-1).tolist()
    second = dec.step().numpy().reshape(-1).tolist()  # fed from the device: the first step's ids
    dec.stop()
    with torch.no_grad():
        for i in range(2):
            ids = list(prompts[i]) + [int(nxt[i])]
            for out in (first, second):
                ref = model(torch.tensor([ids])).logits[0, -1].numpy()
                top2 = np.sort(ref)[-2:]
                assert top2[1] - top2[0] > 1e-3 * np.abs(ref).max()  # an unambiguous greedy choice
                assert out[i] == int(ref.argmax())
                ids.append(out[i])
    pre = TvmPrefillRunner(engine, variant="untuned", seed=3)
    pre.prepare(batch=2, seq_len=40)
    ids = pre._ids[-1].copy()
    out = pre.run().numpy().reshape(-1)
    pre.cleanup()
    with torch.no_grad():
        ref = model(torch.tensor([ids.tolist()])).logits[0, -1].numpy()
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    assert engine._lengths == {}  # every sequence was removed


def test_library_cache_hit(tiny_engine, bench_cache, monkeypatch):
    from bench.build import load_engine
    from tuning.engine import target_for

    built, params = tiny_engine

    def no_export(*_a, **_k):
        raise AssertionError("a cache hit must not export the model again")

    monkeypatch.setattr("gpt2_model.export.export_model", no_export)
    again = load_engine(config=get_config("tiny"), quantization="q0f32", device="cpu", target=target_for("cpu"),
                        params_fp32=params, cache_dir=bench_cache)
    assert again.info["cache_hit"] and again.info["build_s"] == 0.0
    assert again.info["key"] == built.info["key"]
    meta = json.loads((bench_cache / again.info["key"] / "meta.json").read_text())
    assert meta["quantization"] == "q0f32" and meta["database_hash"] is None and meta["tvm"]
    assert meta["export_metadata"]["params"] and meta["export_metadata"]["quantization"] == "q0f32"
    # the engine opened from the recorded metadata computes what the built one does
    ids = np.arange(7) % get_config("tiny").vocab_size
    a, b = built.engine.add_sequence(), again.engine.add_sequence()
    np.testing.assert_array_equal(np.asarray(again.engine.prefill(b, ids)), np.asarray(built.engine.prefill(a, ids)))
    built.engine.remove_sequence(a)
    again.engine.remove_sequence(b)


# ---------------------------------------------------------------------------------------------- decode
def test_decode_sweep_end_to_end(bench_cache, empty_db_dir):
    from bench.decode import run_decode

    messages = []
    res = run_decode(_cfg(variants="untuned,tuned,torch-eager", database_dir=str(empty_db_dir),
                          cache_dir=str(bench_cache), anatomy=True), batch="1,2", prompt_len=8, gen_len=4,
                     log=messages.append)
    report.validate_result(res)
    assert res["command"] == "decode"
    # no database: tuned dropped, said plainly with the tune command, in the result and the log
    assert [r["variant"] for r in res["rows"]] == ["untuned", "untuned", "torch-eager", "torch-eager"]
    assert any("tune --arch cpu --model tiny --quantization q0f32" in n for n in res["notes"])
    assert any("tune --arch cpu" in m for m in messages)
    cfg = get_config("tiny")
    for r in res["rows"]:
        assert r["status"] == "ok", r["error"]
        b = r["batch"]
        assert r["test"] == f"tg4@b{b}"
        # per-run tokens/s follow from the per-run wall ms/step (4 steps per run, 2 runs)
        per_step = np.array(r["samples"]["wall_ms"])
        assert per_step.shape == (2,)
        assert np.allclose(r["samples"]["tok_s"], b * 4 / (4 * per_step / 1e3))
        assert r["gpu_ms"] is None  # CPU: no GPU time
        assert r["tok_s"]["median"] > 0 and r["ms"]["median"] > 0
        kv = 2 * cfg.n_layer * cfg.n_embd * 4 * b * (8 + 2.5)
        assert r["bytes_per_step"] == pytest.approx(_weight_bytes_fp32(cfg) + kv)
        assert r["gb_s"] == pytest.approx(r["bytes_per_step"] / (r["ms"]["median"] / 1e3) / 1e9)
        assert r["pct_bw"] is None  # no peak known for a CPU
    unt = [r for r in res["rows"] if r["variant"] == "untuned"]
    assert all(r["speedup_vs_untuned"] == pytest.approx(1.0) for r in unt)
    # step anatomy: the kernel sum covers every kernel launch of the step's partition (counted independently
    # here), and the overhead is wall - kernels (on a loaded CPU either may be the larger: no order asserted)
    from tuning.engine import target_for
    from tuning.partition import partition

    for r in unt:
        tasks = partition(cfg, quantization="q0f32", target=target_for("cpu"), buckets={"decode": [r["batch"]]})
        assert r["anatomy"]["kernels"] == len(tasks) and r["anatomy"]["calls"] == sum(t.weight for t in tasks)
        assert r["anatomy"]["method"] == "time_evaluator" and np.isfinite(r["kernels_ms"]) and r["kernels_ms"] > 0
        assert r["overhead_ms"] == pytest.approx(r["ms"]["median"] - r["kernels_ms"])
    eager_rows = [r for r in res["rows"] if r["variant"] == "torch-eager"]
    assert all(r["kernels_ms"] is None and r["build"]["torch_threads"] >= 1 for r in eager_rows)
    table = format_table(res)
    title, _, head = table.splitlines()[:3]
    assert "overhead ms" in head and "GPU ms" not in head  # no always-empty GPU column on a CPU
    assert title.startswith("tiny q0f32 on cpu") and "CUDA graphs" not in title
    assert table.count("torch-eager: PyTorch on the CPU with 1 thread") <= 1
    check = unt[0]["build"]["check"]
    assert check["ok"] and check["reference"] == "hf-fp32-cpu" and check["rel_err"] < 1e-4
    eager = [r for r in res["rows"] if r["variant"] == "torch-eager"]
    for e, u in zip(eager, unt):
        assert e["speedup_vs_untuned"] == pytest.approx(e["tok_s"]["median"] / u["tok_s"]["median"])
    assert res["env"]["device"] == "cpu" and res["env"]["cpu"]["model"]


def test_torch_compile_failure_is_a_row(bench_cache, empty_db_dir, monkeypatch):
    from bench.decode import run_decode

    def broken_compile(model, **kw):
        def fwd(*a, **k):
            raise RuntimeError("inductor exploded\n  long traceback here")
        return fwd

    monkeypatch.setattr(torch, "compile", broken_compile)
    res = run_decode(_cfg(variants="hf-compile", database_dir=str(empty_db_dir), cache_dir=str(bench_cache)),
                     batch=1, prompt_len=4, gen_len=2, log=lambda m: None)
    report.validate_result(res)
    (row,) = res["rows"]
    assert row["status"] == "error" and row["error"] == "RuntimeError: inductor exploded"
    assert "RuntimeError: inductor exploded" in format_table(res)


def test_gpt_fast_peer_is_the_torch_compile_variant(bench_cache, empty_db_dir, monkeypatch):
    """torch-compile runs bench/gptfast.py's GPT-2 (here with torch.compile a no-op, so the CPU test
    stays quick): checked against HF's logits before timing, greedy ids fed back on the device."""
    from bench.decode import run_decode
    from bench.prefill import run_prefill

    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: fn)
    res = run_decode(_cfg(variants="torch-compile", database_dir=str(empty_db_dir), cache_dir=str(bench_cache)),
                     batch="1,2", prompt_len=6, gen_len=3, log=lambda m: None)
    report.validate_result(res)
    for r in res["rows"]:
        assert r["status"] == "ok", r["error"]
        assert r["build"]["peer"].startswith("gpt-fast") and r["build"]["check"]["ok"]
        assert r["build"]["check"]["reference"] == "hf-fp32-cpu" and r["build"]["check"]["rel_err"] < 1e-4
        assert r["build"]["torch_threads"] >= 1
    pre = run_prefill(_cfg(variants="torch-compile", database_dir=str(empty_db_dir), cache_dir=str(bench_cache)),
                      seq_len=16, log=lambda m: None)
    report.validate_result(pre)
    assert pre["rows"][0]["status"] == "ok", pre["rows"][0]["error"]


# ---------------------------------------------------------------------------------------------- prefill
def test_prefill_sweep_end_to_end(bench_cache, empty_db_dir):
    from bench.prefill import run_prefill

    res = run_prefill(_cfg(variants="untuned,torch-eager", database_dir=str(empty_db_dir), cache_dir=str(bench_cache)),
                      seq_len="16,32", batch="1,2", log=lambda m: None)
    report.validate_result(res)
    tests = [(r["variant"], r["test"]) for r in res["rows"]]
    assert tests == [(v, t) for v in ("untuned", "torch-eager") for t in ("pp16", "pp32", "pp16@b2", "pp32@b2")]
    cfg = get_config("tiny")
    for r in res["rows"]:
        assert r["status"] == "ok", r["error"]
        assert r["flops"] == prefill_flops(cfg, batch=r["batch"], seq_len=r["seq_len"])
        assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"]["median"] / 1e3) / 1e12)
        assert np.allclose(r["samples"]["tok_s"], r["batch"] * r["seq_len"] / (np.array(r["samples"]["wall_ms"]) / 1e3))


# ---------------------------------------------------------------------------------------------- kernels
def test_kernels_end_to_end(empty_db_dir):
    from bench.kernels import run_kernels
    from tuning.engine import target_for
    from tuning.partition import partition

    res = run_kernels(_cfg(repeats=2, database_dir=str(empty_db_dir)), phase="decode", batch=2, log=lambda m: None)
    report.validate_result(res)
    tasks = partition(get_config("tiny"), quantization="q0f32", target=target_for("cpu"), buckets={"decode": [2]})
    assert sorted(r["name"] for r in res["rows"]) == sorted(t.kernel for t in tasks)
    assert all(r["status"] == "ok" for r in res["rows"]), [r["error"] for r in res["rows"]]
    assert sum(r["share"] for r in res["rows"]) == pytest.approx(1.0)
    assert all(r["untuned_us"] > 0 and r["tuned_us"] is None for r in res["rows"])
    # every matmul kernel is timed as the untuned library runs it: its symbolic-shape twin
    assert all(r["untuned_from"].startswith("symbolic:") for r in res["rows"] if "matmul" in r["name"])
    for r in res["rows"]:
        unit = "TFLOP/s" if r["kind"] == "gemm" else "GB/s"
        assert r["achieved"] == unit and r["achieved_value"] > 0
    assert any("tune --arch cpu" in n for n in res["notes"])
    table = format_kernel_table(res)
    assert all(r["name"][:12] in table for r in res["rows"])
    assert max(len(x) for x in table.splitlines() if x.startswith("|")) <= 120
    assert "peer" not in table.splitlines()[2]  # no cuBLAS/SDPA column on a CPU


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_decode_json_and_plot(tmp_path, bench_cache, empty_db_dir, capsys):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["decode", "--model", "tiny", "--device", "cpu", "--batch", "1,2",  # default quantization: q0f32 on CPU
               "--prompt-len", "8", "--gen-len", "4", "--repeats", "2", "--variants", "untuned,tuned",
               "--database-dir", str(empty_db_dir), "--cache-dir", str(bench_cache),
               "--json", str(out_json), "--plot", str(out_png)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "tg4@b1" in cap.out and "tg4@b2" in cap.out and "tok/s" in cap.out
    assert "tune --arch cpu --model tiny --quantization q0f32" in cap.out  # note under the table
    doc = report.read_json(out_json)
    assert len(doc["rows"]) == 2 and doc["args"]["batch"] == [1, 2]
    assert doc["args"]["quantization"] == "q0f32" and all(r["quantization"] == "q0f32" for r in doc["rows"])
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_cli_refuses_database_of_another_arch(tmp_path, bench_cache, capsys):
    from tuning.database import database_path

    root = tmp_path / "databases"
    path = database_path(root, arch="cpu", model="tiny", quantization="q0f32")
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"target": {"kind": "cuda", "arch": "sm_90"}}))
    (path / "database_workload.json").write_text("")
    (path / "database_tuning_record.json").write_text("")
    rc = main(["decode", "--model", "tiny", "--quantization", "q0f32", "--device", "cpu", "--gen-len", "2",
               "--batch", "1", "--database-dir", str(root), "--cache-dir", str(bench_cache)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "sm_90" in err and "cpu" in err and "bench: error:" in err


@pytest.mark.parametrize("argv, message", [
    (["decode", "--prompt-len", "250", "--gen-len", "10"], "exceeds the context window"),
    (["decode", "--device", "cuda:7"], "no CUDA device 7"),
    (["prefill", "--seq-len", "16,x"], "comma-separated positive integers"),
    (["decode", "--variants", "fastest"], "unknown variant"),
    (["decode", "--quantization", "q3"], "invalid choice: 'q3'"),
])
def test_cli_bad_options_exit_2(argv, message, capsys, empty_db_dir):
    import tvm

    if "cuda:7" in argv and tvm.cuda(7).exist:
        pytest.skip("this machine has a CUDA device 7")
    rc = main(argv + ["--model", "tiny", "--database-dir", str(empty_db_dir)]
              + ([] if "--device" in argv else ["--device", "cpu"]))
    assert rc == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- tuned
@pytest.mark.slow  # tune -> compile with the database -> bench, logits checked (~110 s with its fixture, loaded 2-core machine)
def test_tuned_variant_end_to_end(tiny_db_root, bench_cache):
    """With a database: untuned and tuned in one run, the tuned build has the bucket entry points,
    passes the logits check, and the speedup is the ratio of the medians."""
    from bench.decode import run_decode
    from tuning.database import database_path

    res = run_decode(_cfg(variants="untuned,tuned", database_dir=str(tiny_db_root), cache_dir=str(bench_cache)),
                     batch="1,2", prompt_len=8, gen_len=4, log=lambda m: None)
    report.validate_result(res)
    path = str(database_path(tiny_db_root, arch="cpu", model="tiny", quantization="q0f32"))
    assert res["env"]["database"]["path"] == path and len(res["env"]["database"]["hash"]) == 64
    rows = {(r["variant"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {("untuned", 1), ("untuned", 2), ("tuned", 1), ("tuned", 2)}
    assert all(r["status"] == "ok" for r in rows.values()), [r["error"] for r in rows.values()]
    tuned = rows[("tuned", 2)]
    assert tuned["build"]["database"]["path"] == path
    assert tuned["build"]["buckets"] == {"decode": [2]} and rows[("untuned", 2)]["build"]["buckets"] == {}
    assert tuned["build"]["check"]["ok"]
    for b in (1, 2):
        assert rows[("tuned", b)]["speedup_vs_untuned"] == pytest.approx(
            rows[("tuned", b)]["tok_s"]["median"] / rows[("untuned", b)]["tok_s"]["median"])
    assert not any("tune --arch" in n for n in res["notes"])
    # batch 1 is not a tuned bucket: said on its row (n of m kernels tuned, in table and JSON); batch 2 is
    assert any("decode batch 1 not among the database's buckets" in n for n in rows[("tuned", 1)]["notes"])
    assert not any("not among" in n for n in rows[("tuned", 2)]["notes"])
    tk = rows[("tuned", 2)]["tuned_kernels"]
    assert tk is not None and 0 <= tk["tuned"] <= tk["total"] and tk["total"] > 0 and 0.0 <= tk["share"] <= 1.0
    assert f"tuned {tk['tuned']}/{tk['total']}" in format_table(res)


@pytest.mark.slow  # shares the tuned database fixture of the test above (tune -> compile -> kernels)
def test_kernels_with_database(tiny_db_root):
    from bench.kernels import run_kernels

    res = run_kernels(_cfg(repeats=2, database_dir=str(tiny_db_root)), phase="decode", batch=2, log=lambda m: None)
    report.validate_result(res)
    assert all(r["status"] == "ok" for r in res["rows"]), [r["error"] for r in res["rows"]]
    for r in res["rows"]:
        assert r["tuned_us"] > 0 and isinstance(r["tuned_record"], bool)
        assert r["speedup"] == pytest.approx(r["untuned_us"] / r["tuned_us"])
        assert any("tuned output matches untuned" in n for n in r["notes"])
    assert sum(r["share_tuned"] for r in res["rows"]) == pytest.approx(1.0)


def test_kernels_names_template_kernels_of_the_bucket(tmp_path):
    """A database whose norm_gemv.json replaces kernels of the bucket: bench kernels says so (its
    rows are the partition's kernels, not all of which the tuned build then runs)."""
    import json  # pylint: disable=import-outside-toplevel

    from bench.kernels import _template_kernels  # pylint: disable=import-outside-toplevel

    (tmp_path / "norm_gemv.json").write_text(json.dumps({"kernels": {
        "b8_k768_n2304_bias": {"config": {"warps": 4, "rows": 1}},
        "b1_k768_n2304_bias": {"config": {"warps": 4, "rows": 1}}}}))
    assert _template_kernels(tmp_path, phase="decode", bucket=8) == ["b8_k768_n2304_bias"]
    assert _template_kernels(tmp_path, phase="prefill", bucket=8) == []
    assert _template_kernels(tmp_path / "none", phase="decode", bucket=8) == []
