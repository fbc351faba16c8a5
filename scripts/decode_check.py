"""GPU-box check of the device decode loop: greedy tokens vs HF, then ms/step of three paths.

Run on the GPU machine from the repository root (venv active)::

    python scripts/decode_check.py --out decode_check.json

1. Builds preset gpt2 q0f16 for ``--arch`` (sm_90) with the committed database and CUDA graphs,
   seeded random weights (``bench.peers.random_params``), and checks that greedy
   ``Engine.generate`` (the device loop) equals HF ``generate`` in fp16 on the same GPU token for
   token (32 tokens), and equals the host-argmax loop. The same for q0f32 (no database, HF fp32).
   On a mismatch it prints the first differing step and HF fp32's top-1 - top-2 logit margin
   there (a near-tie flip reads very differently from a bug).
2. Times ms/step at each ``--batches`` (prompt ``--prompt-len``, ``--steps`` timed steps after
   warm-up) for: ``host-argmax`` (``Engine.decode``: token ids uploaded, logits copied back,
   argmax on the host, every step), ``device-loop`` (``Engine.decode_tokens``: ids fed from the
   previous step on the device, one sync at the end) and the gpt-fast-style peer
   (``bench/gptfast.py``: torch.compile reduce-overhead + fullgraph; its compile is in warm-up).

Each part runs in its own try/except (an error is printed and recorded, the rest goes on); a
table is printed and everything is written as JSON to ``--out``. Budget: about 4 minutes on an
H200 (two builds with only the buckets it needs, three torch compiles).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# scripts/ itself is sys.path[0] when run as a script, and scripts/step_profile.py would shadow the
# standard library's profile module (which torch / transformers import): drop it, add the root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

GEN_TOKENS = 32
PROMPT_TOKENS = 16
DEVICE = "cuda"  # --device cpu (with --arch cpu --model tiny) smoke-tests this script on a CPU


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _part(report: dict, name: str, fn):
    """Run one part; an exception is printed and recorded under report['errors'][name]."""
    start = time.time()
    try:
        out = fn()
        _log(f"{name}: done in {time.time() - start:.1f} s")
        return out
    except Exception as err:  # noqa: BLE001 - keep going, say what failed
        traceback.print_exc()
        report.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        _log(f"{name}: FAILED ({report['errors'][name]})")
        return None


def build(config, params, *, quantization: str, arch: str, database, buckets):
    """Engine with only the buckets this check needs (plus the database's), CUDA graphs on."""
    from gpt2_model.quantization import convert_params
    from gpt2_model.runtime import Engine
    from tuning.compile import build_model
    from tuning.targets import make_target

    target = make_target(arch)
    result = build_model(config, quantization=quantization, target=target, database=database, cuda_graph=True,
                         buckets=buckets)
    engine = Engine(exported=result.exported, executable=result.executable,
                    params=convert_params(params, result.exported.scheme), device=DEVICE, target=target)
    engine.build_result = result
    return engine


def hf_generate(model, prompt: list[int], n: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt], device=DEVICE)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
                             attention_mask=torch.ones_like(ids))
    return out[0, len(prompt):].tolist()


def first_mismatch(ours: list[int], theirs: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)


def margin_at(model_f32, prefix: list[int]) -> dict:
    """HF fp32's top-2 at ``prefix``: how close the two candidates were."""
    import torch

    with torch.no_grad():
        logits = model_f32(torch.tensor([prefix], device=DEVICE)).logits[0, -1].float()
    top = torch.topk(logits, 2)
    return {"top2_ids": top.indices.tolist(), "margin": float(top.values[0] - top.values[1])}


