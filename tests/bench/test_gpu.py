"""bench on a CUDA GPU (skipped without one): events, NVML, CUDA graphs, cuBLAS column."""

from __future__ import annotations

import pytest

from bench import report

pytestmark = pytest.mark.gpu


def test_nvml_snapshot_reads_the_card():
    from bench.env import PEAK_TABLE, DeviceSpec, collect_env, peak_for

    pytest.importorskip("pynvml")
    env = collect_env(DeviceSpec("cuda", 0))
    gpu = env["gpu"]
    assert gpu["name"] and env["arch"].startswith("sm_")
    assert "error" not in gpu, gpu.get("error")  # pynvml importable on a GPU machine: NVML must answer
    assert gpu["sm_clock_mhz"] > 0 and gpu["mem_clock_mhz"] > 0
    assert gpu["temperature_c"] is not None and gpu["power_w"] > 0
    assert isinstance(gpu["throttle_reasons"], list)
    listed = any(sub.lower() in gpu["name"].lower() for sub, *_ in PEAK_TABLE)
    assert (peak_for(gpu["name"]) is not None) == listed


@pytest.mark.parametrize("cuda_graph", [True, False])
def test_decode_on_cuda(tmp_path, cuda_graph):
    from bench.config import BenchConfig
    from bench.decode import run_decode

    torch = pytest.importorskip("torch")
    assert torch.cuda.is_available(), "a CUDA machine whose torch has no CUDA: the GPU columns cannot be checked"
    cfg = BenchConfig(model="tiny-h64", quantization="q0f16", device="cuda", repeats=2, variants="untuned,torch-eager",
                      cuda_graph=cuda_graph, database_dir=str(tmp_path / "db"), cache_dir=str(tmp_path / "libs"),
                      graph_kernels=True)
    res = run_decode(cfg, batch="1,4", prompt_len=8, gen_len=8, log=lambda m: None)
    report.validate_result(res)
    assert all(r["status"] == "ok" for r in res["rows"]), [r["error"] for r in res["rows"]]
    assert res["env"]["gpu"]["name"] and res["timer"] == "cuda-events"
    for r in res["rows"]:
        # wall and GPU time come from the same pass, GPU events inside the wall interval: per run
        # GPU ms/step <= wall ms/step, so the medians obey it too (deterministic, no tolerance factor)
        assert r["gpu_ms"]["median"] <= r["ms"]["median"] + 1e-3
        assert len(r["samples"]["gpu_ms"]) == 2 * 8
    unt = [r for r in res["rows"] if r["variant"] == "untuned"]
    assert unt[0]["build"]["check"]["ok"] and unt[0]["build"]["cuda_graph"] == cuda_graph
    for r in unt:  # step anatomy: graph-timed kernel sum, below the step's wall time
        assert r["anatomy"]["method"] == "cuda-graph replay"
        assert 0 < r["kernels_ms"] < r["ms"]["median"]
        assert r["overhead_ms"] == pytest.approx(r["ms"]["median"] - r["kernels_ms"])
        gk = r["anatomy"].get("graph_kernels")
        if cuda_graph:  # every kernel of the step's graph, the KV cache's attention among them, inside its time
            assert gk is not None and 0 < gk["kv_ms"] < gk["ms"] <= r["graph_ms"] * 1.02, gk
            assert any("batch_decode" in k["kernel"] for k in gk["kernels"]), gk["kernels"]
        else:
            assert gk is None
    from bench.tables import format_table

    assert "CUDA graphs " + ("on" if cuda_graph else "off") in format_table(res)


def test_prefill_and_kernels_on_cuda(tmp_path):
    from bench.config import BenchConfig
    from bench.kernels import run_kernels
    from bench.prefill import run_prefill

    torch = pytest.importorskip("torch")
    assert torch.cuda.is_available(), "a CUDA machine whose torch has no CUDA: the GPU columns cannot be checked"
    cfg = BenchConfig(model="tiny-h64", quantization="q0f16", device="cuda", repeats=2, variants="untuned",
                      database_dir=str(tmp_path / "db"), cache_dir=str(tmp_path / "libs"))
    res = run_prefill(cfg, seq_len="32,64", log=lambda m: None)
    report.validate_result(res)
    assert [r["test"] for r in res["rows"]] == ["pp32", "pp64"]
    assert all(r["status"] == "ok" and r["tflops"] > 0 for r in res["rows"])
    assert all(r["gpu_ms"]["median"] <= r["ms"]["median"] + 1e-3 for r in res["rows"])
    k = run_kernels(BenchConfig(model="tiny-h64", quantization="q0f16", device="cuda", repeats=3,
                                database_dir=str(tmp_path / "db")), phase="prefill", seq_len=64, log=lambda m: None)
    report.validate_result(k)
    assert all(r["status"] == "ok" for r in k["rows"]), [r["error"] for r in k["rows"]]
    mm = [r for r in k["rows"] if r["kind"] in ("gemm", "gemv")]
    assert mm and all(r["cublas_us"] > 0 and r["vs_peer"] > 0 and r["tflops"] > 0 for r in mm)
    (att,) = [r for r in k["rows"] if r["kind"] == "attention"]
    assert att["sdpa_us"] > 0 and att["untuned_graph_us"] > 0 and att["vs_peer"] > 0
    # TVM kernels captured in a CUDA graph on torch's stream: launch cost gone, so at most the
    # back-to-back figure (plus noise), and never zero
    for r in k["rows"]:
        assert 0 < r["untuned_graph_us"] <= r["untuned_us"] * 1.2, r
