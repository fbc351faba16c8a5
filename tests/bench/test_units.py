"""Unit tests of the bench layers that need no compiled model: env, timing, report, cache keys,
database lookup, FLOP/byte counts, the PyTorch peers."""

from __future__ import annotations

import json
import sys
import time
import types

import numpy as np
import pytest

from bench import env as envmod
from bench import report
from bench.build import DatabaseError, locate_database, library_key
from bench.checks import check_logits
from bench.config import BenchConfig, BenchError, parse_variants, positive_ints
from bench.roofline import decode_bytes, prefill_flops
from bench.timing import Timer, stats
from gpt2_model.config import get_config


# ---------------------------------------------------------------------------------------------- env
def test_peak_table_lookup_finds_every_entry_and_picks_the_dtype_column():
    """Every table entry is reachable by its own match string (no earlier, less specific entry
    shadows it), and the dtype selects the tensor-core fp16 or the plain fp32 column."""
    for sub, display, bw, f16, f32 in envmod.PEAK_TABLE:
        p16 = envmod.peak_for(f"NVIDIA {sub}", dtype="float16")
        p32 = envmod.peak_for(f"NVIDIA {sub}", dtype="float32")
        assert p16.name == display, (sub, p16.name)
        assert (p16.mem_gb_s, p16.tflops, p32.tflops) == (bw, f16, f32)
        assert bw > 0 and f16 > 0 and f32 > 0
    assert envmod.peak_for("nvidia h200", dtype="bfloat16").tflops == envmod.peak_for("NVIDIA H200").tflops


def test_unknown_device_has_no_peak_and_overrides_win():
    assert envmod.peak_for("AMD EPYC 7B13") is None
    assert envmod.peak_for(None) is None
    cpu_env = {"gpu": None}
    assert envmod.resolve_peak(cpu_env, dtype="float32") is None
    p = envmod.resolve_peak(cpu_env, dtype="float32", peak_bw=100.0)
    assert p.mem_gb_s == 100.0 and p.tflops is None
    gpu_env = {"gpu": {"name": "NVIDIA H100 80GB HBM3"}}
    p = envmod.resolve_peak(gpu_env, dtype="float16", peak_tflops=500.0)
    assert (p.mem_gb_s, p.tflops) == (3350.0, 500.0)
    with pytest.raises(ValueError, match="positive"):
        envmod.resolve_peak(gpu_env, dtype="float16", peak_bw=-1.0)


def test_resolve_device():
    import tvm

    assert envmod.resolve_device("cpu") == envmod.DeviceSpec("cpu", 0)
    auto = envmod.resolve_device("auto")
    assert auto.kind == ("cuda" if tvm.cuda(0).exist else "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu:0'"):
        envmod.resolve_device("tpu:0")
    if not tvm.cuda(0).exist:
        with pytest.raises(ValueError, match="no CUDA device 0"):
            envmod.resolve_device("cuda:0")


def test_throttle_reason_bits():
    assert envmod.decode_throttle_reasons(0) == []
    assert envmod.decode_throttle_reasons(0x4 | 0x40) == ["SwPowerCap", "HwThermalSlowdown"]
    assert envmod.decode_throttle_reasons(0x1000 | 0x1) == ["GpuIdle", "other(0x1000)"]


