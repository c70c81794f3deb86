"""Fine-tune an expression classifier on Ray Train (a Ray job).

    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/finetune-smoke.yaml

Same arguments as `affectray finetune`: --config YAML and any number of --set key=value.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from affectray.runtime import run_job  # noqa: E402
from affectray.train import finetune  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=finetune.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    finetune.add_arguments(parser)
    sys.exit(run_job(finetune.main, parser.parse_args()))
