"""Shared fixtures: small random GPT-2 checkpoints written by `transformers` itself."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: A config that exercises what differs from the defaults: odd vocab, explicit n_inner,
#: scale_attn_by_inverse_layer_idx. n_inner stays a multiple of 32 so q4f16_1 can hold it.
SMALL_HF_CONFIG = dict(vocab_size=1001, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=96,
                       scale_attn_by_inverse_layer_idx=True, bos_token_id=0, eos_token_id=0)


def has_cuda() -> bool:
    try:
        import tvm  # pylint: disable=import-outside-toplevel

        return bool(tvm.cuda(0).exist)
    except Exception:  # pylint: disable=broad-except
        return False


def pytest_report_header(config):
    """Say when the slow end-to-end tests are left out (pyproject's default `-m "not slow"`)."""
    if "not slow" in (config.getoption("markexpr") or ""):
        return "slow end-to-end tests deselected; run them with: python -m pytest -m slow tests"
    return None


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def save_hf_checkpoint(path: Path, *, seed: int = 0, safe: bool = True, shard: str | None = None, **overrides):
    """Save a random GPT2LMHeadModel with `save_pretrained`; returns the HF model (eval, fp32)."""
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import GPT2Config, GPT2LMHeadModel  # pylint: disable=import-outside-toplevel

    torch.manual_seed(seed)
    cfg = dict(SMALL_HF_CONFIG)
    cfg.update(overrides)
    model = GPT2LMHeadModel(GPT2Config(**cfg)).eval()
    # Non-trivial layer norms and biases, so a wrong mapping cannot hide behind ones and zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(path), **kwargs)
    if not safe:
        # transformers 5 only writes safetensors; pytorch_model.bin is a pickled state dict
        # (older releases and many hub checkpoints), written the same way torch.save does it.
        for f in list(path.glob("model*.safetensors*")):
            f.unlink()
        torch.save(model.state_dict(), str(path / "pytorch_model.bin"))
    return model


@pytest.fixture(scope="session")
def hf_sharded(tmp_path_factory):
    """(dir, model): sharded safetensors with model.safetensors.index.json."""
    path = tmp_path_factory.mktemp("hf_sharded")
    model = save_hf_checkpoint(path, shard="200KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path, model


@pytest.fixture(scope="session")
def hf_bin(tmp_path_factory):
    """(dir, model): a pytorch_model.bin checkpoint (different seed)."""
    path = tmp_path_factory.mktemp("hf_bin")
    model = save_hf_checkpoint(path, seed=1, safe=False)
    assert (path / "pytorch_model.bin").is_file()
    return path, model


def hf_last_logits(model, ids) -> np.ndarray:
    import torch  # pylint: disable=import-outside-toplevel

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0, -1].float().numpy()


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |a - e| / max |e| (the issue's 'max-abs over max-abs')."""
    return float(np.abs(actual - expected).max() / np.abs(expected).max())
