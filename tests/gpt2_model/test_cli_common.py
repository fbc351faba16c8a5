"""The shared CLI vocabulary (gpt2_model.cli_common) and the device resolver (gpt2_model.device)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from gpt2_model import cli_common, device


def test_int_list_parses_and_rejects():
    assert cli_common.int_list("1,8,32") == [1, 8, 32]
    assert cli_common.int_list(" 0, 5 ,") == [0, 5]  # token id 0 is valid, trailing comma skipped
    assert cli_common.positive_int_list("2,4") == [2, 4]
    for bad in ("", ",", "1,x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="comma-separated"):
            cli_common.int_list(bad)
    with pytest.raises(argparse.ArgumentTypeError, match=">= 0"):
        cli_common.int_list("3,-1")
    with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
        cli_common.positive_int_list("0,8")


def test_int_list_error_is_one_argparse_usage_error(capsys):
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--batch", type=cli_common.positive_int_list)
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--batch", "1,a"])
    assert exc.value.code == 2
    assert "argument --batch: expected comma-separated positive integers, got '1,a'" in capsys.readouterr().err


def test_gen_len_keeps_old_spellings_hidden(capsys):
    p = argparse.ArgumentParser(prog="x")
    cli_common.add_gen_len_arg(p, default=7)
    assert p.parse_args([]).gen_len == 7
    assert p.parse_args(["--gen-len", "3"]).gen_len == 3
    assert p.parse_args(["--max-new-tokens", "4"]).gen_len == 4
    assert p.parse_args(["--generate-len", "5"]).gen_len == 5
    help_text = p.format_help()
    assert "--gen-len" in help_text and "Default: 7" in help_text
    assert "--max-new-tokens" not in help_text and "--generate-len" not in help_text


def test_quantization_and_arch_flags():
    p = argparse.ArgumentParser(prog="x")
    cli_common.add_quantization_arg(p)
    cli_common.add_arch_arg(p)
    cli_common.add_device_arg(p, default="auto", allow_auto=True)
    args = p.parse_args([])
    assert (args.quantization, args.arch, args.device) == ("q0f16", None, "auto")
    with pytest.raises(SystemExit):
        p.parse_args(["--quantization", "q8"])
    help_text = " ".join(p.format_help().split())
    assert "Default: q0f16" in help_text
    assert "Default: the local GPU's arch, detected; on CPU 'cpu'" in help_text


def test_quantization_names_match_the_schemes():
    from gpt2_model.quantization import QUANTIZATIONS

    assert sorted(cli_common.QUANTIZATION_NAMES) == sorted(QUANTIZATIONS)


def test_cli_common_and_device_do_not_import_tvm():
    code = ("import sys, gpt2_model.cli_common, gpt2_model.device; "
            "print(sorted(m for m in sys.modules if m == 'tvm' or m.startswith('tvm.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_parse_device():
    assert device.parse_device("cpu") == ("cpu", 0)
    assert device.parse_device("cuda") == ("cuda", 0)
    assert device.parse_device(" CUDA:3 ") == ("cuda", 3)
    for bad in ("auto", "gpu", "cuda:x", "cuda:", "tpu:0", ""):
        with pytest.raises(device.DeviceError, match="use cpu, cuda or cuda:N"):
            device.parse_device(bad)
    assert issubclass(device.DeviceError, ValueError)


def test_resolve_device_and_arch_without_gpu(monkeypatch):
    """No GPU (forced, so the test means the same on every machine): auto -> cpu, cuda -> clear errors."""
    monkeypatch.setattr(device, "cuda_device_exists", lambda index=0: False)
    monkeypatch.setattr(device, "detect_cuda_arch", lambda device_index=0: None)
    assert device.resolve_device("auto") == ("cpu", 0)
    assert device.resolve_device("cpu") == ("cpu", 0)
    with pytest.raises(device.DeviceError, match="no CUDA device 7 visible"):
        device.resolve_device("cuda:7")
    assert device.arch_for_device("cpu") == "cpu"
    assert device.arch_for_device("cuda:0", "sm_86") == "sm_86"
    with pytest.raises(device.DeviceError, match="pass --arch sm_XX"):
        device.arch_for_device("cuda")


def test_resolve_device_with_a_gpu(monkeypatch):
    monkeypatch.setattr(device, "cuda_device_exists", lambda index=0: index < 2)
    monkeypatch.setattr(device, "detect_cuda_arch", lambda device_index=0: "sm_90")
    assert device.resolve_device("auto") == ("cuda", 0)
    assert device.resolve_device("cuda:1") == ("cuda", 1)
    assert device.arch_for_device("cuda:1") == "sm_90"


def test_tvm_device_cpu_and_missing_gpu():
    import tvm

    assert device.tvm_device("cpu") == tvm.cpu(0)
    with pytest.raises(device.DeviceError, match="no CUDA device 999"):
        device.tvm_device("cuda:999")
