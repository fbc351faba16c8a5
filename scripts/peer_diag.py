"""GPU-box diagnosis of the gpt-fast-style peer's decode step (bench/gptfast.py).

Times ms/step at b1/b8/b32 (CUDA events, 64 steps after 16 warm-up steps) and prints every log
record torch emits while compiling and replaying: "skipping cudagraphs due to ..." means the step
ran without CUDA graphs, the usual reason for a slow reduce-overhead step. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if "cudagraph" in msg.lower() or "skipping" in msg.lower() or "recompil" in msg.lower():
            self.lines.append(f"{record.name}: {msg[:300]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,8,32")
    args = ap.parse_args()
    import torch

    from bench.peers import random_params
    from bench.gptfast import GptFastDecodeRunner
    from gpt2_model.config import get_config

    torch._logging.set_logs(perf_hints=True, recompiles=True)  # pylint: disable=protected-access
    keep = _Keep()
    logging.getLogger("torch").addHandler(keep)
    config = get_config("gpt2")
    params = random_params(config, seed=0)
    results = {}
    for b in (int(x) for x in args.batches.split(",")):
        runner = GptFastDecodeRunner(config, params, dtype="float16", device="cuda", compiled=True)
        runner.start(batch=b, prompt_len=128, gen_len=128)
        for _ in range(16):
            runner.step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(64):
            runner.step()
        end.record()
        torch.cuda.synchronize()
        results[f"b{b}"] = start.elapsed_time(end) / 64
        print(f"b{b}: {results[f'b{b}']:.3f} ms/step", flush=True)
        runner.stop()
    results["log"] = keep.lines
    for line in keep.lines:
        print("LOG", line)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
