"""A stand-in for GPU work, run by the process runner: ``[handlers.gpu_probe]``.

It "works" for the number of seconds in its payload, then prints, as its
result (the last line of stdout), the devices CUDA would see in this
process: the ones its task leased, in ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import json
import os
import sys
import time

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        time.sleep(json.load(f))
    print(json.dumps(os.environ.get("CUDA_VISIBLE_DEVICES")))
