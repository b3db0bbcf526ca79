"""`python -m fp8exp.infer_bench`: inference latency and post-training quantization of saved models. The command keeps this name; the code
lives in fp8exp/serve/bench.py."""

import sys

from fp8exp.serve.bench import main

if __name__ == "__main__":
    sys.exit(main())