def test_nvml_snapshot_reads_and_never_sets(monkeypatch):
    """A fake pynvml records every call: the snapshot maps units and calls no setter."""
    calls = []

    def rec(name, value):
        def f(*args):
            calls.append(name)
            return value
        return f

    fake = types.ModuleType("pynvml")
    fake.NVML_CLOCK_SM, fake.NVML_CLOCK_MEM, fake.NVML_TEMPERATURE_GPU = 1, 2, 0
    clocks = {1: 1980, 2: 2619}
    fake.nvmlInit = rec("nvmlInit", None)
    fake.nvmlShutdown = rec("nvmlShutdown", None)
    fake.nvmlDeviceGetHandleByIndex = rec("nvmlDeviceGetHandleByIndex", "h")
    fake.nvmlDeviceGetHandleByUUID = rec("nvmlDeviceGetHandleByUUID", "h")
    fake.nvmlDeviceGetName = rec("nvmlDeviceGetName", b"NVIDIA H100 80GB HBM3")
    fake.nvmlDeviceGetUUID = rec("nvmlDeviceGetUUID", "GPU-1234")
    fake.nvmlSystemGetDriverVersion = rec("nvmlSystemGetDriverVersion", "550.54.15")
    fake.nvmlSystemGetCudaDriverVersion = rec("nvmlSystemGetCudaDriverVersion", 12040)
    fake.nvmlDeviceGetClockInfo = lambda h, kind: (calls.append("clock"), clocks[kind])[1]
    fake.nvmlDeviceGetMaxClockInfo = lambda h, kind: (calls.append("maxclock"), clocks[kind] + 1)[1]
    fake.nvmlDeviceGetTemperature = rec("nvmlDeviceGetTemperature", 41)
    fake.nvmlDeviceGetPowerUsage = rec("nvmlDeviceGetPowerUsage", 123456)
    fake.nvmlDeviceGetEnforcedPowerLimit = rec("nvmlDeviceGetEnforcedPowerLimit", 700000)
    fake.nvmlDeviceGetMemoryInfo = rec("nvmlDeviceGetMemoryInfo", types.SimpleNamespace(total=80 << 30))
    fake.nvmlDeviceGetCudaComputeCapability = rec("nvmlDeviceGetCudaComputeCapability", (9, 0))
    fake.nvmlDeviceGetCurrentClocksEventReasons = rec("nvmlDeviceGetCurrentClocksEventReasons", 0x4)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    snap = envmod.nvml_snapshot(0)
    assert snap["name"] == "NVIDIA H100 80GB HBM3"
    assert snap["driver"] == "550.54.15"
    assert (snap["sm_clock_mhz"], snap["mem_clock_mhz"]) == (1980, 2619)
    assert snap["power_w"] == pytest.approx(123.456)
    assert snap["power_limit_w"] == pytest.approx(700.0)
    assert snap["memory_total_mib"] == 80 * 1024
    assert snap["compute_capability"] == "9.0"
    assert snap["throttle_reasons"] == ["SwPowerCap"]
    assert not [c for c in calls if "Set" in c]
    assert calls[0] == "nvmlInit" and calls[-1] == "nvmlShutdown"


def test_collect_env_cpu():
    e = envmod.collect_env(envmod.DeviceSpec("cpu"), database={"path": "x", "hash": "y"})
    assert e["device"] == "cpu" and e["arch"] == "cpu" and e["gpu"] is None
    assert e["cpu"]["model"] and e["cpu"]["logical_cores"] >= 1
    assert e["versions"]["tvm"] and e["database"] == {"path": "x", "hash": "y"}
    json.dumps(e)  # JSON-ready


def test_engine_settings_from_the_environment_are_recorded_and_shown(monkeypatch):
    from bench.tables import _header  # pylint: disable=import-outside-toplevel

    monkeypatch.delenv("GPT2K_STEP_MARK", raising=False)
    assert envmod.collect_env(envmod.DeviceSpec("cpu"))["settings"] == {"GPT2K_STEP_MARK": "1"}  # the default
    monkeypatch.setenv("GPT2K_STEP_MARK", "0")
    monkeypatch.setenv("GPT2K_UNRELATED", "x")
    e = envmod.collect_env(envmod.DeviceSpec("cpu"))
    assert e["settings"] == {"GPT2K_STEP_MARK": "0"}
    row = {"model": "gpt2", "quantization": "q0f16", "device": "cuda:0", "arch": "sm_90"}
    line = _header({"rows": [row], "env": e, "command": "decode", "args": {"cuda_graph": True}, "timer": "cuda-events"})
    assert "CUDA graphs on, GPT2K_STEP_MARK=0, timer cuda-events" in line


# ---------------------------------------------------------------------------------------------- timing
def test_stats_match_numpy_percentiles():
    data = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    s = stats(data)
    assert s.median == pytest.approx(np.median(data))
    assert s.p20 == pytest.approx(np.percentile(data, 20))
    assert s.p80 == pytest.approx(np.percentile(data, 80))
    assert (s.min, s.max, s.n) == (1.0, 10.0, 6)
    inv = s.map(lambda x: 1.0 / x)  # decreasing: percentiles swap
    assert inv.p20 == pytest.approx(1.0 / s.p80) and inv.p80 == pytest.approx(1.0 / s.p20)
    assert inv.p20 <= inv.median <= inv.p80
    with pytest.raises(ValueError):
        stats([])
    with pytest.raises(ValueError):
        stats([1.0, float("nan")])


