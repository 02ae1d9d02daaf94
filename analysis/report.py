"""The study's report from MLflow: tables, plots, confidence intervals, one HTML page (the same as
`itl-ray report`; see docs/report.md).

    python analysis/report.py [--experiment NAME] [--out DIR] [--resamples N] [--no-log]
"""

import sys

from itl_ray.report import main

if __name__ == "__main__":
    sys.exit(main())
