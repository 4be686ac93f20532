"""A torchrun worker for the file-sharing test: rank 1 acts as a node that cannot see rank 0's disk.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_file_worker.py FILE

Each rank prints "rank R PATH SHA256 SCRATCH_LEFT" for the path ``fetch_file`` gave it.
"""
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.runtime import distributed  # noqa: E402


def main() -> None:
    distributed.FILE_CHUNK_BYTES = 1000  # several pieces, even for a small file
    env = distributed.LaunchEnv.from_environ()
    if env.rank == 1:
        distributed._holds_copy = lambda path, size: False
    group = distributed.init_distributed(env, "cpu", "fp32", timeout_s=30)
    path = group.fetch_file(distributed.SharedFile.of(Path(sys.argv[1])))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    group.close()
    sys.stdout.write(f"rank {env.rank} {path} {digest} {path.exists()}\n")  # one write: ranks share the pipe
    sys.stdout.flush()


if __name__ == "__main__":
    main()
