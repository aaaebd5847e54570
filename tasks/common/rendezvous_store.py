"""A stand-alone rendezvous store: `python -m tasks.common.rendezvous_store --port 29400`.

torch's TCPStore, serving until SIGTERM. Where no node of a multi-node training has a fixed
address (Kubernetes pods: deploy/kubernetes/rendezvous.yaml), every node's launcher points
train.distributed.rdzv_endpoint at this store and connects to it as a client; where one node
has (bare metal), its launcher hosts the store itself and this is not needed.
"""

from __future__ import annotations

import argparse
import signal
import sys
from datetime import timedelta

from torch.distributed import TCPStore


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=29400)
    args = parser.parse_args(argv)
    store = TCPStore(
        args.host,
        args.port,
        is_master=True,
        wait_for_workers=False,
        multi_tenant=True,
        timeout=timedelta(hours=24),
    )
    print(f"rendezvous store on {args.host}:{store.port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
