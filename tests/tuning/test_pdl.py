"""Programmatic dependent launch (``tuning.pdl``): with ``GPT2K_PDL=1`` every CUDA kernel of an sm_90
build waits for its predecessor grid before any memory access and carries TVM's PDL launch tag; other
targets, and the default (unset), build without it. (Built here without a GPU: the CUDA source and the library's
launch metadata are inspected; the numbers of a PDL build are checked on the card by the GPU tests
of the decode loop.)"""

from __future__ import annotations

import re

import pytest
import tvm
from tvm import tirx

from gpt2_model.config import get_config
from gpt2_model.export import export_model
from tuning.pdl import (DYN_SMEM_TAG, PDL_ENV, PDL_TAG, add_pdl, add_pdl_late, add_pdl_wait, pdl_enabled, pdl_mode,
                        supports_pdl)
from tuning.targets import make_target

_LAUNCH = "tirx.kernel_launch_params"


def _kernel(tags, calling_conv=2):
    from tvm.script import tirx as T  # pylint: disable=import-outside-toplevel

    @T.prim_func(s_tir=True)
    def main(A: T.Buffer((128,), "float32")):
        for tx in T.thread_binding(128, thread="threadIdx.x"):
            A[tx] = A[tx] + T.float32(1)

    return main.with_attr("calling_conv", calling_conv).with_attr(_LAUNCH, tags)


def test_supports_pdl_only_on_sm90_and_later(monkeypatch):
    assert supports_pdl(make_target("sm_90"))
    assert not supports_pdl(make_target("sm_86"))
    assert not supports_pdl(make_target("sm_80"))
    assert not supports_pdl(make_target("cpu"))
    monkeypatch.delenv(PDL_ENV, raising=False)
    assert not pdl_enabled(make_target("sm_90"))  # off by default until measured on a card
    monkeypatch.setenv(PDL_ENV, "0")
    assert not pdl_enabled(make_target("sm_90"))
    monkeypatch.setenv(PDL_ENV, "1")
    assert pdl_enabled(make_target("sm_90")) and not pdl_enabled(make_target("sm_86"))
    assert pdl_mode(make_target("sm_90")) == "trigger"
    monkeypatch.setenv(PDL_ENV, "wait")
    assert pdl_mode(make_target("sm_90")) == "wait" and pdl_mode(make_target("sm_86")) is None
    monkeypatch.setenv(PDL_ENV, "late")
    assert pdl_mode(make_target("sm_90")) == "late" and pdl_mode(make_target("sm_86")) is None
    monkeypatch.setenv(PDL_ENV, "yes")
    with pytest.raises(ValueError, match="GPT2K_PDL='yes': use 1"):
        pdl_mode(make_target("sm_90"))


def test_pass_tags_device_kernels_and_keeps_dynamic_shared_memory_last():
    mod = tvm.IRModule({"k": _kernel(["blockIdx.x", "threadIdx.x", DYN_SMEM_TAG]),
                        "plain": _kernel(["threadIdx.x"]),
                        "host": _kernel(["threadIdx.x"], calling_conv=0)})
    out = add_pdl(mod)
    assert [str(t) for t in out["k"].attrs[_LAUNCH]] == ["blockIdx.x", "threadIdx.x", PDL_TAG, DYN_SMEM_TAG]
    assert [str(t) for t in out["plain"].attrs[_LAUNCH]] == ["threadIdx.x", PDL_TAG]
    assert [str(t) for t in out["host"].attrs[_LAUNCH]] == ["threadIdx.x"]  # not a device kernel
    body = out["k"].body
    assert isinstance(body, tirx.SeqStmt)
    assert ["launch_dependents" in str(body[0]), "wait" in str(body[1])] == [True, True]
    again = add_pdl(out)  # idempotent: one wait per kernel
    assert str(again["k"].body) == str(body)
    # the wait-only form: the same tags, no explicit trigger (the blocks' exit triggers the dependent grid)
    waited = add_pdl_wait(mod)
    assert [str(t) for t in waited["k"].attrs[_LAUNCH]] == ["blockIdx.x", "threadIdx.x", PDL_TAG, DYN_SMEM_TAG]
    assert "wait" in str(waited["k"].body[0]) and "launch_dependents" not in str(waited["k"].body)
    assert str(out["host"].body) == str(mod["host"].body)
    # the late form: the wait first, then the trigger (a waiting grid never launches its own dependent)
    late = add_pdl_late(mod)
    assert [str(t) for t in late["k"].attrs[_LAUNCH]] == ["blockIdx.x", "threadIdx.x", PDL_TAG, DYN_SMEM_TAG]
    assert ["wait" in str(late["k"].body[0]), "launch_dependents" in str(late["k"].body[1])] == [True, True]
    assert "launch_dependents" not in str(late["k"].body[0])
    assert str(late["plain"].body[2]) == str(mod["plain"].body)


