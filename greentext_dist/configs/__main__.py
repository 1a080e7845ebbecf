from greentext_dist.configs import ACCELERATE, DEEPSPEED

for folder in (DEEPSPEED, ACCELERATE):
    for path in sorted(folder.iterdir()):
        print(path)
