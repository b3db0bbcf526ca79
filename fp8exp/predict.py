"""`python -m fp8exp.predict`: classify texts with a run's saved model. The command keeps this name; the code
lives in fp8exp/serve/predict.py."""

import sys

from fp8exp.serve.predict import main

if __name__ == "__main__":
    sys.exit(main())
