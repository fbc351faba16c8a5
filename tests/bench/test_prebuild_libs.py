"""``scripts/prebuild_libs.py``: a CUDA library built here (no GPU) lands in bench's cache under the
key bench computes on the GPU box, and a second run finds it (CPU only: builds, nothing runs)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from bench.build import library_key
from gpt2_model import cuda_binary
from gpt2_model.config import get_config
from tuning.engine import target_for

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("prebuild_libs", ROOT / "scripts" / "prebuild_libs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prebuilt_library_is_the_entry_bench_looks_up(tmp_path, capsys):
    script = _script()
    args = ["--arch", "sm_90", "--model", "tiny", "--quantization", "q0f32", "--variants", "untuned",
            "--cache-dir", str(tmp_path)]
    assert script.main(args) == 0
    assert "untuned: built" in capsys.readouterr().out
    # the key bench computes for `bench --device cuda --arch sm_90` (CUDA graphs on, untuned)
    key, parts = library_key(config=get_config("tiny"), quantization="q0f32", target=target_for("cuda", "sm_90"),
                             database_hash=None, cuda_graph=True)
    entry = tmp_path / key
    assert (entry / "lib.so").stat().st_size > 0
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["cuda_graph"] is True and meta["target"] == parts["target"] and meta["buckets"]
    # its CUDA source compiled here, beside it (the GPU then compiles nothing at load: gpt2_model.cuda_binary)
    if cuda_binary._compiled_at_build():  # (a machine with the CUDA runtime: TVM compiled it when building)
        assert "holds its binary" in meta["cuda_binary"]["skipped"]
    elif shutil.which("nvcc") is not None:
        (cubin,) = meta["cuda_binary"]["cubins"]
        assert (entry / "lib.so.cubin" / cubin).read_bytes()[:4] == b"\x7fELF" and cubin.endswith("-sm_90.cubin")
    else:
        assert "no nvcc" in meta["cuda_binary"]["skipped"]
    assert script.main(args) == 0
    assert "untuned: already there" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == [key]


def test_bad_variants_are_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        _script().main(["--variants", "fast"])
    assert "--variants" in capsys.readouterr().err
