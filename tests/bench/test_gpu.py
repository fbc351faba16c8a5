"""bench on a CUDA GPU (skipped without one): events, NVML, CUDA graphs, cuBLAS column."""

from __future__ import annotations

import pytest

from bench import report

pytestmark = pytest.mark.gpu


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_nvml_snapshot_reads_the_card():
    from bench.env import DeviceSpec, collect_env, peak_for

    env = collect_env(DeviceSpec("cuda", 0))
    gpu = env["gpu"]
    assert gpu["name"] and env["arch"].startswith("sm_")
    if "error" not in gpu:  # NVML present: clocks and power are read
        assert gpu["sm_clock_mhz"] > 0 and gpu["mem_clock_mhz"] > 0
        assert gpu["temperature_c"] is not None and gpu["power_w"] > 0
        assert isinstance(gpu["throttle_reasons"], list)
    if any(k in gpu["name"] for k in ("H100", "H200", "A100")):
        assert peak_for(gpu["name"]) is not None


@pytest.mark.parametrize("cuda_graph", [True, False])
def test_decode_on_cuda(tmp_path, cuda_graph):
    from bench.decode import run_decode

    variants = "untuned,torch-eager" if _torch_cuda() else "untuned"
    res = run_decode(model="tiny-h64", quantization="q0f16", device="cuda", batch="1,4", prompt_len=8, gen_len=8,
                     repeats=2, variants=variants, cuda_graph=cuda_graph, database_dir=str(tmp_path / "db"),
                     cache_dir=str(tmp_path / "libs"), log=lambda m: None)
    report.validate_result(res)
    assert all(r["status"] == "ok" for r in res["rows"]), [r["error"] for r in res["rows"]]
    assert res["env"]["gpu"]["name"]
    if _torch_cuda():
        assert res["timer"] == "cuda-events"
        for r in res["rows"]:
            assert r["gpu_ms"] is not None
            assert r["gpu_ms"]["median"] <= r["ms"]["median"] * 1.05  # device time within wall time
    unt = [r for r in res["rows"] if r["variant"] == "untuned"]
    assert unt[0]["build"]["check"]["ok"] and unt[0]["build"]["cuda_graph"] == cuda_graph
    if res["peak"]:
        assert all(r["pct_bw"] is not None for r in res["rows"])


def test_prefill_and_kernels_on_cuda(tmp_path):
    from bench.kernels import run_kernels
    from bench.prefill import run_prefill

    res = run_prefill(model="tiny-h64", quantization="q0f16", device="cuda", seq_len="32,64", repeats=2,
                      variants="untuned", database_dir=str(tmp_path / "db"), cache_dir=str(tmp_path / "libs"),
                      log=lambda m: None)
    report.validate_result(res)
    assert [r["test"] for r in res["rows"]] == ["pp32", "pp64"]
    assert all(r["status"] == "ok" and r["tflops"] > 0 for r in res["rows"])
    k = run_kernels(model="tiny-h64", quantization="q0f16", device="cuda", phase="decode", batch=4, repeats=3,
                    database_dir=str(tmp_path / "db"), log=lambda m: None)
    report.validate_result(k)
    assert all(r["status"] == "ok" for r in k["rows"]), [r["error"] for r in k["rows"]]
    if _torch_cuda():
        assert all(r["cublas_us"] > 0 for r in k["rows"] if r["kind"] in ("gemm", "gemv"))
        # TVM kernels captured in a CUDA graph on torch's stream: launch cost gone, so at most the
        # back-to-back figure (plus noise), and never zero
        for r in k["rows"]:
            assert 0 < r["untuned_graph_us"] <= r["untuned_us"] * 1.2, r
