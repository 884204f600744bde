"""``python -m ctr.serving``: run one serving replica (the command ``ctr serve`` mounts).

    CTR_ADMIN_TOKEN=secret python -m ctr.serving --bootstrap 127.0.0.1:9092 \\
        --snapshot-dir .ctr/learner/snapshots --feast-dir .ctr/feast --port 8000
"""

from ctr.infra.cli_options import run_command
from ctr.serving.cli import serve_command

run_command(serve_command, "python -m ctr.serving")
