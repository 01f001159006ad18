"""BiSeNetV1 for real-time semantic segmentation (Yu et al., ECCV 2018, arXiv:1808.00897),
exactly as mmsegmentation builds it (`bisenetv1_r18-d32`): the same layers in the same order,
the same resize modes, initialisation and parameter names, so that mmsegmentation's
checkpoints load without a key map. The model alone: this file imports torch and nothing else
of the project, and can be copied into other code.

    import torch, bisenet
    model = bisenet.BiSeNetV1(num_classes=19, backbone='resnet18').eval()
    bisenet.load_checkpoint(model, 'bisenetv1_r18-d32_4x4_1024x1024_160k_cityscapes.pth')
    logits = model(images)                  # eval: (N, 19, H, W), the input's size
    model.train()
    decode, aux8, aux16 = model(images)     # train: the three heads at strides 8, 8, 16

    python bisenet.py                       # self-check: parameter counts and output shapes
"""
import sys
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- The model, in the paper's order: ResNet, Spatial Path, ARM, Context Path, FFM, heads ----
class ConvBNReLU(nn.Module):
    """Conv2d (no bias) -> BatchNorm -> optional ReLU: mmcv's ConvModule, with its names."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, relu=True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                              padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet-18 residual block: two 3x3 convs."""
    expansion = 1

    def __init__(self, in_channels, channels, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity             # in place, as the reference: one full-size tensor fewer
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet-50 residual block: 1x1, 3x3 (strided, 'pytorch' style), 1x1."""
    expansion = 4

    def __init__(self, in_channels, channels, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


RESNETS = {'resnet18': (BasicBlock, (2, 2, 2, 2)), 'resnet50': (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
    """The Context Path's backbone: 7x7 stem, four stages; features at strides 4, 8, 16, 32."""

    def __init__(self, depth='resnet18'):
        super().__init__()
        block, blocks = RESNETS[depth]
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = 64
        for i, (n, stride) in enumerate(zip(blocks, (1, 2, 2, 2))):
            channels = 64 * 2 ** i
            downsample = None
            if stride != 1 or in_channels != channels * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(in_channels, channels * block.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(channels * block.expansion))
            layer = [block(in_channels, channels, stride, downsample)]
            in_channels = channels * block.expansion
            layer += [block(in_channels, channels) for _ in range(n - 1)]
            self.add_module(f'layer{i + 1}', nn.Sequential(*layer))
        self.out_channels = tuple(64 * 2 ** i * block.expansion for i in range(4))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x4 = self.layer1(x)
        x8 = self.layer2(x4)
        x16 = self.layer3(x8)
        x32 = self.layer4(x16)
        return x4, x8, x16, x32


class SpatialPath(nn.Module):
    """Spatial Path: three strided convs keep rich detail at 1/8 of the input size."""

    def __init__(self, channels=(64, 64, 64, 128)):
        super().__init__()
        self.layer1 = ConvBNReLU(3, channels[0], 7, stride=2)
        self.layer2 = ConvBNReLU(channels[0], channels[1], 3, stride=2)
        self.layer3 = ConvBNReLU(channels[1], channels[2], 3, stride=2)
        self.layer4 = ConvBNReLU(channels[2], channels[3], 1)

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class AttentionRefinementModule(nn.Module):
    """ARM: a 3x3 conv, then channel attention from global pooling re-weights it."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv_layer = ConvBNReLU(in_channels, out_channels, 3)
        self.atten_conv_layer = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), ConvBNReLU(out_channels, out_channels, 1, relu=False),
            nn.Sigmoid())

    def forward(self, x):
        x = self.conv_layer(x)
        return x * self.atten_conv_layer(x)


class ContextPath(nn.Module):
    """Context Path: ResNet, global context, two ARMs, upsampled to 1/16 and 1/8."""

    def __init__(self, depth='resnet18', context_channels=(128, 256, 512)):
        super().__init__()
        c8, c16, c32 = context_channels
        self.backbone = ResNet(depth)
        self.arm16 = AttentionRefinementModule(c16, c8)
        self.arm32 = AttentionRefinementModule(c32, c8)
        self.conv_head32 = ConvBNReLU(c8, c8, 3)
        self.conv_head16 = ConvBNReLU(c8, c8, 3)
        self.gap_conv = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(c32, c8, 1))

    def forward(self, x):
        _, x8, x16, x32 = self.backbone(x)
        global_context = self.gap_conv(x32)
        # Nearest, to the target's size (never a scale factor), as the reference: odd sizes work.
        context32 = F.interpolate(self.arm32(x32) + global_context, size=x16.shape[2:],
                                  mode='nearest')
        context16 = self.conv_head32(context32)
        context8 = F.interpolate(self.arm16(x16) + context16, size=x8.shape[2:], mode='nearest')
        context8 = self.conv_head16(context8)
        return context8, context16


class FeatureFusionModule(nn.Module):
    """FFM: concatenate both paths, 1x1 conv, then add a channel-attention-weighted copy."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels, out_channels, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        # The paper has no BN here; the reference has conv-BN-ReLU, so we do too.
        self.conv_atten = nn.Sequential(ConvBNReLU(out_channels, out_channels, 1), nn.Sigmoid())

    def forward(self, spatial, context):
        fuse = self.conv1(torch.cat([spatial, context], dim=1))
        return fuse * self.conv_atten(self.gap(fuse)) + fuse


class BilateralNetwork(nn.Module):
    """The two paths and their fusion (mmsegmentation's 'backbone' of BiSeNetV1)."""

    def __init__(self, depth='resnet18'):
        super().__init__()
        wide = 1 if depth == 'resnet18' else 4          # R-50 has four times the channels
        context_channels = (128 * wide, 256 * wide, 512 * wide)
        self.context_path = ContextPath(depth, context_channels)
        self.spatial_path = SpatialPath(tuple(c * wide for c in (64, 64, 64, 128)))
        self.ffm = FeatureFusionModule(context_channels[1], 256 * wide)

    def forward(self, x):
        context8, context16 = self.context_path(x)
        fused = self.ffm(self.spatial_path(x), context8)
        return fused, context8, context16


class FCNHead(nn.Module):
    """Segmentation head: 3x3 conv-BN-ReLU, Dropout2d(0.1), 1x1 classifier."""

    def __init__(self, in_channels, channels, num_classes):
        super().__init__()
        self.convs = nn.Sequential(ConvBNReLU(in_channels, channels, 3))
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.convs(x)))


