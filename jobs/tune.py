"""Sweep fine-tuning hyperparameters with Ray Tune, Optuna and ASHA (a Ray job).

    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune-smoke.yaml

Same arguments as `affectray tune`: --config YAML, --set key=value, --resume.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from affectray import tune  # noqa: E402
from affectray.runtime import run_job  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=tune.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tune.add_arguments(parser)
    sys.exit(run_job(tune.main, parser.parse_args()))