def test_cpu_timer_measures_wall_time():
    t = Timer(kind="cpu")
    ms = t.wall(lambda: time.sleep(0.02))
    assert 19.0 <= ms < 500.0
    run = t.steps(lambda: time.sleep(0.005), 3)
    assert run.gpu_ms is None and 14.0 <= run.wall_ms < 500.0
    assert t.call(lambda: None).gpu_ms is None


# ---------------------------------------------------------------------------------------------- report
def _row(variant, test, tok, status="ok"):
    from bench.loop import make_row

    s = types.SimpleNamespace(model_label="tiny", quantization="q0f32", device=envmod.DeviceSpec("cpu"), arch="cpu")
    if status != "ok":
        return make_row(s, variant=variant, phase="decode", batch=int(test.split("@b")[1]), prompt_len=8,
                        gen_len=4, seq_len=None, status=status, error="RuntimeError: boom\nmore")
    st = stats(tok).to_dict()
    ms = stats([1e3 / t for t in tok]).to_dict()
    return make_row(s, variant=variant, phase="decode", batch=int(test.split("@b")[1]), prompt_len=8, gen_len=4,
                    seq_len=None, tok_s=st, ms=ms, samples={"wall_ms": [1.0], "gpu_ms": None, "tok_s": tok})


def _doc(rows, command="decode"):
    return report.make_result(command=command, args={}, env={"gpu": None}, peak=None, timer="perf_counter",
                              rows=rows, notes=["a note"])


def test_speedups_table_and_json_roundtrip(tmp_path):
    rows = [_row("untuned", "tg4@b1", [100.0, 110.0, 90.0]), _row("tuned", "tg4@b1", [200.0, 220.0, 180.0]),
            _row("torch-eager", "tg4@b2", [50.0]), _row("torch-compile", "tg4@b1", [], status="error")]
    report.add_speedups(rows)
    assert rows[0]["speedup_vs_untuned"] == pytest.approx(1.0)
    assert rows[1]["speedup_vs_untuned"] == pytest.approx(2.0)
    assert rows[2]["speedup_vs_untuned"] is None  # no untuned row for tg4@b2
    assert rows[3]["speedup_vs_untuned"] is None
    doc = _doc(rows)
    report.validate_result(doc)
    from bench.tables import format_table

    table = format_table(doc)
    assert "2.00x" in table and "tg4@b1" in table and "ERROR" in table and "RuntimeError: boom" in table
    assert "more" not in table  # first line only
    assert "note: a note" in table
    path = tmp_path / "sub" / "r.json"
    report.write_json(doc, path)
    back = report.read_json(path)
    assert back["rows"][1]["tok_s"]["median"] == pytest.approx(200.0)


def test_validate_rejects_bad_documents():
    good = _doc([_row("untuned", "tg4@b1", [100.0, 120.0])])
    report.validate_result(good)
    bad = json.loads(json.dumps(good))
    del bad["rows"][0]["gb_s"]
    with pytest.raises(ValueError, match="missing"):
        report.validate_result(bad)
    bad = json.loads(json.dumps(good))
    bad["rows"][0]["tok_s"]["p20"] = 1e9
    with pytest.raises(ValueError, match="out of order"):
        report.validate_result(bad)
    bad = json.loads(json.dumps(good))
    bad["schema"] = "other/9"
    with pytest.raises(ValueError, match="schema"):
        report.validate_result(bad)
    bad = json.loads(json.dumps(good))
    del bad["env"]
    with pytest.raises(ValueError, match="env"):
        report.validate_result(bad)


def test_plot_sweep_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row(v, f"tg4@b{b}", [b * k, b * k * 1.1]) for v, k in (("untuned", 10.0), ("tuned", 20.0))
            for b in (1, 2, 4)]
    out = report.plot_sweep(_doc(rows), tmp_path / "p.png")
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="nothing to plot"):
        report.plot_sweep(_doc([_row("untuned", "tg4@b1", [], status="error")]), tmp_path / "q.png")


def test_test_labels():
    assert report.test_label(phase="decode", batch=8, prompt_len=128, gen_len=128) == "tg128@b8"
    assert report.test_label(phase="prefill", batch=1, seq_len=1024) == "pp1024"
    assert report.test_label(phase="prefill", batch=4, seq_len=512) == "pp512@b4"


