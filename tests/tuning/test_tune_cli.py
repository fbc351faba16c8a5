"""The `tune` command end to end (CPU), and database parsing of tensor-core records."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tuning.cli import main


def test_list_kernels_prints_partition(capsys):
    assert main(["--arch", "sm_90", "--model", "tiny", "--list-kernels", "--batch-buckets", "8",
                 "--prefill-buckets", "128"]) == 0
    out = capsys.readouterr().out
    assert "decode batch 8: " in out and "prefill chunk 128: " in out
    assert "fused_NT_matmul" in out and "layer_norm" in out and "gemv" in out and "gemm" in out


def test_gpu_arch_without_gpu_or_tracker_says_how_to_attach(capsys):
    assert main(["--arch", "sm_86", "--model", "tiny", "--batch-buckets", "1", "--phases", "decode"]) == 1
    err = capsys.readouterr().err
    assert "cannot measure sm_86 kernels here" in err
    assert "rpc_tracker" in err and "rpc_server" in err and "--rpc-tracker" in err


def test_arch_defaults_to_this_machine_and_says_so(capsys):
    from gpt2_model.device import detect_cuda_arch

    local = detect_cuda_arch()
    assert main(["--model", "tiny", "--list-kernels", "--phases", "decode", "--batch-buckets", "1"]) == 0
    out, err = capsys.readouterr()
    if local is None:
        assert "--arch not given and no CUDA GPU found: tuning for this CPU (--arch cpu)" in err
        assert "tiny q0f16 on cpu:" in out
    else:
        assert f"--arch not given: tuning for this machine's GPU, --arch {local}" in err
        assert f"tiny q0f16 on {local}:" in out


def test_help_uses_the_shared_flag_names():
    from tuning.cli import build_parser

    text = build_parser().format_help()
    assert "--trials-per-task" in text and "--trials 2000" not in text and "--trials 64 " not in text
    for flag in ("--arch", "--quantization", "--wait", "--validate", "--repair"):
        assert flag in text
    assert "default: the local GPU's arch" in text.lower() or "Default: the local GPU's arch" in text


def test_unknown_arch_lists_known_ones(capsys):
    assert main(["--arch", "sm_99", "--list-kernels"]) == 1
    assert "sm_70" in capsys.readouterr().err


@pytest.mark.slow
def test_tune_then_compile_with_database_matches_untuned(tmp_path, capsys):
    """tune -> committed database + meta -> compile with it: every tuned workload found, same logits."""
    from gpt2_model.config import get_config
    from tuning.engine import engine_from_config

    root = tmp_path / "databases"
    args = ["--arch", "cpu", "--model", "tiny", "--quantization", "q0f32", "--phases", "decode",
            "--batch-buckets", "2", "--trials-per-task", "2", "--database-dir", str(root),
            "--work-dir", str(tmp_path / "work")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "committed" in out
    # progress from the first seconds: every phase announced as it starts, in order, then the total
    marks = ["[export]", "[partition]", "[tune]", "[baseline] untuned baseline 1/", "[search]", "[round 1]",
             "[commit]", "[done] tune finished in"]
    where = [err.find(m) for m in marks]
    assert -1 not in where and where == sorted(where), err[-3000:]
    assert "ETA" in err and "trials/min" in err
    db = root / "local" / "cpu" / "tiny-q0f32"  # CPU databases: git-ignored databases/local/
    assert db.is_dir() and not list(root.glob("cpu-*"))
    meta = json.loads((db / "meta.json").read_text())
    assert meta["buckets"] == {"decode": [2]} and meta["quantization"] == "q0f32" and meta["pruned"]
    lines = (db / "database_tuning_record.json").read_text().splitlines()
    assert len(lines) == len({json.loads(line)[0] for line in lines})  # one best record per workload

    config = get_config("tiny")
    untuned = engine_from_config(config, quantization="q0f32", device="cpu", seed=3)
    tuned = engine_from_config(config, quantization="q0f32", device="cpu", seed=3, database=db)
    cov = tuned.build_result.coverage
    assert cov.per_bucket["decode b2"][1] == cov.total  # every task of the bucket was looked up
    assert 0 < cov.tuned <= cov.total
    lines = cov.lines()  # what `gpt2k compile` prints
    assert lines[0] == f"tuned kernels: {cov.tuned} of {cov.total} bucket kernels"
    assert "decode b2:" in lines[1] and "% of the estimated step time" in lines[1]
    assert tuned.buckets == {"decode": [2]}
    seqs, logits = {}, {}
    for key, engine in (("untuned", untuned), ("tuned", tuned)):
        seqs[key] = [engine.add_sequence(), engine.add_sequence()]
        logits[key] = [engine.prefill(s, p) for s, p in zip(seqs[key], ([1, 2, 3], [4, 5]))]
    np.testing.assert_allclose(np.stack(logits["tuned"]), np.stack(logits["untuned"]), rtol=1e-4,
                               atol=1e-4 * np.abs(np.stack(logits["untuned"])).max())
    for _ in range(3):
        toks = [int(np.argmax(x)) for x in logits["untuned"]]
        a = untuned.decode(seqs["untuned"], toks)
        b = tuned.decode(seqs["tuned"], toks)  # batch 2: the tuned bucket function
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
        logits["untuned"], logits["tuned"] = list(a), list(b)

    # A second run of another bucket from a fresh work directory (another machine, say) adds to
    # the committed database: earlier untuned times and the history of runs are kept.
    first_untuned = set(json.loads((db / "untuned.json").read_text()))
    assert first_untuned and all(k.endswith("@b2") for k in first_untuned)
    args2 = list(args)
    args2[args2.index("--batch-buckets") + 1] = "1"
    args2[args2.index("--work-dir") + 1] = str(tmp_path / "work2")
    assert main(args2) == 0
    meta = json.loads((db / "meta.json").read_text())
    assert meta["buckets"] == {"decode": [1, 2]} and [r["buckets"] for r in meta["runs"]] == [
        {"decode": [2]}, {"decode": [1]}]
    both = set(json.loads((db / "untuned.json").read_text()))
    assert first_untuned < both and any(k.endswith("@b1") for k in both)


def test_tensor_core_records_survive_a_fresh_process(tmp_path):
    """A process that never imported the tensor intrinsics must still parse tensor-core traces
    (they were once quarantined as corrupt)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tuning.spaces import sample_candidates
    from tuning.spaces.workloads import linear
    from tuning.targets import make_target

    target = make_target("sm_90")
    func = linear(1, 256, 256, 256)
    cands, _ = sample_candidates(func, target=target, num=2, seed=1, include_dlight=False, only=["gemm_tc"])
    assert cands, "no tensor-core candidate"
    db = ms.database.JSONDatabase(str(tmp_path / "database_workload.json"),
                                  str(tmp_path / "database_tuning_record.json"), allow_missing=True)
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    workload = db.commit_workload(mod)
    args_info = ms.arg_info.ArgInfo.from_prim_func(func)
    for i, cand in enumerate(cands):
        db.commit_tuning_record(ms.database.TuningRecord(cand.trace, workload, [1e-5 * (i + 1)], target, args_info))
    assert "wmma" in str(cands[0].trace)  # a tensor-core trace: it names registered intrinsics
    script = (
        "import sys; from tuning.database import open_database; from tuning.targets import make_target;"
        f"db = open_database({str(tmp_path)!r}, target=make_target('sm_90'));"
        "print(len(db.get_all_tuning_records()))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(len(cands))
    assert not (tmp_path / "database_tuning_record.json.quarantine").exists()
