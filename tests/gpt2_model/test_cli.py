"""The MLC-style verbs end to end: convert-weight, gen-config, compile (cpu and cuda), generate."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

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
    rate = re.search(r"^4 tokens in ([0-9.e-]+) s: ([0-9.]+) tokens/s", printed, re.M)
    assert rate and float(rate.group(2)) == pytest.approx(4 / float(rate.group(1)), rel=0.05)


@pytest.mark.slow  # a CUDA build of the model with nvcc, no GPU needed (~80 s on a loaded 2-core machine)
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


def test_compile_cuda_without_arch_and_no_gpu_names_the_flag(dist, tmp_path, capsys, monkeypatch):
    import gpt2_model.device as device  # pylint: disable=import-outside-toplevel

    monkeypatch.setattr(device, "detect_cuda_arch", lambda device_index=0: None)  # no GPU, on any machine
    rc = main(["compile", str(dist), "--device", "cuda", "--no-tuning", "-o", str(tmp_path / "x.so")])
    err = capsys.readouterr().err
    assert rc == 1 and "pass --arch sm_XX" in err
    assert not (tmp_path / "x.so").exists()


def test_chat_config_errors_name_the_file_and_field(dist, tmp_path, capsys):
    chat = json.loads((dist / "mlc-chat-config.json").read_text())
    del chat["quantization"]
    missing = tmp_path / "missing" / "mlc-chat-config.json"
    missing.parent.mkdir()
    missing.write_text(json.dumps(chat))
    assert main(["compile", str(missing), "--no-tuning", "-o", str(tmp_path / "x.so")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"gpt2k compile: error: {missing}: missing field 'quantization' (regenerate it with `gpt2k gen-config`)"

    broken = tmp_path / "broken.json"
    broken.write_text('{"model_type": "gpt2", ')
    assert main(["compile", str(broken), "--no-tuning", "-o", str(tmp_path / "x.so")]) == 1
    err = capsys.readouterr().err
    assert f"{broken} is not valid JSON" in err and len(err.strip().splitlines()) == 1

    chat["quantization"] = "q8"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(chat))
    assert main(["compile", str(bad), "--no-tuning", "-o", str(tmp_path / "x.so")]) == 1
    assert f"{bad}: field 'quantization': unknown quantization 'q8'" in capsys.readouterr().err


def test_help_texts_say_what_flags_take(capsys):
    with pytest.raises(SystemExit):
        main(["compare-hf", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a dist directory" in text and "a local Hugging Face GPT-2 directory" in text and "Not a hub name" in text
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Default: the local GPU's arch, detected; on CPU 'cpu'" in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "--gen-len" in text and "--max-new-tokens" not in text


def test_gpt2k_help_is_fast_and_imports_no_tvm():
    code = ("import sys, time; t = time.perf_counter(); from tuning.gpt2k import build_parser; "
            "build_parser().format_help(); "
            "print(time.perf_counter() - t, any(m == 'tvm' or m.startswith('tvm.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False", "building gpt2k's parser imported TVM"
    assert float(out[0]) < 2.0


def test_gpt2k_forwards_bench_and_tune(capfd):
    assert main(["bench", "--help"]) == 0  # runs the bench CLI in a child interpreter
    assert "usage: bench" in capfd.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--help"])
    assert exc.value.code == 0 and "usage: tune" in capfd.readouterr().out