def _build_tiny(target):
    from tuning.compile import build  # pylint: disable=import-outside-toplevel

    exported = export_model(get_config("tiny"), quantization="q0f16", target=target,
                            buckets={"prefill": [16], "decode": [2]})
    return build(exported, target=target)


def _cuda_source(exe) -> str:
    def walk(m):
        yield m
        for i in m.imports:
            yield from walk(i)

    return "".join(m.inspect_source() for m in walk(exe.mod) if m.kind == "cuda")


def _kernel_bodies(src: str) -> dict[str, str]:
    """name -> the first 300 characters of each __global__ function's body."""
    out = {}
    for mt in re.finditer(r'__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^;{]*\)\s*\{', src):
        out[mt.group(1)] = src[mt.end():mt.end() + 300]
    return out


@pytest.mark.parametrize("pdl", [True, False], ids=["GPT2K_PDL=1", "GPT2K_PDL=0"])
def test_sm90_model_build_waits_in_every_kernel(pdl, monkeypatch, tmp_path):
    monkeypatch.setenv(PDL_ENV, "1" if pdl else "0")
    exe = _build_tiny(make_target("sm_90"))
    bodies = _kernel_bodies(_cuda_source(exe))
    assert len(bodies) > 10  # the model's kernels, the KV cache's included
    for name, body in bodies.items():
        head = body.lstrip().split(";")[:2]
        has = [s.strip() for s in head] == ["tvm_builtin_ptx_griddepcontrol_launch_dependents()",
                                            "tvm_builtin_ptx_griddepcontrol_wait()"]
        assert has == pdl, (name, body[:160])
    lib = tmp_path / "lib.so"
    exe.export_library(str(lib))
    tags = lib.read_bytes().count(PDL_TAG.encode())
    assert tags == (len(bodies) if pdl else 0)  # the launch metadata of every kernel names PDL


def test_builds_below_sm90_get_no_pdl(monkeypatch):
    monkeypatch.setenv(PDL_ENV, "1")
    src = _cuda_source(_build_tiny(make_target("sm_86")))
    assert "griddepcontrol" not in src and "__global__" in src


def test_library_cache_key_depends_on_pdl(monkeypatch):
    from bench.build import library_key  # pylint: disable=import-outside-toplevel

    args = dict(config=get_config("tiny"), quantization="q0f16", target=make_target("sm_90"), database_hash=None,
                cuda_graph=True, code_hash="x")
    monkeypatch.setenv(PDL_ENV, "1")
    on, parts = library_key(**args)
    assert parts["pdl"] is True
    monkeypatch.setenv(PDL_ENV, "0")
    off, parts = library_key(**args)
    assert parts["pdl"] is False and off != on


def test_norm_gemv_waits_after_its_weight_loads_and_gets_only_the_tag(tmp_path):
    """The tensor-core norm + GEMV calls PDL_SYNC (wait, then trigger) between its weight loads and its
    first read of the input; a PDL build adds the launch tag but no wait or trigger of its own, so
    the kernel's weights are fetched while the previous grid runs. Every PDL mode keeps that place."""
    from gpt2_model.norm_gemv import NormGemvKey, make_norm_gemv, norm_gemv_candidates
    from gpt2_model.wgmma_gemm import PDL_SYNC
    from tuning.pdl import pdl_pipeline

    key = NormGemvKey(batch=8, k=768, n=2304, epilogue="bias")
    cfg = next(c for c in norm_gemv_candidates(key) if c.mma)
    mod = tvm.IRModule({"norm_gemv": make_norm_gemv(cfg, key, eps=1e-5)})
    target = make_target("sm_90")
    for mode in ("trigger", "late", "wait"):
        lib = tvm.compile(mod, target=target, tir_pipeline=pdl_pipeline("default", mode))
        src = lib.mod.imports[0].inspect_source()
        body = next(iter(_kernel_bodies(src).values()))
        assert "griddepcontrol" not in body.lstrip()[:80], mode  # nothing added at the top
        kernel = src[src.index("__global__ void __launch_bounds__"):]
        sync, weights, gamma = kernel.index(PDL_SYNC + "();"), kernel.index("W_ptr)["), kernel.index("gamma_ptr +")
        assert weights < sync < gamma, mode  # weights first, the wait, then the norm's first read
        assert kernel.count("griddepcontrol") == 0 and kernel.count(PDL_SYNC) == 1
        helper = src[src.index(f"void {PDL_SYNC}()"):src.index("__global__")]
        assert helper.index("griddepcontrol.wait") < helper.index("griddepcontrol.launch_dependents")
        lib.export_library(str(tmp_path / f"{mode}.so"))
        assert (tmp_path / f"{mode}.so").read_bytes().count(PDL_TAG.encode()) == 1, mode  # launched with PDL
    plain = tvm.compile(mod, target=target)  # without PDL: the same call, no launch tag
    plain.export_library(str(tmp_path / "plain.so"))
    assert PDL_SYNC in plain.mod.imports[0].inspect_source()
    assert (tmp_path / "plain.so").read_bytes().count(PDL_TAG.encode()) == 0
