"""Config, loader, quantization and registry: mapping checks and one clear error per bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tvm

from gpt2_model.config import PRESETS, ConfigError, GPT2Config, get_config
from gpt2_model.export import export_model
from gpt2_model.loader import CheckpointError, load_hf_params
from gpt2_model.quantization import QuantizationError, get_scheme, group_dequantize, group_quantize
from gpt2_model.registry import MODELS
from gpt2_model.weights import WeightsError, load_params, save_params

from ..conftest import save_hf_checkpoint

LLVM = tvm.target.Target({"kind": "llvm"})


# ----------------------------------------------------------------------------- config
def test_config_from_hf_file_derives_fields(hf_sharded):
    path, model = hf_sharded
    cfg = GPT2Config.from_file(path)
    assert cfg.n_inner == 96 and cfg.head_dim == 16
    assert cfg.context_window_size == model.config.n_positions == 64
    assert cfg.prefill_chunk_size == 64
    assert cfg.scale_attn_by_inverse_layer_idx is True
    # Keys we don't use are kept with their values, not dropped, and written back by to_dict().
    raw = json.loads((path / "config.json").read_text())
    unused = {k: v for k, v in raw.items() if k not in {f.name for f in dataclasses.fields(GPT2Config)}}
    assert unused["architectures"] == ["GPT2LMHeadModel"]  # written by transformers' save_pretrained
    assert cfg.kwargs == unused
    assert {k: cfg.to_dict()[k] for k in unused} == unused


def test_config_defaults_and_presets():
    cfg = GPT2Config.from_dict({"vocab_size": 100, "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2})
    assert cfg.n_inner == 128 and cfg.head_dim == 16 and cfg.context_window_size == 32
    assert set(PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}
    xl = get_config("gpt2-xl")
    assert (xl.n_embd, xl.n_layer, xl.n_head, xl.head_dim) == (1600, 48, 25, 64)
    assert get_config("distilgpt2").n_layer == 6


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"n_embd": 30, "n_head": 4}, "divisible by n_head"),
        ({"activation_function": "swish"}, "unsupported activation_function"),
        ({"n_layer": 0}, "positive integer"),
        ({"context_window_size": 4096}, "exceeds the position table"),
    ],
)
def test_invalid_config_is_one_clear_error(bad, message):
    base = {"vocab_size": 100, "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2}
    base.update(bad)
    with pytest.raises(ConfigError, match=message):
        GPT2Config.from_dict(base)


def test_unknown_model_and_quantization():
    with pytest.raises(ConfigError, match="not a preset"):
        get_config("gpt3-nope")
    with pytest.raises(QuantizationError, match="known: q0f32, q0f16, q4f16_1"):
        get_scheme("q3f8")


# ----------------------------------------------------------------------------- parameters
def test_exported_params_match_hf_state_dict_one_to_one(hf_sharded):
    path, model = hf_sharded
    cfg = GPT2Config.from_file(path)
    specs = {n: s for n, s, _ in export_model(cfg, quantization="q0f32", target=LLVM).param_specs()}
    hf = {k: tuple(v.shape) for k, v in model.state_dict().items()
          if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert "lm_head.weight" in hf and "lm_head.weight" not in specs  # tied: stored once
    del hf["lm_head.weight"]
    assert set(specs) == set(hf)
    for name, shape in hf.items():
        conv1d = name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))
        assert specs[name] == (shape[::-1] if conv1d else shape), name


def test_loader_transposes_conv1d_and_reads_all_formats(hf_sharded, hf_bin):
    for path, model in (hf_sharded, hf_bin):
        params = load_hf_params(path, GPT2Config.from_file(path))
        state = {k: v.numpy() for k, v in model.state_dict().items()}
        np.testing.assert_array_equal(params["transformer.h.1.attn.c_attn.weight"], state["transformer.h.1.attn.c_attn.weight"].T)
        np.testing.assert_array_equal(params["transformer.h.0.mlp.c_proj.weight"], state["transformer.h.0.mlp.c_proj.weight"].T)
        np.testing.assert_array_equal(params["transformer.wpe.weight"], state["transformer.wpe.weight"])
        np.testing.assert_array_equal(params["transformer.ln_f.bias"], state["transformer.ln_f.bias"])


def test_loader_accepts_names_without_transformer_prefix(tmp_path):
    from safetensors.numpy import save_file
    from transformers import GPT2Model

    import torch

    torch.manual_seed(3)
    src = tmp_path / "src"
    save_hf_checkpoint(src)
    cfg = GPT2Config.from_file(src)
    base = GPT2Model(_hf_config(src)).eval()  # GPT2Model saves without "transformer."
    state = {k: v.numpy() for k, v in base.state_dict().items()}
    out = tmp_path / "bare"
    out.mkdir()
    (out / "config.json").write_text((src / "config.json").read_text())
    save_file(state, str(out / "model.safetensors"))
    params = load_hf_params(out, cfg)
    np.testing.assert_array_equal(params["transformer.h.0.attn.c_proj.weight"], state["h.0.attn.c_proj.weight"].T)


def _hf_config(path):
    from transformers import GPT2Config as HFConfig

    return HFConfig.from_pretrained(str(path))


def _rewrite(src, dst, edit):
    """Copy checkpoint src to dst with its single safetensors file edited by `edit(dict)`."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"))


