"""Build bench's TVM libraries for a GPU arch on a machine without that GPU, into a library cache
to carry to the GPU box (the device tool's ``carry``), so the device's time goes to measuring.

    python scripts/prebuild_libs.py --arch sm_90 --cache-dir .devlibs          # untuned + tuned
    # on the GPU box: GPT2K_CACHE_DIR=... with .devlibs/* copied into it (scripts/session.sh libs)

The cache entries are exactly bench's (:func:`bench.build.ensure_library`: same key from the
config, quantization, target, database hash, CUDA-graph flag, TVM version and this checkout's
source hash), so ``bench decode/prefill`` on the device finds them (its rows say ``cache_hit``)
as long as the checkout and database are the same. A CUDA library is about 6 MB.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90", help="CUDA arch to build for (default sm_90)")
    p.add_argument("--model", default="gpt2")
    p.add_argument("--quantization", default="q0f16")
    p.add_argument("--variants", default="untuned,tuned", help="untuned and/or tuned (default both)")
    p.add_argument("--database-dir", default="databases")
    p.add_argument("--cache-dir", default=".devlibs", help="library cache to fill (default .devlibs, git-ignored)")
    p.add_argument("--cuda-graph", choices=("on", "off"), default="on", help="as bench's --cuda-graph (default on)")
    args = p.parse_args(argv)

    from bench.build import ensure_library, locate_database  # pylint: disable=import-outside-toplevel
    from gpt2_model.config import get_config, model_name  # pylint: disable=import-outside-toplevel
    from tuning.engine import target_for  # pylint: disable=import-outside-toplevel

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ("untuned", "tuned")]
    if bad or not variants:
        p.error(f"--variants: untuned and/or tuned, got {args.variants!r}")
    config = get_config(args.model)
    target = target_for("cuda", args.arch)
    for variant in variants:
        db = None
        if variant == "tuned":
            db, msg = locate_database(database_dir=args.database_dir, model=model_name(args.model),
                                      quantization=args.quantization, target=target, model_hash=config.model_hash())
            if db is None:
                print(f"tuned: {msg}", file=sys.stderr)
                return 1
        t0 = time.perf_counter()
        lib_dir, key, _meta, hit, _build_s, _exp = ensure_library(
            config=config, quantization=args.quantization, target=target, database=db,
            cuda_graph=args.cuda_graph == "on", cache_dir=args.cache_dir)
        size = (lib_dir / "lib.so").stat().st_size / 1e6
        print(f"{variant}: {'already there' if hit else 'built'} in {time.perf_counter() - t0:.0f} s: "
              f"{lib_dir} ({size:.1f} MB, key {key}{', database ' + db.hash[:12] if db else ''})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