# ---------------------------------------------------------------------------------------------- options
def test_option_parsing():
    assert positive_ints("1,8,32", name="batch") == [1, 8, 32]
    assert positive_ints(8, name="batch") == [8]
    assert positive_ints("8,1,8", name="batch") == [8, 1]
    with pytest.raises(BenchError, match="--batch"):
        positive_ints("1,x", name="batch")
    with pytest.raises(BenchError, match="positive"):
        positive_ints("0", name="batch")
    assert parse_variants(None, device_kind="cpu") == ["untuned", "tuned", "torch-eager"]
    assert parse_variants(None, device_kind="cuda") == ["untuned", "tuned", "torch-eager", "torch-compile"]
    assert parse_variants("untuned,tuned,torch", device_kind="cpu") == \
        ["untuned", "tuned", "torch-eager", "torch-compile"]
    assert parse_variants("hf-compile,gpt-fast", device_kind="cpu") == ["hf-compile", "torch-compile"]
    with pytest.raises(BenchError, match="unknown variant"):
        parse_variants("fast", device_kind="cpu")
    with pytest.raises(BenchError, match="--repeats"):
        BenchConfig(repeats=0)
    with pytest.raises(BenchError, match="--torch-threads"):
        BenchConfig(torch_threads=0)
    cfg = BenchConfig(model="tiny", arch="auto")
    assert cfg.arch is None and cfg.to_dict()["model"] == "tiny" and "extra" not in cfg.to_dict()


# ---------------------------------------------------------------------------------------------- cache / db
def test_library_key_changes_with_every_input():
    import tvm

    cfg = get_config("tiny")
    tgt = tvm.target.Target({"kind": "llvm"})
    base = dict(config=cfg, quantization="q0f32", target=tgt, database_hash=None, cuda_graph=False, code_hash="c")
    k0, parts = library_key(**base)
    assert library_key(**base)[0] == k0
    assert parts["tvm"].startswith(tvm.__version__)
    for change in (dict(quantization="q0f16"), dict(database_hash="abc"), dict(cuda_graph=True),
                   dict(code_hash="d"), dict(config=get_config("tiny", n_layer=3)),
                   dict(target=tvm.target.Target({"kind": "llvm", "mcpu": "skylake"}))):
        assert library_key(**{**base, **change})[0] != k0, change


def test_library_key_names_the_pdl_mode(monkeypatch):
    """GPT2K_PDL off, 1, wait and late are four libraries on sm_90 (off and 1 keyed False / True, as the
    libraries cached since 2026-12-07); on a CPU target the setting changes nothing."""
    from tuning.engine import target_for
    from tuning.pdl import PDL_ENV

    sm90 = dict(config=get_config("tiny"), quantization="q0f16", target=target_for("cuda", "sm_90"),
                database_hash=None, cuda_graph=True, code_hash="c")
    keys = {}
    for value, part in (("0", False), ("1", True), ("wait", "wait"), ("late", "late")):
        monkeypatch.setenv(PDL_ENV, value)
        keys[value], parts = library_key(**sm90)
        assert parts["pdl"] == part
    assert len(set(keys.values())) == 4
    cpu = dict(sm90, quantization="q0f32", target=target_for("cpu"), cuda_graph=False)
    assert library_key(**cpu)[1]["pdl"] is False  # (still wait from the loop)


def test_missing_database_names_the_tune_command(empty_db_dir):
    from tuning.engine import target_for

    sm90 = target_for("cuda", "sm_90")
    db, msg = locate_database(database_dir=empty_db_dir, model="gpt2", quantization="q0f16", target=sm90)
    assert db is None
    assert str(empty_db_dir / "sm_90" / "gpt2-q0f16") in msg and "untuned build only" in msg
    assert "tune --arch sm_90 --model gpt2 --quantization q0f16" in msg
    with pytest.raises(DatabaseError, match="--database .*nope"):
        locate_database(database_dir=empty_db_dir, model="tiny", quantization="q0f32", target=target_for("cpu"),
                      explicit=empty_db_dir / "nope")


