"""Configs shipped inside the package (so a wheel install has them too): DeepSpeed JSON files and accelerate
launch configs. In a clone, ds_configs/ and accelerate_configs/ link here.

    python -m greentext_dist.configs        # print where they are, e.g. for accelerate launch --config_file
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
DEEPSPEED = HERE / "deepspeed"
ACCELERATE = HERE / "accelerate"
