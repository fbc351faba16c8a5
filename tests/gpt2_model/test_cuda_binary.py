"""``gpt2_model.cuda_binary``: a library's CUDA source compiled when it is built (nvcc, no GPU), and the
load callback serving that cubin for exactly that source and arch (and nothing else)."""

from __future__ import annotations

import shutil

import pytest
import tvm
import tvm_ffi

from gpt2_model import cuda_binary
from gpt2_model.wgmma_build import install_compile_hook

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CUDA toolkit) to compile")


def _cuda_lib(tmp_path):
    from tvm.script import tirx as T

    @T.prim_func
    def add_one(A: T.Buffer((128,), "float32"), B: T.Buffer((128,), "float32")):
        for i in T.thread_binding(128, thread="threadIdx.x"):
            B[i] = A[i] + T.float32(1)

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm")
    exe = tvm.compile(tvm.IRModule({"main": add_one}), target=target)
    lib = tmp_path / "lib.so"
    exe.export_library(str(lib))
    return exe, lib, target


def test_the_load_arch_is_the_one_the_load_hook_compiles_for():
    assert cuda_binary.load_arch("__global__ void k() {}", "sm_90") == "sm_90"
    assert cuda_binary.load_arch('asm("wgmma.mma_async ...");', "sm_90") == "sm_90a"
    assert cuda_binary.load_arch('asm("setmaxnreg.inc.sync.aligned.u32 240;");', "sm_90a") == "sm_90a"
    assert cuda_binary.load_arch('asm("wgmma.fence;");', "sm_86") == "sm_86"  # (no "a" variant: as the hook)
    assert cuda_binary.cubin_name("x", "sm_90") != cuda_binary.cubin_name("x ", "sm_90")
    assert cuda_binary.cubin_name("x", "sm_90") != cuda_binary.cubin_name("x", "sm_90a")


@needs_nvcc
def test_precompiled_cubin_is_served_for_its_source_and_arch_only(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_binary, "_compiled_at_build", lambda: False)  # (as on a machine without CUDA)
    exe, lib, target = _cuda_lib(tmp_path)
    stale = cuda_binary.sidecar_dir(lib) / cuda_binary.cubin_name("an earlier build's source", "sm_90")
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    info = cuda_binary.precompile(exe, lib, target)
    assert "skipped" not in info, info
    (name,) = info["cubins"]
    cubin = cuda_binary.sidecar_dir(lib) / name
    data = cubin.read_bytes()
    assert data[:4] == b"\x7fELF" and name.endswith("-sm_90.cubin")
    assert sorted(p.name for p in cubin.parent.iterdir()) == [name]  # the earlier build's cubin is gone
    source = exe.mod.imports[0].inspect_source()
    assert source.encode() in lib.read_bytes()  # what the CUDA runtime hands the callback at load

    monkeypatch.setattr(cuda_binary, "_DIRS", [])
    cuda_binary.register(lib)
    install_compile_hook()
    before = cuda_binary.stats()
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}):
        served = tvm_ffi.get_global_func("tvm_callback_cuda_compile")(source)
    assert bytes(served) == data
    assert cuda_binary.stats()["hits"] == before["hits"] + 1
    # another source or another arch: no cubin (the hook then compiles, as without a sidecar)
    assert cuda_binary.find_cubin(source + "\n", "sm_90") is None
    assert cuda_binary.find_cubin(source, "sm_90a") is None
    assert cuda_binary.find_cubin(source, None) is None
    assert cuda_binary.stats()["misses"] == before["misses"] + 3


def test_nothing_to_precompile_is_said_not_raised(tmp_path, monkeypatch):
    llvm = tvm.target.Target({"kind": "llvm"})
    assert cuda_binary.precompile(None, tmp_path / "lib.so", llvm) == {"skipped": "llvm target"}
    monkeypatch.setattr(cuda_binary, "_compiled_at_build", lambda: False)
    monkeypatch.setattr(cuda_binary.shutil, "which", lambda _name: None)
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    assert "no nvcc" in cuda_binary.precompile(None, tmp_path / "lib.so", cuda)["skipped"]
    assert not cuda_binary.sidecar_dir(tmp_path / "lib.so").exists()
    # built where the CUDA runtime is present: TVM compiled the source itself, nothing to add
    monkeypatch.setattr(cuda_binary.shutil, "which", lambda _name: "/usr/bin/nvcc")
    monkeypatch.setattr(cuda_binary, "_compiled_at_build", lambda: True)
    assert "holds its binary" in cuda_binary.precompile(None, tmp_path / "lib.so", cuda)["skipped"]
    assert not cuda_binary.sidecar_dir(tmp_path / "lib.so").exists()


@needs_nvcc
def test_a_failed_compile_leaves_no_sidecar_and_says_why(tmp_path, caplog, monkeypatch):
    class Broken:  # a CUDA module whose source nvcc rejects
        kind, imports = "cuda", []

        @staticmethod
        def inspect_source():
            return "this is not CUDA"

    monkeypatch.setattr(cuda_binary, "_compiled_at_build", lambda: False)
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    info = cuda_binary.precompile(Broken(), tmp_path / "lib.so", cuda)
    assert info["skipped"].startswith("nvcc failed")
    assert not cuda_binary.sidecar_dir(tmp_path / "lib.so").exists()
    assert "not precompiled" in caplog.text
