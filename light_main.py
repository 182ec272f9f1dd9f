"""Train or evaluate ECA-MobileNetV2 on ImageNet (the MobileNetV2 recipe).

    python light_main.py -a eca_mobilenet_v2 /data/imagenet
    python light_main.py -e --resume eca_mobilenetv2_k13.pth.tar /data/imagenet
"""
from engine.errors import run_cli
from engine.runner import main

if __name__ == "__main__":
    run_cli(lambda argv: main("mobilenet", argv))