def test_database_of_another_arch_is_refused(empty_db_dir):
    """bench opens databases through tuning.database.TunedDatabase: its identity refusal (naming
    the field) becomes one DatabaseError, for meta.json's arch and for its target."""
    from tuning.database import database_path
    from tuning.engine import target_for

    cpu = target_for("cpu")
    path = database_path(empty_db_dir, arch="cpu", model="tiny", quantization="q0f32")
    path.mkdir(parents=True)
    (path / "database_workload.json").write_text("")
    (path / "database_tuning_record.json").write_text("")
    (path / "meta.json").write_text(json.dumps({"arch": "sm_90", "model": "tiny", "quantization": "q0f32"}))
    with pytest.raises(DatabaseError, match="refused: .*arch.*sm_90"):
        locate_database(database_dir=empty_db_dir, model="tiny", quantization="q0f32", target=cpu)
    (path / "meta.json").write_text(json.dumps({"target": {"kind": "cuda", "arch": "sm_86"}}))
    with pytest.raises(DatabaseError, match="refused: .*sm_86"):
        locate_database(database_dir=empty_db_dir, model="tiny", quantization="q0f32", target=cpu)
    (path / "meta.json").write_text(json.dumps({"arch": "cpu", "quantization": "q0f16"}))
    with pytest.raises(DatabaseError, match="quantization"):
        locate_database(database_dir=empty_db_dir, model="tiny", quantization="q0f32", target=cpu)


# ---------------------------------------------------------------------------------------------- figures
def test_prefill_flops_against_torch_flop_counter():
    """Linear + LM-head FLOPs agree with torch's FlopCounterMode on the HF model; attention is
    counted causally here and fully there, so that term is compared separately."""
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from bench.peers import build_hf_model, random_params

    cfg = get_config("tiny")
    model = build_hf_model(cfg, params=random_params(cfg, seed=0), dtype="float32", device="cpu")
    model.config._attn_implementation = "eager"  # plain matmuls the counter sees
    batch, seq = 2, 24
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(batch, seq, dtype=torch.long), logits_to_keep=1, use_cache=False)
    full_attn = batch * cfg.n_layer * 4 * cfg.n_embd * seq * seq
    causal_attn = batch * cfg.n_layer * 2 * cfg.n_embd * seq * (seq + 1)
    ours = prefill_flops(cfg, batch=batch, seq_len=seq)
    assert ours - causal_attn == pytest.approx(counter.get_total_flops() - full_attn, rel=1e-9)


def test_decode_bytes_and_check_logits():
    assert decode_bytes(weight_bytes=1000, kv_bytes_per_token=10, batch=2, prompt_len=8, gen_len=4) == \
        pytest.approx(1000 + 2 * 10 * (8 + 2.5))
    ref = np.array([1.0, -2.0, 4.0])
    assert check_logits(ref + 1e-4, ref, dtype="float32")["ok"]
    res = check_logits(ref + 0.1, ref, dtype="float32")
    assert not res["ok"] and res["rel_err"] == pytest.approx(0.025)
    assert check_logits(ref + 0.1, ref, dtype="float16")["ok"]
    assert not check_logits(ref[:2], ref, dtype="float32")["ok"]


# ---------------------------------------------------------------------------------------------- peers
def test_random_params_are_seeded_and_hf_layout_is_transposed():
    pytest.importorskip("transformers")
    from bench.peers import build_hf_model, random_params, torch_weight_bytes

    cfg = get_config("tiny")
    a, b, c = random_params(cfg, seed=0), random_params(cfg, seed=0), random_params(cfg, seed=1)
    w = "transformer.h.0.attn.c_attn.weight"
    assert np.array_equal(a[w], b[w]) and not np.array_equal(a[w], c[w])
    assert a[w].shape == (3 * cfg.n_embd, cfg.n_embd)
    model = build_hf_model(cfg, params=a, dtype="float32", device="cpu")
    assert np.array_equal(model.transformer.h[0].attn.c_attn.weight.detach().numpy(), a[w].T)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    d, inner, v, L = cfg.n_embd, cfg.n_inner, cfg.vocab_size, cfg.n_layer
    n_params = v * d + L * (4 * d + 3 * d * d + 3 * d + d * d + d + 2 * d * inner + inner + d) + 2 * d
    assert torch_weight_bytes(model) == 4 * n_params  # wpe excluded, lm_head counted once


