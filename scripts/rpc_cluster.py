"""Start a TVM RPC tracker and one RPC server per visible GPU on this machine, for ``tune``.

    python scripts/rpc_cluster.py --key sm_90                  # tracker on 0.0.0.0:9190, one server per GPU
    python scripts/rpc_cluster.py --key cpu --servers 2        # CPU servers (no GPU needed)

Each server sees only its card (``CUDA_VISIBLE_DEVICES``), runs with ``--no-fork`` (CUDA cannot
be used in a forked session) and registers under the one key. The script waits until all have
registered, prints the ``tune`` command to run (here, or on another machine with
``--rpc-tracker THIS_HOST:PORT``), and keeps them up until interrupted (Ctrl-C stops them all).
Several hosts: run this on one GPU box (the tracker and its servers), and on every other box one
``CUDA_VISIBLE_DEVICES=i python -m tvm.exec.rpc_server --tracker TRACKER_HOST:9190 --key KEY --no-fork``
per GPU; ``tune`` then measures on all of them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def visible_gpus() -> list[str]:
    """The GPU indices this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else NVML's count."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import pynvml  # pylint: disable=import-outside-toplevel  # optional: no GPU, no NVML

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pylint: disable=broad-except  # no driver here
        return []


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--key", required=True, help="device key the servers register under (e.g. sm_90)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: other machines too)")
    p.add_argument("--port", type=int, default=9190, help="tracker port (default 9190)")
    p.add_argument("--servers", type=int, default=None,
                   help="number of CPU servers instead of one per GPU (for CPU targets and tests)")
    args = p.parse_args(argv)
    from tuning.rpc import LocalRPC  # pylint: disable=import-outside-toplevel  # after parsing: fast --help

    devices = None if args.servers else visible_gpus()
    if devices is not None and not devices:
        print("rpc_cluster: no GPU visible (pass --servers N for CPU servers)", file=sys.stderr)
        return 1
    n = args.servers or len(devices)
    with LocalRPC(key=args.key, host=args.host, port=args.port, n_servers=n, devices=devices) as rpc:
        where = f"GPUs {','.join(devices)}" if devices else "CPU"
        print(f"tracker {args.host}:{rpc.port}: {n} server(s) under key {args.key!r} ({where}), all registered",
              flush=True)
        print(f"tune ... --arch ARCH --rpc-tracker {'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{rpc.port} "
              f"--rpc-key {args.key}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while all(s.proc is not None and s.proc.poll() is None for s in rpc.servers):
                time.sleep(1)
            print("rpc_cluster: a server exited; stopping", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
