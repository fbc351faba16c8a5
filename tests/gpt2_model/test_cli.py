"""The MLC-style verbs end to end: convert-weight, gen-config, compile (cpu and cuda), generate."""

from __future__ import annotations

import json
import shutil

import pytest

from tuning.gpt2k import main
from gpt2_model.workflow import load_engine

from ..conftest import hf_last_logits, rel_err


@pytest.fixture(scope="module")
def dist(hf_sharded, tmp_path_factory):
    path, _ = hf_sharded
    out = tmp_path_factory.mktemp("dist")
    assert main(["convert-weight", str(path), "--quantization", "q0f32", "-o", str(out)]) == 0
    assert main(["gen-config", str(path), "--quantization", "q0f32", "-o", str(out)]) == 0
    return out


def test_convert_weight_and_gen_config_outputs(dist):
    index = json.loads((dist / "tensor-cache.json").read_text())
    names = [r["name"] for shard in index["records"] for r in shard["records"]]
    assert names[0] == "transformer.wte.weight" and len(names) == 4 + 2 * 12
    chat = json.loads((dist / "mlc-chat-config.json").read_text())
    assert chat["quantization"] == "q0f32"
    assert chat["context_window_size"] == 64 and chat["prefill_chunk_size"] == 64
    assert chat["bos_token_id"] == 0 and chat["model_config"]["n_inner"] == 96


def test_compile_cpu_then_generate_matches_transformers(dist, hf_sharded, capsys):
    _, reference = hf_sharded
    lib = dist / "model-cpu.so"
    assert main(["compile", str(dist / "mlc-chat-config.json"), "--device", "cpu", "--no-tuning", "-o", str(lib)]) == 0
    assert lib.is_file()
    engine = load_engine(dist, model_lib=lib, device="cpu")
    seq = engine.add_sequence()
    ids = [3, 14, 15, 92, 65]
    assert rel_err(engine.prefill(seq, ids), hf_last_logits(reference, ids)) < 1e-4
    capsys.readouterr()
    assert main(["generate", "--model", str(dist), "--model-lib", str(lib), "--prompt-ids", "3,14,15", "--gen-len", "4"]) == 0
    printed = capsys.readouterr().out
    tokens = [int(x) for x in printed.split("tokens:")[1].split()[0].split(",")]
    assert tokens == engine.generate([3, 14, 15], 4)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build CUDA code")
def test_compile_for_cuda_without_a_gpu(dist):
    lib = dist / "model-sm86.so"
    rc = main(["compile", str(dist / "mlc-chat-config.json"), "--device", "cuda", "--arch", "sm_86", "--no-tuning",
               "-o", str(lib)])
    assert rc == 0 and lib.stat().st_size > 100_000
    side = json.loads((dist / "model-sm86.so.json").read_text())
    assert side["arch"] == "sm_86" and side["target"] == "cuda"


def test_list_params_prints_every_parameter(capsys):
    assert main(["list-params", "gpt2", "--quantization", "q4f16_1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "transformer.wte.q_weight [50257, 96] uint32"
    assert "transformer.h.11.mlp.c_proj.q_scale [768, 96] float16" in lines
    assert len(lines) == 2 + 1 + 12 * 16 + 2  # wte (q, scale), wpe, 16 per block, ln_f


def test_verbs_report_bad_input(tmp_path, capsys):
    assert main(["compile", str(tmp_path / "nothing.json"), "-o", str(tmp_path / "x.so")]) == 1
    assert "run `gpt2k gen-config` first" in capsys.readouterr().err
    assert main(["convert-weight", str(tmp_path), "--quantization", "q0f16", "-o", str(tmp_path / "o")]) == 1
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert-weight", str(tmp_path), "--quantization", "q9", "-o", "o"])
