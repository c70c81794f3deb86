"""Label a video corpus with a classifier checkpoint (a Ray job): one Parquet per video, resumable.

    ray job submit --working-dir . -- python jobs/label_videos.py VIDEOS OUT --checkpoint URI
    python jobs/label_videos.py --config jobs/configs/label-smoke.yaml --set min_face_size=40

Same arguments as `affectray label`: --config YAML, --set key=value, and flags as shorthand
for single keys; run with --help for them all.
"""

import argparse
import sys
from pathlib import Path

# `ray job submit --working-dir .` ships the repo; the package lives under platform/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from affectray.label import job  # noqa: E402
from affectray.runtime import configure_logging, run_job  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=job.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    job.add_arguments(parser)
    configure_logging()
    sys.exit(run_job(job.main, parser.parse_args()))
