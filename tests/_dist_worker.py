"""Run by tests/test_distributed_gram.py under torchrun: one rank of distributed_gram on a folder of
snapshots; rank 0 saves the Gram to ARGV[2] (a .pt of tensors only)."""
import sys

import torch
import torch.distributed as dist

from pylandscape.distributed import distributed_gram
from pylandscape.snapshots import SnapshotError, open_source

if __name__ == "__main__":
    folder, out, panel_rows, cols = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    dist.init_process_group("gloo")
    try:
        sset = open_source(folder)
        rows = list(range(len(sset)))
        try:
            G, info = distributed_gram(sset, rows, panel_rows=panel_rows, cols=cols)
        except SnapshotError as e:
            sys.stderr.write(f"rank {dist.get_rank()} error: {e}\n")  # one write: ranks share stderr
            sys.stderr.flush()
            # every rank raised (or this barrier would time out): wait until all have printed, since
            # torchrun stops the others as soon as one exits
            dist.barrier()
            sys.exit(3)
        if dist.get_rank() == 0:
            torch.save({"G": G}, out)
    finally:
        dist.destroy_process_group()
