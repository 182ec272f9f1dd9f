"""ECA-ResNet as an FPN backbone for torchvision's detectors."""
import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import models
from models import eca_resnet_fpn_backbone


def _random_batch_norm_statistics(model: nn.Module) -> None:
    # Non-default statistics, so that a BatchNorm buffer that failed to load would show in the outputs.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)


def _images_and_targets():
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 160)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[20.0, 30.0, 100.0, 90.0], [5.0, 5.0, 40.0, 44.0]]), "labels": torch.tensor([2, 1])},
    ]
    return images, targets


def test_exported_but_not_an_architecture():
    assert models.eca_resnet_fpn_backbone is eca_resnet_fpn_backbone
    assert "eca_resnet_fpn_backbone" not in models.ARCHITECTURES


def test_faster_rcnn_trains_and_detects_with_eca_resnet50_fpn():
    torch.manual_seed(0)
    backbone = eca_resnet_fpn_backbone("eca_resnet50")
    assert backbone.out_channels == 256
    # Fewer proposals than torchvision's defaults (2000 / 1000 a picture): the box head's cost is per proposal.
    detector = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=160, rpn_pre_nms_top_n_train=200,
                          rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                          box_batch_size_per_image=64)
    images, targets = _images_and_targets()

    detector.train()
    losses = detector(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trainable = [p for p in backbone.body.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)

    detector.eval()
    with torch.no_grad():
        detections = detector(images)
    assert len(detections) == 2
    for found in detections:
        assert set(found) == {"boxes", "labels", "scores"}
        assert found["boxes"].shape[1:] == (4,)


def test_retinanet_takes_the_p6p7_variant():
    backbone = eca_resnet_fpn_backbone("eca_resnet18", returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    detector = RetinaNet(backbone, num_classes=3, min_size=128, max_size=160)
    images, targets = _images_and_targets()
    losses = detector(images, targets)
    assert all(torch.isfinite(value) for value in losses.values())


def test_feature_pyramid_levels_and_channels():
    backbone = eca_resnet_fpn_backbone("eca_resnet18").eval()
    with torch.no_grad():
        pyramid = backbone(torch.rand(1, 3, 128, 128))
    assert list(pyramid) == ["0", "1", "2", "3", "pool"]
    assert [tuple(level.shape) for level in pyramid.values()] == [
        (1, 256, 32, 32), (1, 256, 16, 16), (1, 256, 8, 8), (1, 256, 4, 4), (1, 256, 2, 2),
    ]


def test_weights_load_into_frozen_batch_norm_and_match_the_classifier_trunk():
    torch.manual_seed(0)
    classifier = models.eca_resnet50(k_size="3557", num_classes=10)
    _random_batch_norm_statistics(classifier)
    # As DataParallel saved them, classifier included: both must be handled.
    weights = {"module." + key: value for key, value in classifier.state_dict().items()}

    backbone = eca_resnet_fpn_backbone("eca_resnet50", weights=weights, k_size=None).eval()
    norms = [m for m in backbone.body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert backbone.body.layer4[0].eca.conv.weight.shape[-1] == 7

    classifier.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = classifier.forward_features(x)
        actual = backbone.body(x)["3"]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "trainable_layers, trainable_stages",
    [(0, set()), (3, {"layer2", "layer3", "layer4"}), (5, {"conv1", "layer1", "layer2", "layer3", "layer4"})],
)
def test_trainable_layers_freeze_like_torchvision(trainable_layers, trainable_stages):
    backbone = eca_resnet_fpn_backbone("eca_resnet18", trainable_layers=trainable_layers)
    stages = {name.split(".")[0] for name, p in backbone.body.named_parameters() if p.requires_grad}
    assert stages == trainable_stages
    assert all(p.requires_grad for p in backbone.fpn.parameters())


def test_plain_batch_norm_on_request():
    backbone = eca_resnet_fpn_backbone("eca_resnet18", norm_layer=nn.BatchNorm2d)
    assert isinstance(backbone.body.bn1, nn.BatchNorm2d)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"arch": "eca_mobilenet_v2"}, "no FPN backbone"),
        ({"arch": "eca_resnet18", "trainable_layers": 6}, "trainable_layers"),
        ({"arch": "eca_resnet18", "returned_layers": [0, 1]}, "returned_layers"),
        ({"arch": "eca_resnet18", "weights": {"conv1.weight": torch.zeros(1)}}, "not an ECA-ResNet"),
    ],
)
def test_bad_arguments_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        eca_resnet_fpn_backbone(**kwargs)


def test_weights_of_another_depth_are_refused():
    weights = models.eca_resnet18().state_dict()
    with pytest.raises(ValueError, match="do not fit eca_resnet34"):
        eca_resnet_fpn_backbone("eca_resnet34", weights=weights)


def test_weights_saved_through_nested_wrappers_load():
    """torch.compile over DDP saves '_orig_mod.module.<name>': every leading wrapper goes, in any order."""
    classifier = models.eca_resnet18(num_classes=10)
    weights = {"_orig_mod.module." + key: value for key, value in classifier.state_dict().items()}
    backbone = eca_resnet_fpn_backbone("eca_resnet18", weights=weights)
    assert torch.equal(backbone.body.layer1[0].eca.conv.weight, classifier.layer1[0].eca.conv.weight)