class BiSeNetV1(nn.Module):
    """BiSeNetV1: Spatial Path + Context Path -> FFM -> decode head; two auxiliary heads.

    `classes` and `palette` (names and RGB colours, plain attributes, not weights) say what
    the outputs mean; by default Cityscapes' for 19 classes (class_meta).
    """

    def __init__(self, num_classes=19, backbone='resnet18', classes=None, palette=None):
        super().__init__()
        if backbone not in RESNETS:
            raise ValueError(f'backbone must be one of {sorted(RESNETS)}, not {backbone!r}')
        wide = 1 if backbone == 'resnet18' else 4
        self.num_classes, self.backbone_name = num_classes, backbone
        self.classes, self.palette = class_meta(num_classes, classes, palette)
        self.backbone = BilateralNetwork(backbone)
        self.decode_head = FCNHead(256 * wide, 256 * wide, num_classes)
        self.auxiliary_head = nn.ModuleList(
            [FCNHead(128 * wide, 64 * wide, num_classes) for _ in range(2)])
        self.init_weights()

    def init_weights(self):
        """The reference's initialisation (mmcv ConvModule + mmseg ResNet + decode heads)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):     # zero_init_residual
                nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)
        nn.init.normal_(self.decode_head.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.decode_head.conv_seg.bias)
        # The reference never calls init_weights on its ModuleList of auxiliary heads, so their
        # classifiers keep PyTorch's default Conv2d init (measured: std 0.073, not 0.01).
        for head in self.auxiliary_head:
            head.conv_seg.reset_parameters()

    def forward(self, x):
        fused, context8, context16 = self.backbone(x)
        logits = self.decode_head(fused)
        if self.training:
            return logits, self.auxiliary_head[0](context8), self.auxiliary_head[1](context16)
        return F.interpolate(logits, size=x.shape[2:], mode='bilinear', align_corners=False)


def fold_batchnorm(model):
    """Inference fast path: fold every BatchNorm into the conv before it (eval mode only).

    The outputs equal the plain model's up to float rounding; the BNs become Identity.
    """
    assert not model.training, 'folding BatchNorm is only valid in eval mode'
    pairs = [('conv', 'bn'), ('conv1', 'bn1'), ('conv2', 'bn2'), ('conv3', 'bn3'), ('0', '1')]
    for module in model.modules():
        for conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    return model


# ---- What the outputs mean: class names and colours ------------------------------------------
CLASSES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
           'traffic sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck',
           'bus', 'train', 'motorcycle', 'bicycle')
PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
           (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
           (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
           (0, 80, 100), (0, 0, 230), (119, 11, 32))


def default_palette(count, taken=()):
    """`count` fixed, distinct colours for classes that classes.txt gives none: PASCAL VOC's
    colour map (the index's bits spread over R, G and B), skipping black (ignored pixels in
    pictures) and the colours in `taken`."""
    colours, index = [], 1
    while len(colours) < count:
        rgb, bits = [0, 0, 0], index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= (bits >> channel & 1) << shift
            bits >>= 3
        if tuple(rgb) not in taken:
            colours.append(tuple(rgb))
        index += 1
    return tuple(colours)


def class_meta(num_classes, classes=None, palette=None):
    """(names, colours) of `num_classes` classes: those given (a data set's, a checkpoint's)
    where they fit, else Cityscapes' for 19 classes, else '0', '1', ... in default colours."""
    if classes is None or len(classes) != num_classes:
        classes = CLASSES if num_classes == len(CLASSES) else [str(i) for i in range(num_classes)]
    classes = tuple(str(name) for name in classes)
    if palette is None or len(palette) != num_classes:
        palette = PALETTE if classes == CLASSES else default_palette(num_classes)
    return classes, tuple(tuple(int(v) for v in colour) for colour in palette)