@pytest.fixture(scope="module")
def hf_single(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_single")
    save_hf_checkpoint(path, seed=2)
    assert (path / "model.safetensors").is_file()
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"), r"missing tensors: transformer\.h\.1\.mlp\.c_fc\.bias"),
        (lambda s: s.__setitem__("transformer.h.0.attn.extra", np.zeros(3, np.float32)), r"unexpected tensors: transformer\.h\.0\.attn\.extra"),
        (lambda s: s.__setitem__("transformer.wpe.weight", np.zeros((10, 64), np.float32)), r"wrongly shaped tensors: transformer\.wpe\.weight"),
        (lambda s: s.__setitem__("lm_head.weight", np.ones((1001, 64), np.float32)), "only tied heads"),
    ],
)
def test_mismatched_checkpoint_is_one_clear_error(hf_single, tmp_path, edit, message):
    bad = tmp_path / "bad"
    _rewrite(hf_single, bad, edit)
    with pytest.raises(CheckpointError, match=message):
        load_hf_params(bad, GPT2Config.from_file(bad))


def test_missing_and_corrupt_checkpoints(hf_single, tmp_path):
    cfg = GPT2Config.from_file(hf_single)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_params(tmp_path / "nope", cfg)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((hf_single / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights"):
        load_hf_params(empty, cfg)
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (hf_single / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match="cannot read"):
        load_hf_params(broken, cfg)
    # A checkpoint of another size than its config says.
    other = tmp_path / "other"
    other.mkdir()
    cfg_json = json.loads((hf_single / "config.json").read_text())
    cfg_json["n_layer"] = 3
    (other / "config.json").write_text(json.dumps(cfg_json))
    (other / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"missing tensors: transformer\.h\.2\."):
        load_hf_params(other, GPT2Config.from_file(other))
    with pytest.raises(ConfigError, match="no config.json"):
        GPT2Config.from_file(empty / "sub")


# ----------------------------------------------------------------------------- quantization
def test_group_quantize_round_trip_against_numpy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 96)).astype(np.float32)
    packed, scale = group_quantize(w)
    assert packed.shape == (48, 12) and packed.dtype == np.uint32
    assert scale.shape == (48, 3) and scale.dtype == np.float16
    back = group_dequantize(packed, scale)
    # Independent reference: per-group symmetric rounding to 15 levels.
    groups = w.reshape(48, 3, 32)
    s = (np.abs(groups).max(-1, keepdims=True) / 7).astype(np.float16).astype(np.float32)
    ref = (np.clip(np.rint(groups / s), -7, 7) * s).reshape(48, 96)
    np.testing.assert_allclose(back, ref, rtol=0, atol=1e-6)
    assert np.abs(back - w).max() <= np.abs(w).max() / 7  # within half a step of the largest group
    with pytest.raises(QuantizationError, match="divisible by the group size 32"):
        group_quantize(np.zeros((4, 40), np.float32))


def test_q4_needs_groupable_sizes():
    cfg = GPT2Config.from_dict({"vocab_size": 50, "n_positions": 16, "n_embd": 64, "n_layer": 1, "n_head": 4, "n_inner": 80})
    with pytest.raises(QuantizationError, match="in_features divisible"):
        export_model(cfg, quantization="q4f16_1", target=LLVM)


def test_registry_entry_drives_the_workflow(hf_single):
    entry = MODELS["gpt2"]
    cfg = entry.config.from_file(hf_single)
    params = entry.source["huggingface-safetensor"](hf_single, cfg)
    stored = entry.quantize["q4f16_1"](params)
    assert stored["transformer.h.0.attn.c_attn.q_weight"].dtype == np.uint32
    assert "transformer.h.0.attn.c_attn.weight" not in stored
    assert stored["transformer.wpe.weight"].dtype == np.float16


def test_weights_round_trip_and_truncation(tmp_path):
    rng = np.random.default_rng(1)
    params = {"a": rng.normal(size=(300, 100)).astype(np.float16), "b": np.arange(12, dtype=np.uint32).reshape(3, 4),
              "c": rng.normal(size=(7,)).astype(np.float32)}
    save_params(params, tmp_path, shard_bytes=50_000)
    assert len(list(tmp_path.glob("params_shard_*.bin"))) == 2
    back = load_params(tmp_path)
    assert list(back) == list(params)
    for k, v in params.items():
        np.testing.assert_array_equal(back[k], v)
    shard = tmp_path / "params_shard_1.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(WeightsError, match="truncated"):
        load_params(tmp_path)