def test_torch_decode_runner_matches_full_forward():
    """A step through the KV cache gives the logits of a forward over the whole sequence."""
    torch = pytest.importorskip("torch")
    from bench.peers import TorchDecodeRunner, TorchPrefillRunner, build_hf_model, random_params

    cfg = get_config("tiny")
    model = build_hf_model(cfg, params=random_params(cfg, seed=3), dtype="float32", device="cpu")
    runner = TorchDecodeRunner(model, device="cpu", compiled=False, seed=5)
    runner.start(batch=2, prompt_len=6, gen_len=2)
    ids = runner._tokens(2, 6)
    full = torch.cat([ids, ids[:, -1:]], dim=1)  # the step feeds the prompt's last token again
    step_logits = runner.step()[:, -1]
    runner.stop()
    with torch.no_grad():
        ref = model(full).logits[:, -1]
    assert torch.allclose(step_logits, ref, atol=1e-4)
    pre = TorchPrefillRunner(model, device="cpu", compiled=False, seed=5)
    pre.prepare(batch=2, seq_len=6)
    out = pre.run()
    with torch.no_grad():
        assert torch.allclose(out[:, -1], model(ids).logits[:, -1], atol=1e-4)


# ---------------------------------------------------------------------------------------------- kernels
def test_compare_outputs_catches_a_wrong_kernel():
    import tvm
    from tvm import te

    from bench.kernels import _compile, compare_outputs

    def kernel(op):
        a = te.placeholder((4, 8), "float32", name="a")
        b = te.placeholder((4, 8), "float32", name="b")
        c = te.compute((4, 8), lambda i, j: op(a[i, j], b[i, j]), name="c")
        return te.create_prim_func([a, b, c])

    tgt = tvm.target.Target({"kind": "llvm"})
    add, add2, sub = (_compile(kernel(f), target=tgt) for f in (lambda x, y: x + y, lambda x, y: y + x,
                                                                 lambda x, y: x - y))
    f = kernel(lambda x, y: x + y)
    assert compare_outputs(add, add2, f, device=tvm.cpu()) <= 1e-7
    assert compare_outputs(add, sub, f, device=tvm.cpu()) > 0.1


