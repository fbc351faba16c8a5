#!/usr/bin/env python
"""Find where a tuned engine stops: each stage prints as it finishes; a watchdog dumps the stack.

    python bench/device/diag_decode.py [--cuda-graph] [--attention-only]
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time

import numpy as np


def say(msg):
    print(f"[{time.strftime('%T')}] {msg}", flush=True)


def attention_only():
    import tvm

    from gpt2_model.config import get_config
    from tuning import attention as A
    from tuning.targets import make_target

    t = make_target("sm_90")
    key = A.attention_key(get_config("gpt2"), "float16")
    best = A.PrefillConfig(**A.read_attention("databases/sm_90/gpt2-q0f16")["kernels"][0]["best"]["config"])
    for cfg in (None, best):
        f = A.make_ragged_prefill(cfg, key, t)
        lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=t)
        for n in (1, 8, 37, 100, 128, 200):
            args, q, k, v, sm = A.ragged_prefill_args(key, n, device=tvm.cuda(0))
            say(f"attention {cfg.label() if cfg else 'TVM'} n={n} ...")
            lib["main"](*args, 1, 0, 1.0, 1.0, sm)
            tvm.cuda(0).sync()
            err = np.abs(args[7].numpy().astype(np.float32) - A.reference_causal_attention(q, k, v, sm)).max()
            say(f"   ok, max abs err {err:.2e}")


def engine(cuda_graph: bool):
    from bench.build import find_database, load_engine
    from bench.peers import random_params
    from gpt2_model.config import get_config
    from gpt2_model.runtime import target_for

    config = get_config("gpt2")
    target = target_for("cuda:0", "sm_90")
    db, _ = find_database(database_dir="databases", arch="sm_90", model="gpt2", quantization="q0f16", explicit=None,
                          target=target)
    say(f"loading tuned engine (cuda_graph={cuda_graph})")
    e = load_engine(config=config, quantization="q0f16", device="cuda:0", target=target,
                    params_fp32=random_params(config, seed=0), database=db, cuda_graph=cuda_graph,
                    max_batch_size=32, max_total_seq_len=32 * 300).engine
    rng = np.random.default_rng(0)
    for n in (8, 128):
        s = e.add_sequence()
        say(f"prefill {n} ...")
        e.prefill(s, rng.integers(0, 50257, n))
        e.device.sync()
        say("   ok")
        e.remove_sequence(s)
    for b in (1, 8, 32):
        seqs = [e.add_sequence() for _ in range(b)]
        for s in seqs:
            e.prefill(s, rng.integers(0, 50257, 128))
        say(f"decode b{b} ...")
        for _ in range(3):
            e.decode(seqs, list(rng.integers(0, 50257, b)))
        e.device.sync()
        say("   ok")
        for s in seqs:
            e.remove_sequence(s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--attention-only", action="store_true")
    args = ap.parse_args()
    faulthandler.dump_traceback_later(100, exit=True)
    if args.attention_only:
        attention_only()
    else:
        engine(args.cuda_graph)
    return 0


if __name__ == "__main__":
    sys.exit(main())