# ---- Checkpoints: this project's and mmsegmentation's ----------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def state_dict_of(ckpt, path):
    """The model weights of a loaded checkpoint (read_state_dict); of a whole pickled model
    (--trust-pickle), its state dict."""
    if isinstance(ckpt, dict):
        for key in ('model', 'state_dict'):
            if isinstance(ckpt.get(key), (dict, nn.Module)):
                ckpt = ckpt[key]
                break
    if isinstance(ckpt, nn.Module):
        ckpt = ckpt.state_dict()
    if not isinstance(ckpt, dict) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise CheckpointError(f'{path} holds no model state dict')
    # Weights saved from a DistributedDataParallel wrapper carry a 'module.' prefix.
    return {k[7:] if k.startswith('module.') else k: v for k, v in ckpt.items()}


def load_file(path, trust_pickle=False):
    """torch.load on CPU with weights_only=True (unless trusted), failing with one clear line."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f'checkpoint {path} is a folder: give the checkpoint file in it')
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} does not exist')
    try:
        with warnings.catch_warnings():     # torch 2.1 warns about its own storage internals
            warnings.filterwarnings('ignore', message='TypedStorage is deprecated')
            return torch.load(path, map_location='cpu', weights_only=not trust_pickle)
    except Exception as e:  # torch raises many types here: zip errors, unpickling, EOF
        if not zipfile.is_zipfile(path):
            reason = 'not a PyTorch checkpoint (or a truncated one)'
        elif not trust_pickle and 'weights_only' in str(e):
            reason = ('it holds pickled objects that weights_only loading refuses; if you trust '
                      'its source, pass --trust-pickle')
        else:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f'cannot read checkpoint {path}: {reason}') from None


def read_state_dict(path, trust_pickle=False):
    """The model weights of a checkpoint file: ours ({'model': ...}), mmsegmentation's
    ({'state_dict': ...}), or a bare state dict. Loads with weights_only=True unless the user
    trusts the file's source (trust_pickle), since unpickling can run arbitrary code."""
    return state_dict_of(load_file(path, trust_pickle), path)