class _FakeEvent:
    """A CUDA event whose timestamp is the host clock when recorded (the device runs instantly)."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


class _Ctx:
    def __init__(self, *a):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_gpu_steps_are_one_pass_and_never_exceed_wall():
    """steps(): one event per step boundary in the same pass as the wall clock, no sync between
    steps, so the per-step GPU times sum to at most the wall time (the flaky two-pass check)."""
    syncs = []
    cuda = types.SimpleNamespace(Event=_FakeEvent, device=_Ctx, stream=_Ctx, default_stream=lambda i=0: "s0",
                                 synchronize=lambda i=0: syncs.append(i))
    t = Timer(kind="cuda", method="cuda-events", _torch=types.SimpleNamespace(cuda=cuda))
    calls = []
    run = t.steps(lambda: (calls.append(len(syncs)), time.sleep(0.002)), 4)
    assert len(run.gpu_ms) == 4 and all(g >= 1.9 for g in run.gpu_ms)
    assert sum(run.gpu_ms) <= run.wall_ms
    assert calls == [1, 1, 1, 1]  # one sync before the run, none between steps
    assert len(syncs) == 2  # and one after it


def test_cli_json_path_checked_before_measuring(tmp_path, capsys):
    from bench.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    t0 = time.perf_counter()
    rc = main(["decode", "--model", "tiny", "--device", "cpu", "--json", str(blocker / "r.json")])
    assert rc == 2 and "--json" in capsys.readouterr().err
    rc = main(["prefill", "--model", "tiny", "--device", "cpu", "--json", str(tmp_path)])
    assert rc == 2 and "is a directory" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 20  # refused before any build or measurement


def test_kernel_table_fits_120_columns_and_drops_empty_columns():
    from bench.tables import MAX_WIDTH, format_kernel_table

    def krow(name, *, gpu):
        r = {k: None for k in report.KERNEL_ROW_KEYS}
        r.update(name=name, kind="gemm", shape="1x1024x768 768x3072", phase="prefill", bucket=1024, weight=12,
                 flops=4.8e9, bytes=1e7, untuned_us=40.0, tuned_us=20.0, speedup=2.0, achieved="TFLOP/s",
                 achieved_value=240.0, pct_peak=24.0, share=0.5, tuned_record=True, status="ok", notes=[],
                 samples={"untuned_us": [40.0, 41.0], "tuned_us": [20.0, 21.0, 22.0], "cublas_us": None})
        if gpu:
            r.update(untuned_graph_us=38.0, tuned_graph_us=19.0, cublas_us=9.5, tflops=252.6, vs_peer=2.0)
        return r

    name = "fused_NT_matmul2_add2_gelu1_add3_with_a_very_long_suffix_kernel_name"
    for gpu in (True, False):
        doc = report.make_result(command="kernels", args={}, env={"gpu": None}, peak=None, timer="t",
                                 rows=[krow(name, gpu=gpu), krow("take", gpu=gpu)], notes=[])
        report.validate_result(doc)
        table = format_kernel_table(doc)
        lines = table.split("\n\n")[1].splitlines()
        assert max(len(x) for x in lines if x.startswith("|")) <= MAX_WIDTH
        assert "± = half the p20..p80" in table
        assert ("peer" in lines[0]) == gpu and ("tuned/peer" in lines[0]) == gpu
        if gpu:
            assert "2.00x" in table and "CUDA-graph" in table  # tuned/peer and graph-timed µs
        else:
            assert "cuBLAS" not in lines[0]


def test_cli_help_through_a_subprocess():
    import subprocess

    for cmd in ("decode", "prefill", "kernels"):
        out = subprocess.run([sys.executable, "-m", "bench.cli", cmd, "--help"], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert "--device" in out.stdout and "--json" in out.stdout and "--database-dir" in out.stdout
    out = subprocess.run([sys.executable, "-m", "bench.cli", "decode", "--cuda-graph", "maybe"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "expected on or off" in out.stderr


def test_shapes_without_a_tuned_bucket():
    from bench.loop import untuned_shapes as _untuned_shapes

    s = types.SimpleNamespace(config=types.SimpleNamespace(prefill_chunk_size=128))
    b = {"decode": [1, 8], "prefill": [128, 256]}
    assert _untuned_shapes(s, {"phase": "decode", "batch": 8}, b) is None
    assert _untuned_shapes(s, {"phase": "decode", "batch": 4}, b) == "decode batch 4"
    assert _untuned_shapes(s, {"phase": "prefill", "seq_len": 256}, b) is None  # two full chunks of 128
    assert _untuned_shapes(s, {"phase": "prefill", "seq_len": 300}, b) == "prefill chunk length(s) [44]"
    assert _untuned_shapes(s, {"phase": "prefill", "seq_len": 64}, {}) == "prefill chunk length(s) [64]"


def test_database_hash_covers_the_database_files_but_not_a_leftover_lock(tmp_path):
    """The library cache key's database hash changes with any database file's name or bytes, and
    not with the hidden ``.tune.lock`` a finished tune leaves in the directory."""
    from bench.build import database_hash

    db = tmp_path / "db"
    db.mkdir()
    (db / "meta.json").write_text('{"arch": "sm_90"}')
    (db / "attention.json").write_text("{}")
    base = database_hash(db)
    (db / ".tune.lock").write_text("")
    assert database_hash(db) == base
    (db / "attention.json").write_text('{"kernels": []}')
    changed = database_hash(db)
    assert changed != base
    (db / "untuned.json").write_text("{}")
    assert database_hash(db) != changed


def test_step_kernels_summary_splits_the_kv_cache_kernels_out():
    """The in-graph kernel records of N replays become per-replay figures; the KV cache's kernels
    (attention, append, q/k/v split) are summed apart; no records is None, not zero."""
    from bench.step_kernels import summarize

    events = [("norm_gemv_b8_k768_n2304_bias_kernel", 6.0), ("batch_decode_paged_kv_kernel", 4.0),
              ("tir_kv_cache_transpose_append_kernel", 1.5), ("fused_rope_kernel", 1.0)] * 12
    events += [("argmax_kernel", 3.0)]
    out = summarize(events * 2, replays=2)
    assert out["launches"] == pytest.approx(49)
    assert out["ms"] == pytest.approx((12 * 12.5 + 3.0) / 1e3)
    assert out["kv_ms"] == pytest.approx(12 * 6.5 / 1e3)
    assert out["kernels"][0] == {"kernel": "norm_gemv_b8_k768_n2304_bias_kernel", "calls": 12.0, "us": 72.0}
    assert summarize([], replays=2) is None and summarize(events, replays=0) is None


def test_table_shows_the_in_graph_kernels_column_only_when_measured():
    from bench.tables import format_table

    doc = _doc([_row("tuned", "tg4@b1", [100.0, 110.0])])
    assert "in-graph kernels ms" not in format_table(doc)
    doc["rows"][0]["anatomy"] = {"graph_kernels": {"ms": 0.3456, "kv_ms": 0.1, "launches": 80}}
    report.validate_result(doc)
    table = format_table(doc)
    assert "in-graph kernels ms" in table and "0.346" in table
