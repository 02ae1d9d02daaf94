"""The study's results table and plots from MLflow (the same as `itl-ray report`).

    python analysis/report.py [--experiment NAME] [--out DIR]
"""

import sys

from itl_ray.report import main

if __name__ == "__main__":
    sys.exit(main())