def read_resumable(path):
    """A checkpoint train.py can continue (model, optimizer, iteration), or CheckpointError."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or 'optimizer' not in ckpt or 'iteration' not in ckpt:
        raise CheckpointError(f'{path} is not a train.py checkpoint to resume (use --load-from '
                              f'for weights only)')
    return ckpt


def classes_of(ckpt):
    """(class names, palette) a loaded checkpoint records, each None where it records none:
    meta.dataset_meta.classes / .palette, as ours and mmsegmentation 1.x write them, or
    meta.CLASSES / .PALETTE (mmsegmentation 0.x)."""
    meta = ckpt.get('meta') if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict):
        return None, None
    dataset_meta = meta.get('dataset_meta') if isinstance(meta.get('dataset_meta'), dict) else {}
    classes = dataset_meta.get('classes', meta.get('CLASSES'))
    palette = dataset_meta.get('palette', meta.get('PALETTE'))
    if not (isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)):
        classes = None
    if not (isinstance(palette, (list, tuple)) and all(
            isinstance(c, (list, tuple)) and len(c) == 3 for c in palette)):
        palette = None
    return classes, palette


def imagenet_resnet(state_dict):
    """Whether a state dict holds ImageNet ResNet weights in torchvision's layout (what
    --pretrained takes), rather than a BiSeNetV1."""
    return 'layer1.0.conv1.weight' in state_dict \
        and 'decode_head.conv_seg.weight' not in state_dict


def config_from_state_dict(state_dict, path='it'):
    """(backbone, num_classes) of a BiSeNetV1 state dict, so a checkpoint builds its own model."""
    head = state_dict.get('decode_head.conv_seg.weight')
    if head is None and imagenet_resnet(state_dict):
        raise CheckpointError(f'{path} holds ImageNet ResNet weights, not a trained BiSeNetV1: '
                              f'train one from them with train.py --pretrained {path}')
    if head is None:
        raise CheckpointError(f'{path} is not a BiSeNetV1 checkpoint: no '
                              f'decode_head.conv_seg.weight')
    deep = 'backbone.context_path.backbone.layer1.0.conv3.weight' in state_dict
    return ('resnet50' if deep else 'resnet18'), head.shape[0]


CLASSIFIERS = ('decode_head.conv_seg.', 'auxiliary_head.0.conv_seg.', 'auxiliary_head.1.conv_seg.')


def load_state_dict(model, state_dict, source='checkpoint', target=None, new_classes=False):
    """Strict load that names every missing key, unexpected key and shape mismatch. With
    new_classes, a checkpoint of another class count fits too: the three classifiers (the 1x1
    conv_seg of the decode and auxiliary heads) keep the model's own initial weights."""
    own = model.state_dict()
    if new_classes and 'decode_head.conv_seg.weight' in state_dict \
            and state_dict['decode_head.conv_seg.weight'].shape[0] != model.num_classes:
        state_dict = {k: own[k] if k.startswith(CLASSIFIERS) and k in own else v
                      for k, v in state_dict.items()}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f'{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
                  for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    backbone = getattr(model, 'backbone_name', None)
    if backbone and (missing or unexpected) and 'decode_head.conv_seg.weight' in state_dict:
        theirs = config_from_state_dict(state_dict)[0]
        if theirs != backbone:
            raise CheckpointError(f'{source} is a {theirs} BiSeNetV1 but the model is {backbone}: '
                                  f'run with --backbone {theirs}')
    problems = []
    for name, keys in (('missing', missing), ('unexpected', unexpected),
                       ('shape mismatch', mismatched)):
        if keys:
            problems.append(f'{len(keys)} {name}: ' + ', '.join(keys[:4])
                            + (', ...' if len(keys) > 4 else ''))
    if problems:
        target = target or f'BiSeNetV1({model.num_classes} classes, {model.backbone_name})'
        raise CheckpointError(f'{source} does not fit {target}: ' + '; '.join(problems))
    model.load_state_dict(state_dict)
    return model


