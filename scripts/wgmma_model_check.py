#!/usr/bin/env python
"""A model whose prefill and decode GEMMs run the wgmma kernel, on an sm_90 GPU: it builds, loads and agrees.

Builds the ``tiny`` preset (q0f16, prefill bucket 128, decode bucket 16) for sm_90 twice -- as the
untuned build does, and with a :class:`~gpt2_model.wgmma_plan.GemmPlan` naming the four GEMMs of
the prefill chunk and of the decode batch of 16 (rows 16..63 of the 64-row tile empty) -- exports and
reloads both libraries, prefills 16 sequences of random tokens with the same seeded weights, decodes
one step of all 16, and compares the prefill's last-position logits and the decode step's logits
(fp16 models: max |a - b| / max |b| <= 2e-2 each). Prints one line per build and PASS/FAIL; exit
status 1 on FAIL.

    PYTHONPATH=$PWD python scripts/wgmma_model_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH = 16  # the decode bucket checked (the smallest the wgmma search takes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--config", default="64x64x64s6c1nows", help="wgmma constants for the GEMMs but MLP c_proj")
    ap.add_argument("--split-config", default="64x64x64s4c1nowsk4", help="wgmma constants for MLP c_proj (split-K)")
    args = ap.parse_args(argv)

    import numpy as np
    import tvm

    from gpt2_model.config import get_config
    from gpt2_model.export import export_model
    from gpt2_model.loader import random_params
    from gpt2_model.runtime import Engine
    from gpt2_model.wgmma_gemm import parse_config
    from gpt2_model.wgmma_plan import GemmPlan
    from tuning.compile import build
    from tuning.targets import make_target
    from tuning.wgmma_tune import gemm_keys

    config = get_config("tiny")
    target = make_target("sm_90")
    keys = gemm_keys(config, dtype="float16", lengths=[128], batches=[BATCH])
    # the K = 4 * n_embd GEMM (MLP c_proj) in split-K form: a 4-CTA cluster per output tile
    plan = GemmPlan({k.name(): parse_config(args.split_config if k.k >= 4 * config.n_embd else args.config)
                     for k in keys})
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, 128 if i == 0 else int(rng.integers(3, 40))) for i in range(BATCH)]
    nxt = rng.integers(0, config.vocab_size, BATCH)
    logits, steps, report = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, gemm in (("partition", None), ("wgmma", plan)):
            t0 = time.time()
            exported = export_model(config, quantization="q0f16", target=target,
                                    buckets={"prefill": [128], "decode": [BATCH]}, gemm=gemm)
            lib = Path(tmp) / f"{label}.so"
            build(exported, target=target).export_library(str(lib))
            built = time.time() - t0
            engine = Engine(exported=exported, executable=tvm.runtime.load_module(str(lib)),
                            params=random_params(exported, seed=0), device="cuda")
            seqs = [engine.add_sequence() for _ in prompts]
            first = [np.asarray(engine.prefill(s, p), dtype=np.float32) for s, p in zip(seqs, prompts)]
            logits[label] = first[0]  # the 128-token prompt: the planned chunk
            steps[label] = np.asarray(engine.decode(seqs, nxt), dtype=np.float32)  # the b16 bucket
            report[label] = {"wgmma_kernels": exported.metadata["wgmma_gemm"], "build_s": round(built, 1),
                             "finite": bool(np.all(np.isfinite(logits[label])) and np.all(np.isfinite(steps[label])))}
            print(f"{label}: built and loaded in {built:.1f} s; {len(exported.metadata['wgmma_gemm'])} wgmma GEMMs",
                  flush=True)
    err = float(np.abs(logits["wgmma"] - logits["partition"]).max() / np.abs(logits["partition"]).max())
    derr = float(np.abs(steps["wgmma"] - steps["partition"]).max() / np.abs(steps["partition"]).max())
    ok = err <= 2e-2 and derr <= 2e-2 and all(r["finite"] for r in report.values())
    print(f"wgmma vs partition build: prefill logits max rel err {err:.2e}, decode b{BATCH} step {derr:.2e} "
          f"-> {'PASS' if ok else 'FAIL'}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "wgmma_model_check.json").write_text(json.dumps(
            {"rel_err": err, "decode_rel_err": derr, "ok": ok, "builds": report, "config": args.config,
             "split_config": args.split_config}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
