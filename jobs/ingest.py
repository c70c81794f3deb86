"""Ingest a video or frame corpus into aligned-face segment shards (a Ray job).

    ray job submit --working-dir . -- python jobs/ingest.py SOURCE OUT --layout videos
    python jobs/ingest.py --config jobs/configs/ingest-smoke.yaml --set min_face_score=0.8

Same arguments as `affectray ingest`: --config YAML, --set key=value, and flags as shorthand
for single keys; run with --help for them all.
"""

import argparse
import sys
from pathlib import Path

# `ray job submit --working-dir .` ships the repo; the package lives under platform/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from affectray.ingest import job as ingest  # noqa: E402
from affectray.runtime import run_job  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=ingest.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ingest.add_arguments(parser)
    sys.exit(run_job(ingest.main, parser.parse_args()))