def check_tokens(engine, config, params, *, dtype: str, prompt: list[int]) -> dict:
    """Device loop vs HF generate (same dtype, same GPU) vs the host-argmax loop."""
    from bench.peers import build_hf_model

    model = build_hf_model(config, params=params, dtype=dtype, device=DEVICE)
    theirs = hf_generate(model, prompt, GEN_TOKENS)
    ours = engine.generate(prompt, GEN_TOKENS)
    seq = engine.add_sequence()
    try:
        host = engine._generate_on_host(seq, np.array(prompt, np.int32), GEN_TOKENS, False)  # noqa: SLF001
    finally:
        engine.remove_sequence(seq)
    res = {"equal_hf": ours == theirs, "equal_host_loop": ours == host, "ours": ours, "hf": theirs, "host_loop": host}
    bad = first_mismatch(ours, theirs)
    if bad is not None:
        ref = model if dtype == "float32" else build_hf_model(config, params=params, dtype="float32", device=DEVICE)
        res["first_mismatch"] = {"step": bad, **margin_at(ref, prompt + theirs[:bad])}
    _log(f"{dtype}: device loop == HF generate: {res['equal_hf']}, == host loop: {res['equal_host_loop']}"
         + (f"; first mismatch {res['first_mismatch']}" if bad is not None else ""))
    return res


def _prompts(config, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))


def time_host_argmax(engine, batch: int, prompt_len: int, steps: int, warmup: int) -> float:
    """ms/step of Engine.decode with the argmax on the host (the old generate loop)."""
    seqs = [engine.add_sequence() for _ in range(batch)]
    try:
        tokens = [int(np.argmax(engine.prefill(s, p))) for s, p in zip(seqs, _prompts(engine.config, batch, prompt_len))]
        for i in range(warmup + steps):
            if i == warmup:
                start = time.perf_counter()
            tokens = engine.decode(seqs, tokens).argmax(axis=-1).tolist()
        return (time.perf_counter() - start) / steps * 1e3
    finally:
        for s in seqs:
            engine.remove_sequence(s)


def time_device_loop(engine, batch: int, prompt_len: int, steps: int, warmup: int) -> float:
    """ms/step of Engine.decode_tokens fed from the device (one sync at the end)."""
    import tvm

    seqs = [engine.add_sequence() for _ in range(batch)]
    try:
        first = [int(engine.prefill_tokens(s, p).numpy()[0])
                 for s, p in zip(seqs, _prompts(engine.config, batch, prompt_len))]
        ids = tvm.runtime.tensor(np.array(first, np.int32), engine.device)
        for i in range(warmup + steps):
            if i == warmup:
                ids.numpy()  # wait for the warm-up (graph capture included)
                start = time.perf_counter()
            ids = engine.decode_tokens(seqs, ids)
        ids.numpy()
        return (time.perf_counter() - start) / steps * 1e3
    finally:
        for s in seqs:
            engine.remove_sequence(s)


