"""Pretrain a video masked autoencoder (VideoMAE or MAE-DFER) on Ray Train (a Ray job).

    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain-smoke.yaml

Same arguments as `affectray pretrain`: --config YAML and any number of --set key=value.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from affectray.runtime import run_job  # noqa: E402
from affectray.train import pretrain  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=pretrain.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pretrain.add_arguments(parser)
    sys.exit(run_job(pretrain.main, parser.parse_args()))