def load_checkpoint(model, path, trust_pickle=False, new_classes=False, log=None):
    """Load this project's or mmsegmentation's BiSeNetV1 checkpoint into `model`, strictly;
    with new_classes, one of another class count but for its classifiers (load_state_dict),
    which `log`, if given, is told in one line."""
    state_dict = read_state_dict(path, trust_pickle)
    if imagenet_resnet(state_dict):
        raise CheckpointError(f'{path} holds ImageNet ResNet weights (torchvision\'s layout), not '
                              f'a BiSeNetV1: give it with --pretrained')
    load_state_dict(model, state_dict, source=str(path), new_classes=new_classes)
    theirs = state_dict['decode_head.conv_seg.weight'].shape[0]
    if log is not None and theirs != model.num_classes:
        log(f'{path}: loaded every weight but the three classifiers (conv_seg of the decode and '
            f'both auxiliary heads: {theirs} classes there, {model.num_classes} here), which '
            f'start as a new model\'s')
    return model


def model_from_checkpoint(path, trust_pickle=False):
    """A BiSeNetV1 built with the backbone, class count, class names and colours that the
    checkpoint itself holds (Cityscapes' where a 19-class checkpoint names none)."""
    ckpt = load_file(path, trust_pickle)
    state_dict = state_dict_of(ckpt, path)
    backbone, num_classes = config_from_state_dict(state_dict, path)
    model = BiSeNetV1(num_classes, backbone, *classes_of(ckpt))
    return load_state_dict(model, state_dict, source=str(path))


def load_imagenet_backbone(model, path):
    """Load torchvision-format ImageNet ResNet weights (resnet18 / resnet50) into the Context
    Path's backbone; `fc.*` is dropped, anything else missing or extra is an error."""
    state_dict = {k: v for k, v in read_state_dict(path).items() if not k.startswith('fc.')}
    if 'decode_head.conv_seg.weight' in state_dict:
        raise CheckpointError(f'{path} is a BiSeNetV1 checkpoint, not ImageNet ResNet weights: '
                              f'give it with --load-from (weights to start from) or '
                              f'--resume-from (a run to continue)')
    depth = 'resnet50' if 'layer1.0.conv3.weight' in state_dict else 'resnet18'
    if 'layer1.0.conv1.weight' in state_dict and depth != model.backbone_name:
        raise CheckpointError(f'ImageNet weights {path} are a {depth}, the model is '
                              f'{model.backbone_name}: run with --backbone {depth}')
    load_state_dict(model.backbone.context_path.backbone, state_dict, f'ImageNet weights {path}',
                    target=f'a torchvision {model.backbone_name}')
    return model


def self_check():
    """Parameter counts and output shapes of both backbones, on an input of odd size."""
    x = torch.randn(2, 3, 97, 131)
    for backbone in RESNETS:
        model = BiSeNetV1(19, backbone)
        total = sum(p.numel() for p in model.parameters())
        heads = sum(p.numel() for p in model.auxiliary_head.parameters())
        with torch.no_grad():
            train_shapes = [tuple(o.shape) for o in model.train()(x)]
            eval_shape = tuple(model.eval()(x).shape)
        print(f'BiSeNetV1 {backbone}: {total:,} parameters ({total - heads:,} without the '
              f'auxiliary heads); input {tuple(x.shape)} -> train {train_shapes}, eval '
              f'{eval_shape}')


if __name__ == '__main__':
    if len(sys.argv) > 1:                   # the data check and benchmark are a tool now
        sys.exit('error: bisenet.py takes no flags: the data check and its benchmark are '
                 'python tools/check_data.py ROOT [--bench]')
    self_check()
