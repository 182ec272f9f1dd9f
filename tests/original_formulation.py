"""The original release's forward pass, written as functional operations over a model's parameters.

Independent of the model classes: it reads only parameters and buffers by
their release names and applies the operations the original code applies, in
its order. In float64 the project's plain models must give the same bits.
"""
import torch
import torch.nn.functional as F


def batch_norm(x, params, prefix, training):
    return F.batch_norm(x, params[f"{prefix}.running_mean"], params[f"{prefix}.running_var"],
                        params[f"{prefix}.weight"], params[f"{prefix}.bias"], training, 0.1, 1e-5)


def eca(x, weight):
    y = F.adaptive_avg_pool2d(x, 1)
    y = F.conv1d(y.squeeze(-1).transpose(-1, -2), weight, padding=(weight.shape[-1] - 1) // 2)
    y = torch.sigmoid(y.transpose(-1, -2).unsqueeze(-1))
    return x * y.expand_as(x)


def resnet_block(x, params, prefix, stride, bottleneck, training):
    residual = x
    convs = ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2")
    out = x
    for index, conv in enumerate(convs):
        weight = params[f"{prefix}.{conv}.weight"]
        conv_stride = stride if (index == 1 if bottleneck else index == 0) else 1
        out = F.conv2d(out, weight, stride=conv_stride, padding=(weight.shape[-1] - 1) // 2)
        out = batch_norm(out, params, f"{prefix}.bn{index + 1}", training)
        if index < len(convs) - 1:
            out = F.relu(out)
    out = eca(out, params[f"{prefix}.eca.conv.weight"])
    if f"{prefix}.downsample.0.weight" in params:
        residual = F.conv2d(x, params[f"{prefix}.downsample.0.weight"], stride=stride)
        residual = batch_norm(residual, params, f"{prefix}.downsample.1", training)
    out += residual
    return F.relu(out)


def original_resnet(model, x, training=False):
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    bottleneck = "layer1.0.conv3.weight" in params
    out = F.conv2d(x, params["conv1.weight"], stride=2, padding=3)
    out = F.max_pool2d(F.relu(batch_norm(out, params, "bn1", training)), 3, 2, 1)
    for stage in range(1, 5):
        block = 0
        while f"layer{stage}.{block}.conv1.weight" in params:
            stride = 2 if stage > 1 and block == 0 else 1
            out = resnet_block(out, params, f"layer{stage}.{block}", stride, bottleneck, training)
            block += 1
    out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
    return F.linear(out, params["fc.weight"], params["fc.bias"])


def conv_bn_relu6(x, params, prefix, stride, groups, training):
    weight = params[f"{prefix}.0.weight"]
    out = F.conv2d(x, weight, stride=stride, padding=(weight.shape[-1] - 1) // 2, groups=groups)
    return F.relu6(batch_norm(out, params, f"{prefix}.1", training))


def original_mobilenet_v2(model, x, training=False):
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    out = conv_bn_relu6(x, params, "features.0", 2, 1, training)
    index = 1
    while f"features.{index}.conv.0.0.weight" in params:
        prefix = f"features.{index}.conv"
        expands = f"{prefix}.1.0.weight" in params
        block_in = hidden = out
        if expands:
            hidden = conv_bn_relu6(hidden, params, f"{prefix}.0", 1, 1, training)
        depthwise = f"{prefix}.{1 if expands else 0}"
        stride = model.features[index].stride
        hidden = conv_bn_relu6(hidden, params, depthwise, stride, hidden.shape[1], training)
        project = 2 if expands else 1
        hidden = F.conv2d(hidden, params[f"{prefix}.{project}.weight"])
        hidden = batch_norm(hidden, params, f"{prefix}.{project + 1}", training)
        hidden = eca(hidden, params[f"{prefix}.{project + 2}.conv.weight"])
        residual = stride == 1 and block_in.shape[1] == hidden.shape[1]
        out = block_in + hidden if residual else hidden
        index += 1
    out = conv_bn_relu6(out, params, f"features.{index}", 1, 1, training)
    out = out.mean(-1).mean(-1)
    return F.linear(out, params["classifier.1.weight"], params["classifier.1.bias"])


def original_forward(model, x, training=False):
    """Logits of the original release's formulation, with ``model``'s parameters and buffers."""
    if hasattr(model, "features"):
        return original_mobilenet_v2(model, x, training)
    return original_resnet(model, x, training)