def time_peer(config, params, batch: int, prompt_len: int, steps: int, warmup: int) -> float:
    """ms/step of the gpt-fast-style peer (fp16, reduce-overhead + fullgraph)."""
    from bench.gptfast import GptFastDecodeRunner

    runner = GptFastDecodeRunner(config, params, dtype="float16", device=DEVICE, compiled=True, compile_prefill=False)
    runner.start(batch=batch, prompt_len=prompt_len, gen_len=warmup + 1 + steps)
    for _ in range(warmup):  # torch.compile and CUDA-graph recording happen here
        runner.step()
    runner.step().cpu()  # one more, and wait for it
    start = time.perf_counter()
    for _ in range(steps - 1):
        runner.step()
    runner.step().cpu()  # the last one waits for the device
    runner.stop()
    return (time.perf_counter() - start) / steps * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64, help="timed steps per path and batch")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-f32", action="store_true")
    ap.add_argument("--model", default="gpt2", help="preset (tiny for a CPU smoke run)")
    ap.add_argument("--device", default="cuda", help="cuda (cpu: smoke run with --arch cpu --model tiny)")
    args = ap.parse_args(argv)
    global DEVICE  # noqa: PLW0603 - one run, one device
    DEVICE = args.device
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("{}")  # fail now, not after the run, if it cannot be written
    batches = [int(b) for b in args.batches.split(",")]

    from bench.peers import random_params
    from gpt2_model.config import get_config

    report: dict = {"arch": args.arch, "batches": batches, "prompt_len": args.prompt_len, "steps": args.steps,
                    "gen_tokens": GEN_TOKENS, "timings": [], "checks": {}}
    try:
        import torch
        import tvm

        gpu = torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else None
        report["env"] = {"gpu": gpu, "torch": torch.__version__, "tvm": tvm.__version__}
    except Exception as err:  # noqa: BLE001
        report["env"] = {"error": str(err)}
    config = get_config(args.model)
    params = random_params(config, seed=0)
    prompt = _prompts(config, 1, PROMPT_TOKENS, seed=1)[0].tolist()
    database = ROOT / "databases" / args.arch / f"{args.model}-q0f16"
    database = database if database.is_dir() else None
    report["database"] = str(database) if database else None

    t0 = time.time()
    engine = _part(report, "build q0f16", lambda: build(
        config, params, quantization="q0f16", arch=args.arch, database=database,
        buckets={"decode": sorted(set(batches) | {1}), "prefill": [args.prompt_len]}))
    report["build_q0f16_s"] = round(time.time() - t0, 1)
    if engine is not None:
        report["checks"]["q0f16"] = _part(report, "check q0f16", lambda: check_tokens(
            engine, config, params, dtype="float16", prompt=prompt))
        for b in batches:
            row = {"batch": b}
            for name, fn in (("host-argmax", time_host_argmax), ("device-loop", time_device_loop)):
                ms = _part(report, f"time {name} b{b}", lambda fn=fn: fn(engine, b, args.prompt_len, args.steps,
                                                                         args.warmup))
                row[name] = round(ms, 4) if ms is not None else None
            report["timings"].append(row)
        del engine
    if not args.skip_peer:
        for b in batches:
            ms = _part(report, f"time gpt-fast b{b}", lambda b=b: time_peer(config, params, b, args.prompt_len,
                                                                           args.steps, args.warmup))
            row = next((r for r in report["timings"] if r["batch"] == b), None)
            if row is None:
                row = {"batch": b}
                report["timings"].append(row)
            row["gpt-fast"] = round(ms, 4) if ms is not None else None
    if not args.skip_f32:
        t0 = time.time()
        engine32 = _part(report, "build q0f32", lambda: build(config, params, quantization="q0f32", arch=args.arch,
                                                             database=None, buckets={"decode": [1], "prefill": []}))
        report["build_q0f32_s"] = round(time.time() - t0, 1)
        if engine32 is not None:
            report["checks"]["q0f32"] = _part(report, "check q0f32", lambda: check_tokens(
                engine32, config, params, dtype="float32", prompt=prompt))

    print()
    print(f"{args.model} q0f16 {args.arch}, prompt {args.prompt_len}, {args.steps} timed steps: ms/step (tok/s)")
    cols = ["host-argmax", "device-loop", "gpt-fast"]
    print(f"{'batch':>5} | " + " | ".join(f"{c:>20}" for c in cols))
    for row in report["timings"]:
        cells = []
        for c in cols:
            ms = row.get(c)
            cells.append(f"{ms:8.3f} ({row['batch'] / ms * 1e3:9.0f})" if ms else f"{'-':>20}")
        print(f"{row['batch']:>5} | " + " | ".join(cells))
    for quant, res in report["checks"].items():
        if res:
            print(f"{quant}: greedy device loop == HF generate ({GEN_TOKENS} tokens): {res['equal_hf']}; "
                  f"== host-argmax loop: {res['equal_host_loop']}" + (f"; first mismatch {res['first_mismatch']}"
                                                                       if "first_mismatch" in res else ""))
    for name, err in report.get("errors", {}).items():
        print(f"ERROR {name}: {err}")
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
