"""Test-only start-up hook (see tests/faults.py): installs the faults named in $GREENTEXT_FAULTS before the
training script imports anything, so `python greentext_dist/train.py` and torchrun workers get them too."""

import os

if os.environ.get("GREENTEXT_FAULTS"):
    import importlib.util
    import json
    import sys

    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.dirname(tests) not in sys.path:
        sys.path.append(os.path.dirname(tests))  # the repo, for greentext_dist without an install
    spec = importlib.util.spec_from_file_location("greentext_test_faults", os.path.join(tests, "faults.py"))
    faults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(faults)
    for module, name, fn in faults.patches(**json.loads(os.environ["GREENTEXT_FAULTS"])):
        setattr(module, name, fn)
