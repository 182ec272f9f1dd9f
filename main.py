"""Train or evaluate ECA-ResNets on ImageNet (the ResNet recipe).

    python main.py -a eca_resnet50 --ksize 3557 /data/imagenet
    python main.py -a eca_resnet50 -e --resume eca_resnet50_k3557.pth.tar /data/imagenet
"""
from engine.errors import run_cli
from engine.runner import main

if __name__ == "__main__":
    run_cli(lambda argv: main("resnet", argv))
