"""BiSeNetV1 for real-time semantic segmentation, and the data it trains on.

The model is BiSeNet (Yu et al., ECCV 2018, arXiv:1808.00897) exactly as mmsegmentation builds
it (`bisenetv1_r18-d32`): the same layers in the same order, the same resize modes, the same
initialisation and the same parameter names, so mmsegmentation's checkpoints load without a key map.

    import torch, bisenet
    model = bisenet.BiSeNetV1(num_classes=19, backbone='resnet18').eval()
    bisenet.load_checkpoint(model, 'bisenetv1_r18-d32_4x4_1024x1024_160k_cityscapes.pth')
    logits = model(images)          # eval: (N, 19, H, W), the input's size
    model.train()
    decode, aux8, aux16 = model(images)   # train: the three heads at strides 8, 8, 16

The second half of the file is the data both train.py and eval.py read: Cityscapes (raw
labelIds mapped to train ids on the fly) or a data set of your own (classes.txt, images/,
labels/: see cityscapes_files and own_files), every label checked as it loads, the
reference's training augmentation and a synthetic Cityscapes-layout set for demos and tests;
then the Runtime, the one place that decides device, backend and precision. One file, so the
two scripts share one copy.

    python bisenet.py                     # self-check: parameter counts and output shapes
    python bisenet.py --check-data ROOT   # every label looked at, on all cores: class shares,
                                          # sizes and every problem, with the file
    python bisenet.py --bench-data ROOT   # data-loading cost per image against a bare decode
    python bisenet.py --bench-data ROOT --cache-dir DIR   # ... and with a warm decoded cache
"""
import argparse
import collections
import concurrent.futures
import contextlib
import errno
import functools
import inspect
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np

try:
    import resource                      # peak memory on CPU; POSIX only
except ImportError:
    resource = None


def numpy_problem(torch_version, numpy_version):
    """Why this torch cannot run next to this NumPy, or None. torch wheels before 2.3 are built
    against NumPy 1 and do not pin it: next to NumPy 2 their import prints pages of warnings and
    torch.from_numpy fails at the first sample (pytorch/pytorch#107302)."""
    def major_minor(version):
        match = re.match(r'(\d+)\.(\d+)', version)
        return tuple(int(n) for n in match.groups()) if match else None
    torch_mm, numpy_mm = major_minor(torch_version), major_minor(numpy_version)
    if torch_mm and numpy_mm and torch_mm < (2, 3) and numpy_mm >= (2, 0):
        return (f'torch {torch_version} needs NumPy 1, but NumPy {numpy_version} is installed: '
                f'pip install "numpy<2"')
    return None


# Checked before torch loads (the scripts import this file first), so that a bad pair gets one
# line instead of torch's pages of warnings.
try:
    _problem = numpy_problem(metadata.version('torch'), np.__version__)
except metadata.PackageNotFoundError:       # a torch built from source: nothing to check
    _problem = None
if _problem:
    raise SystemExit(f'error: {_problem}')

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Errors a user can cause, and the one line that reports each
# ----------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class DatasetError(ValueError):
    """A data set folder that cannot be used as it is. A label's problem also says its `kind`,
    what the check groups files by (('value', V) or ('colour', (R, G, B))), `bad`: how many of
    its pixels are, of how many, and the label's histogram of train ids (`counts`)."""

    def __init__(self, message, kind=None, bad=(0, 0), counts=None):
        super().__init__(message)
        self.kind, self.bad, self.counts = kind, bad, counts


class SetupError(RuntimeError):
    """A device, precision or launch setting that cannot work on this machine."""


class OutputError(SetupError):
    """A file that cannot be written (a full disk, a read-only folder), named with what it
    needs and what is free."""


def one_line(error):
    """The message of an error as one line, without its type's name: the message's first
    line, or for an error re-raised from a DataLoader worker, whose message carries the
    worker's traceback, the last: the original error's."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    lines = text.splitlines()
    line = lines[-1] if 'Traceback (most recent call last)' in text else lines[0]
    name = type(error).__name__
    for prefix in (f'{__name__}.{name}: ', f'{name}: '):
        line = line[len(prefix):] if line.startswith(prefix) else line
    return line


def fail(line, status=1):
    """End the process with `line` on stderr, written now: a torchrun peer's SIGTERM during the
    teardown that follows must not swallow it, as it would a message sys.exit prints last."""
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(status)


def make_dir(path, flag):
    """Create the output folder `path` (given by `flag`) up front and check that files can be
    written there: a path that cannot be a writable folder fails in one line before any work,
    not at the end of it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SetupError(f'{flag} {path} is a file, not a folder: give a folder')
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise SetupError(f'{flag} {path}: cannot write in this folder ({e.strerror}); give a '
                         f'writable folder') from None
    return path


def output_file(path, flag):
    """Check, before any work, that the file `path` (given by `flag`) can be written: not a
    folder, in a writable folder (made if missing)."""
    path = Path(path)
    if path.is_dir():
        raise SetupError(f'{flag} {path} is a folder: give a file name')
    make_dir(path.parent, flag)
    return path


@contextlib.contextmanager
def written(path, needed=0):
    """A temporary path beside `path` to write the file to, renamed into place on leaving:
    an interruption or a full disk leaves the earlier file intact and no temporary file behind.
    A write that fails raises OutputError naming the file, `needed` (its bytes, where known)
    and the space free there."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if needed > shutil.disk_usage(path.parent).free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise OutputError(write_failure(path, e, needed)) from None
        raise


def write_failure(path, error, needed=0, then='run again'):
    """The line for a file that could not be written: what, why, what it needs and what is
    free, and what to do."""
    try:
        free = f'{size_text(shutil.disk_usage(Path(path).parent).free)} free there'
    except OSError:
        free = 'its folder cannot be read'
    need = f'it needs {size_text(needed)}, ' if needed else ''
    return (f'cannot write {path} ({getattr(error, "strerror", None) or error}): {need}{free}; '
            f'free some space or give a writable place, and {then}')


def save_bytes(path, data):
    """Write `data` to `path` (written): whole, or not at all."""
    with written(path, len(data)) as tmp:
        Path(tmp).write_bytes(data)


def image_bytes(image, format='PNG'):
    """A PIL image encoded in memory, to be written with save_bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def more(problems, root):
    """What follows the first of several problems in a one-line error."""
    if len(problems) == 1:
        return ''
    return (f' (and {len(problems) - 1} more problems: python bisenet.py --check-data {root} '
            f'lists them all)')


def size_text(size):
    """A size in bytes for people: GB from a gigabyte on, MB with two decimals below."""
    return f'{size / 1e9:.1f} GB' if size >= 1e9 else f'{size / 1e6:.2f} MB'


# ----------------------------------------------------------------------------------------------
# Classes: the names and colours of what the model predicts
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


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
            reason = one_line(e)[:200]
        raise CheckpointError(f'cannot read checkpoint {path}: {reason}') from None


def read_state_dict(path, trust_pickle=False):
    """The model weights of a checkpoint file: ours ({'model': ...}), mmsegmentation's
    ({'state_dict': ...}), or a bare state dict. Loads with weights_only=True unless the user
    trusts the file's source (trust_pickle), since unpickling can run arbitrary code."""
    return state_dict_of(load_file(path, trust_pickle), path)


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


# ----------------------------------------------------------------------------------------------
# Data, 1: classes, and how labels become train ids
# ----------------------------------------------------------------------------------------------


LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
IGNORE_INDEX = 255
MEAN = (123.675, 116.28, 103.53)   # ImageNet RGB statistics, as the reference normalises
STD = (58.395, 57.12, 57.375)
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
EXIF_ORIENTATION = 0x0112
# What Pillow raises for a file it cannot read: damaged, not an image, or a decompression bomb.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def train_id_table():
    """256-entry lookup from raw Cityscapes label id to train id (255 for every other id)."""
    table = np.full(256, IGNORE_INDEX, np.uint8)
    table[list(LABEL_IDS)] = np.arange(len(LABEL_IDS))
    return table


TRAIN_IDS = train_id_table()
TRAIN_IDS_LIST = TRAIN_IDS.tolist()      # the form PIL's Image.point takes


def lookup_table(values, fill=0):
    """A 256-entry uint8 table that maps i to values[i], and every i past them to `fill`:
    train ids to colours ((256, 3)) or to Cityscapes label ids, label ids to train ids."""
    values = np.asarray(values, np.uint8)
    table = np.full((256,) + values.shape[1:], fill, np.uint8)
    table[:len(values)] = values
    return table


def cityscapes_label_ids(classes):
    """Cityscapes' raw label id of each train id, for a model of Cityscapes' classes: what its
    evaluation scripts and benchmark server read in a label map; None for any other classes."""
    return LABEL_IDS if tuple(classes) == CLASSES else None


ClassList = collections.namedtuple('ClassList',
                                   'names palette ignore_colours all_coloured id_table')
ClassList.__doc__ = """What a data set's labels mean: the class names in train-id order, their
colours, the colours of ignored pixels, whether every class has a colour of its own (what
reading colour labels needs), and the id table of its index labels (None: the values are the
train ids)."""
CITYSCAPES = ClassList(CLASSES, PALETTE, (), True, None)
# Index labels that count from 1, 0 ignored (ADE20K; mmsegmentation's reduce_zero_label).
REDUCE_ZERO_LABEL = [IGNORE_INDEX] + list(range(254)) + [IGNORE_INDEX]
# ADE20K's 150 classes and colours (SceneParsing), as mmsegmentation lists them.
ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass',
    'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain',
    'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug',
    'field', 'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub',
    'railing', 'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter',
    'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs',
    'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench',
    'countertop', 'stove', 'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar',
    'arcade machine', 'hovel', 'bus', 'towel', 'light', 'truck', 'tower', 'chandelier', 'awning',
    'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track', 'apparel', 'pole',
    'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van',
    'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool',
    'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball',
    'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake',
    'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light',
    'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower',
    'radiator', 'glass', 'clock', 'flag')
ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255))
# PASCAL VOC 2012's 21 classes and colours, as mmsegmentation lists them.
VOC_CLASSES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
    'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor')
VOC_PALETTE = (
    (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
    (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128),
    (192, 0, 128), (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0),
    (128, 192, 0), (0, 64, 128))
VOC = ClassList(VOC_CLASSES, VOC_PALETTE, (), True, None)
ADE20K = ClassList(ADE20K_CLASSES, ADE20K_PALETTE, (), True, REDUCE_ZERO_LABEL)


def read_classes(path):
    """classes.txt: one class a line, in train-id order, as 'NAME' or 'NAME R G B' (names may
    hold spaces); 'ignore: [NAME] R G B' names a colour whose pixels are ignored, and
    'ignore: [NAME] VALUE' an index label value (CamVid's 11, say); a line 'reduce_zero_label'
    says that index labels count from 1 with 0 ignored (ADE20K, as mmsegmentation's option of
    that name); lines starting with '#' are comments. Returns a ClassList."""
    names, colours, ignored, ignored_values, id_table = [], [], [], [], None
    for number, line in enumerate(path.read_text(encoding='utf-8-sig').splitlines(), 1):
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        if line == 'reduce_zero_label':
            id_table = REDUCE_ZERO_LABEL
            continue
        ignore = line.lower().startswith('ignore:')
        words = (line[len('ignore:'):] if ignore else line).split()
        colour = None
        if len(words) >= 3 and all(w.isdigit() for w in words[-3:]):
            colour, words = tuple(int(w) for w in words[-3:]), words[:-3]
            if max(colour) > 255:
                raise DatasetError(f'{path} line {number}: colour {colour} has a value above 255')
        if ignore and colour is None:
            if not words or not words[-1].isdigit():
                raise DatasetError(f'{path} line {number}: "ignore:" needs a colour or a label '
                                   f'value, as in "ignore: void 0 0 0" or "ignore: void 11"')
            if int(words[-1]) > 254:
                raise DatasetError(f'{path} line {number}: label values go up to 254 (255 is '
                                   f'ignored anyway)')
            ignored_values.append((number, int(words[-1])))
            continue
        if not ignore and not words:
            raise DatasetError(f'{path} line {number}: a class needs a name before its colour')
        if ignore:
            ignored.append(colour)
        else:
            names.append(' '.join(words))
            colours.append(colour)
    if not names:
        raise DatasetError(f'{path} lists no class: write one class name per line, in train-id '
                           f'order (optionally followed by its colour R G B)')
    if len(names) >= IGNORE_INDEX:
        raise DatasetError(f'{path} lists {len(names)} classes; at most 254 fit, since label '
                           f'value 255 means "ignore"')
    for what, items in (('class name', names), ('colour', [c for c in colours + ignored if c])):
        repeated = sorted({item for item in items if items.count(item) > 1}, key=str)
        if repeated:
            raise DatasetError(f'{path} lists the {what} {repeated[0]} twice: each must be unique')
    if ignored_values:                    # the file's values, after reduce_zero_label's shift
        id_table = list(id_table or range(256))
        for number, value in ignored_values:
            if id_table[value] < len(names):
                raise DatasetError(f'{path} line {number}: label value {value} is the class '
                                   f'{names[id_table[value]]!r}; ignore a value that is no class')
            id_table[value] = IGNORE_INDEX
    defaults = iter(default_palette(colours.count(None), taken=set(colours) | set(ignored)))
    palette = tuple(colour or next(defaults) for colour in colours)
    return ClassList(tuple(names), palette, tuple(ignored), None not in colours, id_table)


def read_labelmap(path):
    """CVAT's labelmap.txt ('NAME:R,G,B:PARTS:ACTIONS' a line, '#' comments): a ClassList of
    colour labels, in the file's order."""
    names, colours = [], []
    for number, line in enumerate(path.read_text(encoding='utf-8-sig').splitlines(), 1):
        if not line.strip() or line.lstrip().startswith('#'):
            continue
        fields = line.split(':')
        try:
            colour = tuple(int(v) for v in fields[1].split(','))
            assert len(colour) == 3 and max(colour) <= 255 and fields[0].strip()
        except (IndexError, ValueError, AssertionError):
            raise DatasetError(f'{path} line {number}: expected NAME:R,G,B::, as CVAT writes '
                               f'it, not {line.strip()!r}') from None
        names.append(fields[0].strip())
        colours.append(colour)
    if not names or len(set(colours)) < len(colours):
        raise DatasetError(f'{path} lists no class, or a colour twice: export it again from '
                           f'CVAT')
    return ClassList(tuple(names), tuple(colours), (), True, None)


UNLISTED = 254      # a colour classes.txt does not list (never a class: read_classes takes 254)


@functools.lru_cache(maxsize=2)
def colour_table(palette, ignore_colours):
    """Lookup from a colour packed as R | G << 8 | B << 16 to its train id (255 for the ignore
    colours, UNLISTED for any other colour): 16 MB, made once per process."""
    table = np.full(1 << 24, UNLISTED, np.uint8)
    for train_id, (r, g, b) in enumerate(palette):
        table[r | g << 8 | b << 16] = train_id
    for r, g, b in ignore_colours:
        table[r | g << 8 | b << 16] = IGNORE_INDEX
    return table


def index_image(label, path):
    """A label of another index mode as mode L: 1-bit (0/1), 16-bit grey, grey with alpha."""
    if label.mode not in ('1', 'I', 'I;16', 'I;16B', 'I;16L', 'LA', 'PA'):
        raise DatasetError(f'{path} is a {label.mode} image: save labels as index PNGs (mode L '
                           f'or P) or as RGB PNGs in the colours of classes.txt')
    values = np.asarray(label)
    values = values[..., 0] if values.ndim == 3 else values
    if values.max(initial=0) > 255:
        raise DatasetError(f'{path} holds the value {int(values.max())}: label values are train '
                           f'ids, 0-254, or 255 for pixels to ignore')
    return Image.fromarray(values.astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# Data, 2: layouts, where a split's images and labels are
# ----------------------------------------------------------------------------------------------


Sample = collections.namedtuple('Sample', 'image label id_table')
Sample.__doc__ = """One image file and its label file; id_table (256 entries, for Image.point)
turns the label's values into train ids, or is None where they are train ids already."""


def read_names(path):
    """The names a split list holds (VOC's ImageSets/Segmentation/SPLIT.txt, splits/SPLIT.txt):
    one a line, an image's path below its folder with or without its suffix."""
    names = [line.strip() for line in path.read_text(encoding='utf-8-sig').splitlines()]
    return [name[:-len(Path(name).suffix)] if Path(name).suffix.lower() in IMAGE_SUFFIXES
            else name for name in names if name and not name.startswith('#')]


def files_below(folder, suffix=''):
    """Every file below `folder` whose name ends in `suffix`, sorted, symlinked folders
    followed (data sets are often laid out by links; Path.rglob does not follow them), each
    real folder once."""
    found, seen = [], set()
    for top, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        found += [Path(top) / name for name in names if name.endswith(suffix)]
    return sorted(found)


def cityscapes_files(layout, split):
    """Cityscapes: ROOT/leftImg8bit/SPLIT/[CITY/]NAME_leftImg8bit.png beside
    ROOT/gtFine/SPLIT/[CITY/]NAME_gtFine_labelIds.png (raw ids, mapped to train ids as they
    load) or NAME_gtFine_labelTrainIds.png. City folders are optional (the Ascend port's flat
    layout). Returns what pair_up takes."""
    image_dir = layout.root / 'leftImg8bit' / split
    label_dir = layout.root / 'gtFine' / split
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DatasetError(f'{folder} is missing: expected the Cityscapes layout '
                               f'leftImg8bit/{split}/ and gtFine/{split}/ under {layout.root}')
    images, labels = {}, {}
    for image in files_below(image_dir, '_leftImg8bit.png'):
        name = image.relative_to(image_dir).as_posix()[:-len('_leftImg8bit.png')]
        images[name] = image
        for suffix, id_table in (('labelIds', TRAIN_IDS_LIST), ('labelTrainIds', None)):
            label = label_dir / f'{name}_gtFine_{suffix}.png'
            if label.is_file():          # raw ids first: mapped as they load
                labels[name] = (label, id_table)
                break
    if not images:
        raise DatasetError(f'no *_leftImg8bit.png images under {image_dir}')
    return (images, labels, lambda name: label_dir / f'{name}_gtFine_labelIds.png', None, [])


def own_files(layout, split):
    """Your own: ROOT/images/SPLIT/**/NAME.{png,jpg,jpeg} beside ROOT/labels/SPLIT/**/NAME.png,
    the same relative path and stem; ADE20K's names too (annotations/ for labels/, training/
    and validation/ for train/ and val/). Returns what pair_up takes."""
    split_list = layout.root / 'splits' / f'{split}.txt'        # one folder, listed splits
    listed = split_list.is_file()
    if listed:
        image_dir, label_dir = layout.root / 'images', layout.folder('labels', '')
    else:
        image_dir, label_dir = layout.folder('images', split), layout.folder('labels', split)
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DatasetError(f'{folder} is missing: expected images/{split}/ and '
                               f'labels/{split}/ under {layout.root}, or images/ and labels/ '
                               f'with splits/{split}.txt')
    images, labels, problems = {}, {}, []
    for folder, found in ((image_dir, images), (label_dir, labels)):
        for path in files_below(folder):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                name = path.relative_to(folder).with_suffix('').as_posix()
                if name in found:
                    problems.append(f'{found[name]} and {path} share the name {name}: '
                                    f'rename one of them')
                found[name] = path
    if listed:
        wanted = read_names(split_list)
        problems += [f'{split_list} names {name}, which is not an image under {image_dir}'
                     for name in wanted if name not in images]
        images = {name: images[name] for name in wanted if name in images}
        labels = {name: labels[name] for name in wanted if name in labels}
    if not images and not problems:
        raise DatasetError(f'no PNG or JPEG images under {image_dir}: the split is empty')
    return (images, {name: (path, layout.id_table) for name, path in labels.items()},
            lambda name: label_dir / f'{name}.png',
            lambda name: f'{image_dir / name}.png or .jpg', problems)


def voc_files(layout, split):
    """PASCAL VOC 2012 as unpacked, and CVAT's "Segmentation mask 1.1" export, which has its
    layout: ROOT/JPEGImages/NAME.jpg and ROOT/SegmentationClass/NAME.png (VOC: palette PNGs
    whose index is the class, 255 the boundary band; CVAT: colour PNGs in labelmap.txt's
    colours), the split's names in ROOT/ImageSets/Segmentation/SPLIT.txt. Where present, the
    augmented set joins train as mmsegmentation's VOC-aug config has it: the names of
    ImageSets/Segmentation/aug.txt with their labels in SegmentationClassAug/ (named aug/NAME).
    Returns what pair_up takes."""
    root, lists = layout.root, layout.root / 'ImageSets' / 'Segmentation'
    listed = lists / f'{split}.txt'
    if not listed.is_file():
        subsets = sorted(p.stem for p in lists.glob('*.txt'))
        raise DatasetError(f'{listed} is missing' + (
            f': {root} has the subsets {", ".join(subsets)} only; list the {split} images\' '
            f'names there, one a line (without .jpg), or export {split} as a subset of its own'
            if subsets else ''))
    parts = [(listed, root / 'SegmentationClass', '')]
    if split == 'train' and (lists / 'aug.txt').is_file() \
            and (root / 'SegmentationClassAug').is_dir():
        parts.append((lists / 'aug.txt', root / 'SegmentationClassAug', 'aug/'))
    images, labels, expected, problems = {}, {}, {}, []
    for names_file, label_dir, prefix in parts:
        for stem in read_names(names_file):
            image = next((root / 'JPEGImages' / f'{stem}{suffix}' for suffix in ('.jpg', '.png')
                          if (root / 'JPEGImages' / f'{stem}{suffix}').is_file()), None)
            if image is None:
                problems.append(f'{names_file} names {stem}, but {root / "JPEGImages"} has no '
                                f'{stem}.jpg')
                continue
            images[prefix + stem] = image
            expected[prefix + stem] = label_dir / f'{stem}.png'
            if expected[prefix + stem].is_file():
                labels[prefix + stem] = (expected[prefix + stem], layout.id_table)
    if not images and not problems:
        raise DatasetError(f'{listed} names no image: the split is empty')
    return images, labels, expected.get, None, problems


def pair_up(images, labels, expected_label, expected_image, problems):
    """A split's samples from a layout's files: images {name: path}, labels {name: (path, id
    table)}, where a missing label or image of a name is expected, and the problems found so
    far. Returns (samples, their names, every problem): an image without its label, a label
    without its image, a JPEG label."""
    samples, names = [], []
    for name, image in images.items():
        if name not in labels:
            problems.append(f'label missing for {image}: expected {expected_label(name)}')
            continue
        label, id_table = labels[name]
        if label.suffix.lower() != '.png':
            problems.append(f'{label} is a JPEG label: JPEG compression invents label values '
                            f'at every edge; save labels as PNG')
            continue
        samples.append(Sample(image, label, id_table))
        names.append(name)
    problems += [f'label without an image: {label} (expected {expected_image(name)})'
                 for name, (label, _) in labels.items() if name not in images]
    return samples, names, problems


class Layout:
    """A data set folder: which layout it has (cityscapes_files or own_files says where a
    split's files are), what its labels mean (ClassList: Cityscapes' classes, or classes.txt's)
    and how a label file becomes train ids (read_label). A label is an index image (mode L or
    P: the value, a palette PNG's index, is the train id, or with an id table maps to one; 255
    = ignore) or an RGB image in classes.txt's colours.
    """

    SPLIT_ALIASES = {'train': 'training', 'val': 'validation'}

    # Where a download unpacks to, below the folder a user may name instead.
    UNPACKED = ('VOCdevkit/VOC2012', 'VOC2012', 'ADEChallengeData2016')

    def __init__(self, root):
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise DatasetError(f'data path {root} is a file, not a folder: give the data set\'s '
                               f'folder')
        if not root.is_dir():
            raise DatasetError(f'data path {root} does not exist')
        self.root = root = next((root / inner for inner in self.UNPACKED
                                 if (root / inner).is_dir()), root)
        self.cityscapes = (root / 'leftImg8bit').is_dir() or (root / 'gtFine').is_dir()
        self.voc = (root / 'JPEGImages').is_dir() or (root / 'SegmentationClass').is_dir()
        ade20k = (root / 'images' / 'training').is_dir() \
            and (root / 'annotations' / 'training').is_dir()
        # What the labels mean: classes.txt, CVAT's labelmap.txt, or a set's own classes.
        self.classes_file, meaning, self.name = None, None, None
        for name, reader in (('labelmap.txt', read_labelmap), ('classes.txt', read_classes)):
            if not self.cityscapes and (root / name).is_file():
                self.classes_file, meaning = root / name, reader(root / name)
                break
        if meaning is None:
            self.name, meaning = ('Cityscapes', CITYSCAPES) if self.cityscapes else \
                ('PASCAL VOC', VOC) if self.voc else ('ADE20K', ADE20K) if ade20k else (None, None)
        if meaning is None:
            if any((root / folder).is_dir() for folder in ('images', 'labels', 'annotations')):
                raise DatasetError(f'{root / "classes.txt"} is missing: write the class names '
                                   f'there, one per line in train-id order (README: "Your own '
                                   f'data set")')
            raise DatasetError(f'{root} holds neither Cityscapes (leftImg8bit/, gtFine/), PASCAL '
                               f'VOC (JPEGImages/, SegmentationClass/), ADE20K nor a data set of '
                               f'your own (classes.txt, images/, labels/)')
        self.classes, self.palette = meaning.names, meaning.palette
        self.ignore_colours, self.id_table = meaning.ignore_colours, meaning.id_table
        self.reads_colours = meaning.all_coloured

    def folder(self, kind, split):
        """ROOT/KIND/SPLIT, or the first of its aliases that exists."""
        kinds = (kind, 'annotations') if kind == 'labels' else (kind,)
        splits = (split, self.SPLIT_ALIASES.get(split, split))
        candidates = [self.root / k / s for k in kinds for s in splits]
        return next((c for c in candidates if c.is_dir()), candidates[0])

    def find(self, split):
        """A split's samples (Sample), the names its outputs are written under, and the
        problems of pairing its images and labels up."""
        files = cityscapes_files if self.cityscapes else voc_files if self.voc else own_files
        return pair_up(*files(self, split))

    def read_label(self, path, id_table=None, pixels=True):
        """A label file as train ids, a PIL image of mode L (or P: its indices), and their
        histogram (256 counts). Index labels hold train ids, or with `id_table` ids to map
        (Cityscapes' labelIds); RGB labels are read by classes.txt's colours. Anything that
        is neither a class nor 255 raises DatasetError naming the file. With pixels=False only
        the histogram is made, at about a decode's cost, and the label comes back as stored
        (its size is right, its values need not be ids): what a check needs."""
        try:
            label = Image.open(path)
            label.load()
        except IMAGE_ERRORS as e:
            raise DatasetError(f'cannot read the label {path}: {e}') from None
        if label.format == 'JPEG':
            raise DatasetError(f'{path} is a JPEG file: JPEG compression invents label values at '
                               f'every edge; save labels as PNG')
        if label.mode in ('RGB', 'RGBA'):
            return self.read_colours(path, label, pixels)
        if label.mode not in ('L', 'P'):
            label = index_image(label, path)
        counts = label.histogram()
        if id_table is not None:            # the table applied to the histogram, then the pixels
            mapped = [0] * 256
            for value, count in enumerate(counts):
                mapped[id_table[value]] += count
            counts = mapped
            if pixels:
                label = label.point(id_table) if label.mode == 'L' else \
                    Image.fromarray(np.array(id_table, np.uint8)[np.asarray(label)])
        bad = [value for value in range(len(self.classes), IGNORE_INDEX) if counts[value]]
        if bad:
            share = sum(counts[v] for v in bad) / (label.width * label.height)
            # the value as the file holds it, before the id table (reduce_zero_label's shift)
            stored = next(v for v in range(256) if (id_table[v] if id_table else v) == bad[0])
            hint = (f'; if {stored} marks pixels to ignore, add the line "ignore: void {stored}" '
                    f'to {self.classes_file}' if self.classes_file
                    and self.classes_file.name == 'classes.txt' else '')
            raise DatasetError(f'{path} holds the value {stored}' + (f' (and {len(bad) - 1} '
                               f'other values)' if len(bad) > 1 else '') + f' in {share:.2%} of '
                               f'its pixels, but {self.what_values()}{hint}',
                               ('value', stored),
                               (sum(counts[v] for v in bad), label.width * label.height), counts)
        return label, counts

    def what_values(self):
        source = f'{self.classes_file} lists' if self.classes_file else f'{self.name} has'
        return (f'{source} {len(self.classes)} classes: labels hold 0-{len(self.classes) - 1}, '
                f'or 255 for pixels to ignore')

    def read_colours(self, path, label, pixels=True):
        """An RGB label mapped through classes.txt's colours (read_label)."""
        if not self.reads_colours:
            raise DatasetError(f'{path} is a colour (RGB) label, but classes.txt does not give '
                               f'every class a colour: add R G B after each name, or save labels '
                               f'as index PNGs (mode L or P)')
        rgb = label if label.mode == 'RGB' else label.convert('RGB')
        # Without pixels, Pillow counts the colours (a hash table in C, fast); with them, or
        # where a label has too many colours to list, every pixel goes through colour_table.
        colours = None if pixels else rgb.getcolors(maxcolors=1024)
        if colours is None:
            # Each pixel's three bytes, read as one little-endian number: R | G << 8 | B << 16.
            packed = np.ndarray((rgb.width * rgb.height,), '<u4', rgb.tobytes() + b'\0', 0,
                                (3,)) & 0xFFFFFF
            train_ids = colour_table(self.palette, self.ignore_colours).take(packed)
            ids = Image.fromarray(train_ids.reshape(rgb.height, rgb.width))
            counts = ids.histogram()
            unlisted = []
            if counts[UNLISTED]:
                values, number = np.unique(packed[train_ids == UNLISTED], return_counts=True)
                unlisted = [(int(n), (int(v) & 255, int(v) >> 8 & 255, int(v) >> 16))
                            for v, n in zip(values, number)]
        else:
            listed = dict(zip(self.palette, range(len(self.palette))))
            listed.update((colour, IGNORE_INDEX) for colour in self.ignore_colours)
            counts, unlisted, ids = [0] * 256, [], label
            for number, colour in colours:
                if colour in listed:
                    counts[listed[colour]] += number
                else:
                    unlisted.append((number, colour))
        if unlisted:
            number, colour = max(unlisted)
            r, g, b = colour
            listing, advice = (('labelmap.txt', f'add it there as "NAME:{r},{g},{b}::"')
                               if self.classes_file and self.classes_file.name == 'labelmap.txt'
                               else ('classes.txt', f'add it as a class or as "ignore: NAME {r} '
                                                    f'{g} {b}"'))
            raise DatasetError(f'{path} holds the colour {colour}, which {listing} does not '
                               f'list, in {number / (rgb.width * rgb.height):.2%} of its pixels'
                               + (f' ({len(unlisted) - 1} more unlisted colours)'
                                  if len(unlisted) > 1 else '') + f'; {advice}',
                               ('colour', colour),
                               (sum(n for n, _ in unlisted), rgb.width * rgb.height), counts)
        return ids, counts


# ----------------------------------------------------------------------------------------------
# Data, 3: reading a sample, and checking a split
# ----------------------------------------------------------------------------------------------


def exif_orientation(image):
    """The EXIF orientation of an opened image file (1: as stored), from its header: a PNG that
    keeps its EXIF after the pixels counts as unturned, since finding it there means decoding."""
    if image.format == 'PNG' and 'exif' not in image.info:
        return 1
    return image.getexif().get(EXIF_ORIENTATION, 1)


def image_header(path):
    """(size, stored size) of an image file, from its header: the size its EXIF orientation
    turns it to, and the size it is stored in."""
    try:
        with Image.open(path) as image:
            stored_size = image.size
            turned = exif_orientation(image) in (5, 6, 7, 8)
    except IMAGE_ERRORS as e:
        raise DatasetError(f'cannot read {path}: {e}') from None
    return (stored_size[::-1] if turned else stored_size), stored_size


def open_image(path):
    """An image file as RGB, turned as its EXIF orientation says (as cv2 loads it for the
    reference); also the size it has before that turn."""
    image = Image.open(path)
    stored_size = image.size
    if exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    image.load()
    if image.mode.startswith('I'):
        # 16-bit greyscale: its high byte, as cv2 reads it (convert('RGB') would clip at 255)
        image = Image.fromarray(np.clip(np.asarray(image, np.int64) >> 8, 0, 255)
                                .astype(np.uint8), 'L')
    return (image if image.mode == 'RGB' else image.convert('RGB')), stored_size


def size_problem(image_path, size, stored_size, label_path, label_size):
    """Why an image and its label do not fit together, or None."""
    if size == label_size:
        return None
    problem = f'{image_path} is {size[0]}x{size[1]} but its label {label_path} is ' \
              f'{label_size[0]}x{label_size[1]}'
    if label_size == stored_size:
        problem += (': the sizes match only without the image\'s EXIF rotation, so the label was '
                    'drawn on the unrotated image; rotate the label too, or save the image '
                    'without its EXIF orientation')
    return problem


def read_sample(layout, sample, pixels=True):
    """The image and label of a Sample, checked; what the check, the data set and its cache
    read. With pixels: (RGB image, train-id label (PIL, L), the label's histogram of train
    ids). Without: (the image's size from its header, the label as stored, the histogram), at
    about a decode of the label's cost. Raises DatasetError naming the file: unreadable, a
    value or colour that is no class, an image and label of different sizes."""
    image_path, label_path, id_table = sample
    if pixels:
        try:
            image, stored_size = open_image(image_path)
        except IMAGE_ERRORS as e:
            raise DatasetError(f'cannot read {image_path}: {e}') from None
        size = image.size
    else:
        size, stored_size = image_header(image_path)
        image = size
    label, counts = layout.read_label(label_path, id_table, pixels)
    problem = size_problem(image_path, size, stored_size, label_path, label.size)
    if problem:
        raise DatasetError(problem)
    return image, label, counts


def look_at(layout, sample, decode=False):
    """What a check learns of one sample: (image size, histogram of the label's train ids,
    None), or (None, the histogram where the label could be read, the problem: (message,
    kind, bad pixels, the label file); see DatasetError). The image is read from its header
    only, or with `decode` decoded whole, so that a truncated file is found too."""
    try:
        size, _, counts = read_sample(layout, sample, pixels=False)
        if decode:
            try:
                with Image.open(sample.image) as image:
                    image.load()
            except IMAGE_ERRORS as e:
                raise DatasetError(f'cannot read {sample.image}: {e}') from None
        return size, counts, None
    except DatasetError as e:
        return None, e.counts, (str(e), e.kind, e.bad, sample.label)


def spread(count, limit):
    """At most `limit` of the indices 0 .. count - 1, evenly spread over them, sorted."""
    return sorted(set(np.linspace(0, count - 1, min(limit, count)).round().astype(int).tolist()))


def survey(layout, split, samples, limit=None, processes=1, decode=False):
    """Look at the labels of a split's samples (all of them, or `limit` spread over the split)
    in `processes` processes, as `python bisenet.py --check-data` and train.py do; with
    `decode`, as the check does, each image decoded whole too (look_at). Returns a
    dict: 'looked' (how many), 'sizes' [(w, h)], 'pixels' (counts per train id, 256),
    'problems' (each one line: what cannot be trained on), 'groups' (the labels with the same
    stray value or colour: {kind: {'labels', 'bad', 'pixels', 'first': the first one's
    problem}}), 'ungrouped' (the other
    problems) and 'warnings' (what can be trained on, but is likely wrong)."""
    count = len(samples)
    if limit is not None and limit < count:
        samples = [samples[i] for i in spread(count, limit)]
    work = functools.partial(look_at, layout, decode=decode)
    if processes > 1 and len(samples) > 1:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context('fork' if 'fork' in methods else None)
        chunk = max(1, len(samples) // (processes * 4))
        try:        # an executor, not a Pool: a killed process fails the map instead of hanging
            with concurrent.futures.ProcessPoolExecutor(
                    min(processes, len(samples)), mp_context=context,     # Ctrl-C: the caller's
                    initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
                results = list(pool.map(work, samples, chunksize=chunk))
        except concurrent.futures.process.BrokenProcessPool:
            raise SetupError(f'a process looking at the {split} labels died (killed, most '
                             f'likely for memory): run again, or with fewer --workers') from None
    else:
        results = [work(sample) for sample in samples]
    pixels, sizes, problems, groups, ungrouped = np.zeros(256, np.int64), [], [], {}, []
    for size, counts, problem in results:
        if counts is not None:              # also a label with a stray value or colour
            pixels += counts
        if problem is None:
            sizes.append(size)
            continue
        problems.append(problem[0])
        if problem[1] is None:
            ungrouped.append(problem[0])
        else:
            group = groups.setdefault(problem[1], {'labels': [], 'bad': 0, 'pixels': 0,
                                                   'first': problem[0]})
            group['labels'].append(problem[3])
            group['bad'] += problem[2][0]
            group['pixels'] += problem[2][1]
    warnings_, classes = [], layout.classes
    seen = set(np.flatnonzero(pixels).tolist())
    looked = f'the {len(samples)} {split} labels looked at' if len(samples) < count \
        else f'the {split} labels'
    # Colour labels hold 255 only where classes.txt names ignore colours: without them, 0 and
    # 255 alone are a binary mask saved as black and white.
    if len(classes) >= 2 and seen == {0, IGNORE_INDEX} and not layout.ignore_colours:
        names = ', '.join(f"'{name}'" for name in classes[1:])
        problems.append(f'{looked} hold only the values 0 and 255, but 255 means "ignore": '
                        f'{names} would never be learnt; save masks with 1 for the object (0/1 '
                        f'masks; 255 only for pixels to ignore)')
        ungrouped.append(problems[-1])
    elif sizes:
        absent = [name for i, name in enumerate(classes) if not pixels[i]]
        if absent:
            warnings_.append(f'class {", ".join(repr(n) for n in absent)} never occurs in '
                             f'{looked}: the model cannot learn it')
    return {'looked': len(samples), 'sizes': sizes, 'pixels': pixels, 'problems': problems,
            'groups': groups, 'ungrouped': ungrouped, 'warnings': warnings_}


# ----------------------------------------------------------------------------------------------
# Data, 4: the data set, its decoded cache, the sample stream
# ----------------------------------------------------------------------------------------------


class DecodedCache:
    """Decode each image once: a sample's RGB pixels (H, W, 3) and train ids (H, W), uint8, in a
    file of its own under FOLDER, written on first use and memory-mapped after, so that a worker
    reads only the rows its crop needs and the page cache serves every worker and every process
    on the host.

    An entry is written to a temporary file and renamed into place: workers and ranks can fill
    the cache at once, and a kill leaves no half-written entry. Its 4 KiB header names the two
    source files with their size and modification time; an entry whose sources changed, or whose
    header or length is wrong (a truncated file), is rebuilt and never read as pixels.
    """
    HEADER = 4096          # a page: the pixels start page-aligned
    MAGIC = b'BiSeNetV1 decoded sample v1\n'

    def __init__(self, folder):
        self.folder = Path(folder)

    def path(self, name):
        return self.folder / f'{name}.rgbl'

    @staticmethod
    def sources(*paths):
        """What an entry must have been decoded from: each path with its size and mtime."""
        stats = [(Path(p).resolve(), os.stat(p)) for p in paths]
        return [[str(path), stat.st_size, stat.st_mtime_ns] for path, stat in stats]

    def read(self, name, *source_paths):
        """The entry's image and label as memory maps, or None if missing, stale or damaged."""
        path = self.path(name)
        try:
            with open(path, 'rb') as f:
                header = f.read(self.HEADER)
            if not header.startswith(self.MAGIC):
                return None
            meta = json.loads(header[len(self.MAGIC):].rstrip(b' '))
            height, width = meta['shape']
            if (meta['sources'] != self.sources(*source_paths)
                    or path.stat().st_size != self.HEADER + height * width * 4):
                return None
            pixels = np.memmap(path, np.uint8, 'r', offset=self.HEADER)
            return self.split(pixels, height, width)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def split(pixels, height, width):
        """(image (H, W, 3), label (H, W)) of an entry's pixels: the image, then the label."""
        return (pixels[:height * width * 3].reshape(height, width, 3),
                pixels[height * width * 3:].reshape(height, width))

    def write(self, name, image, label, *source_paths):
        """Store one decoded sample (PIL images or arrays); returns it as read() does. A failed
        write (a full disk) leaves no file behind and costs only the speed of this sample."""
        image, label = np.asarray(image), np.asarray(label)
        meta = {'shape': label.shape, 'sources': self.sources(*source_paths)}
        header = self.MAGIC + json.dumps(meta).encode()
        if len(header) > self.HEADER:                     # paths of thousands of characters
            return image, label
        path = self.path(name)
        tmp = path.with_name(f'{path.name}.{os.getpid()}-{time.monotonic_ns()}.tmp')
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, 'wb') as f:
                f.write(header.ljust(self.HEADER, b' '))
                f.write(np.ascontiguousarray(image).data)
                f.write(np.ascontiguousarray(label).data)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
        return image, label


class SegmentationDataset(torch.utils.data.Dataset):
    """One split of a data set folder (Layout): images with their labels as train ids
    (0 to C-1, 255 = ignore), C = len(classes); `classes` and `palette` name and colour them.

    Without a transform an item is (RGB uint8 array (H, W, 3), train-id uint8 array (H, W)).
    With one it is transform(image, label, rng); the key may be an int, or (index, rng_key) from
    InfiniteSampler so that the sample's randomness is fixed by its place in the stream.
    A label value that is not a class, an unlisted colour or a size mismatch raises
    DatasetError naming the file when the sample is read (survey() finds them up front).
    With cache_dir, each sample is decoded once into a DecodedCache there (CACHE_DIR/SPLIT) and
    memory-mapped after; the transforms give the same samples either way. `cache_note` says
    where the cache is and how large, or why it is not used (too little free space).
    """

    def __init__(self, root, split='train', transform=None, cache_dir=None):
        self.layout = Layout(root)
        self.classes, self.palette = self.layout.classes, self.layout.palette
        self.samples, self.names, problems = self.layout.find(split)
        if problems:
            raise DatasetError(problems[0] + more(problems, root))
        self.split, self.transform = split, transform
        self.cache, self.cache_note = None, None
        if cache_dir is not None:
            self.cache = DecodedCache(make_dir(Path(cache_dir) / split, '--cache-dir'))
            self.cache_note = self.size_cache()

    def __len__(self):
        return len(self.samples)

    def sources(self, index):
        """The files sample `index` is decoded from; classes.txt too, since it gives colours
        their train ids."""
        sample, classes_file = self.samples[index], self.layout.classes_file
        return (sample.image, sample.label) + ((classes_file,) if classes_file else ())

    def size_cache(self):
        """Check that the cache fits on its disk (if not, go without it) and say how large."""
        total = missing = 0
        for index, sample in enumerate(self.samples):
            entry = self.cache.read(self.name(index), *self.sources(index))
            if entry is None:
                width, height = image_header(sample.image)[1]
                size = DecodedCache.HEADER + height * width * 4
                missing += size
            else:
                size = DecodedCache.HEADER + entry[1].size * 4
            total += size
        folder, free = self.cache.folder, shutil.disk_usage(self.cache.folder).free
        if missing > free - 2 ** 30:                      # leave the disk a GiB of room
            self.cache = None
            return (f'decoded-data cache {folder}: {size_text(missing)} more are needed but '
                    f'{size_text(free)} are free: going without the cache')
        return (f'decoded-data cache {folder}: {len(self.samples)} images, {size_text(total)} '
                f'({size_text(missing)} still to write, as each image is first used)')

    def load(self, index):
        """The RGB image and train-id label of sample `index`: views of its memory-mapped cache
        entry (H, W, 3) and (H, W), which the transforms read region by region; without a cache,
        PIL images (RGB; L or P) as decoded."""
        if self.cache is None:
            return self.decode(index)
        name, sources = self.name(index), self.sources(index)
        entry = self.cache.read(name, *sources)
        if entry is None:
            entry = self.cache.write(name, *self.decode(index), *sources)
        return entry

    def decode(self, index):
        """The PIL image (RGB) and label (train ids) of sample `index`, from its files."""
        image, label, _ = read_sample(self.layout, self.samples[index])
        return image, label

    def __getitem__(self, key):
        index, rng_key = key if isinstance(key, tuple) else (key, None)
        image, label = self.load(index)
        if self.transform is None:
            return np.array(image), np.array(label)
        return self.transform(image, label, np.random.default_rng(rng_key))

    def name(self, index):
        """The image's path relative to its split folder, without its suffix (Cityscapes:
        without '_leftImg8bit.png')."""
        return self.names[index]


Cityscapes = SegmentationDataset     # the name scripts know; Cityscapes is one of its layouts


class InfiniteSampler(torch.utils.data.Sampler):
    """The endless, reproducible stream of training samples of one rank.

    The global stream is one seeded permutation of the data set per epoch; rank r takes
    positions r, r + world_size, ... Each key is (index, (seed, position)), so a sample's
    augmentation depends only on the seed and its place in the stream: the same with any number
    of DataLoader workers, and after a resume that starts at `start` (samples already taken).
    """

    def __init__(self, size, seed=0, rank=0, world_size=1, start=0):
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start

    def __iter__(self):
        epoch, order = -1, None
        step = self.start
        while True:
            position = step * self.world_size + self.rank
            if position // self.size != epoch:
                epoch = position // self.size
                order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            yield int(order[position % self.size]), (self.seed, position)
            step += 1


# ----------------------------------------------------------------------------------------------
# Data, 5: augmentation, the reference's pipeline
# ----------------------------------------------------------------------------------------------


def parse_crop_size(values):
    """The --crop-size flag's values as (h, w): one value S means S x S, two are H W."""
    if len(values) not in (1, 2) or min(values) <= 0:
        raise SetupError(f'--crop-size takes one positive size or H W, not '
                         f'{" ".join(map(str, values))}')
    return values[0], values[-1]


def accept_crop(label, cat_max_ratio=0.75):
    """The reference's crop rule: more than one class, and none (ignore aside) covering
    `cat_max_ratio` or more of the labelled pixels."""
    if isinstance(label, Image.Image):
        counts = np.array(label.histogram())[:IGNORE_INDEX]         # PIL's, without a copy
    else:
        counts = np.bincount(np.asarray(label).ravel(), minlength=256)[:IGNORE_INDEX]
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def image_size(image):
    """(width, height) of a PIL image or of an (H, W[, C]) array, as PIL's .size gives it."""
    return image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])


def region(image, box):
    """The pixels (x1, y1, x2, y2) of a PIL image or of a (memory-mapped) array, as a PIL
    image; from an array only those rows and columns are read."""
    if isinstance(image, Image.Image):
        return image.crop(box)
    x1, y1, x2, y2 = box
    return Image.fromarray(np.ascontiguousarray(image[y1:y2, x1:x2]))


def rescale_crop(image, size, scaled_size, box, resample):
    """Rescale `image` (PIL or array) from `size` (w, h) to `scaled_size` as cv2.resize does, then
    crop `box` (x1, y1, x2, y2) of the result (the whole box: the whole rescaled image). Only the
    source pixels the crop samples are read (plus the filters' reach of two), the same way from
    a decoded image and from a memory-mapped cache entry; a PIL image comes back."""
    (w, h), (scaled_w, scaled_h), (x1, y1, x2, y2) = size, scaled_size, box
    sx, sy = w / scaled_w, h / scaled_h
    left, top = max(int(x1 * sx) - 2, 0), max(int(y1 * sy) - 2, 0)
    image = region(image, (left, top, min(int(x2 * sx) + 3, w), min(int(y2 * sy) + 3, h)))
    if resample == Image.NEAREST:      # cv2's nearest samples at floor(x * scale)
        return image.transform((x2 - x1, y2 - y1), Image.AFFINE,
                               (sx, 0, (x1 - 0.5) * sx - left, 0, sy, (y1 - 0.5) * sy - top),
                               resample)
    if scaled_w < w:    # PIL's resize antialiases when shrinking, cv2 (the reference) does not:
        # an affine transform samples 2 x 2 pixels exactly as cv2's bilinear does.
        return image.transform((x2 - x1, y2 - y1), Image.AFFINE,
                               (sx, 0, x1 * sx - left, 0, sy, y1 * sy - top), resample)
    return image.resize((x2 - x1, y2 - y1), resample,   # equal to cv2 here, and faster
                        box=(x1 * sx - left, y1 * sy - top, x2 * sx - left, y2 * sy - top))


def pixels(image):
    """The pixels of a PIL image or an array as a uint8 tensor, with one copy (np.asarray's
    is read-only, and a memory map's belongs to the file)."""
    if not isinstance(image, Image.Image):
        return torch.from_numpy(np.array(image))
    array = np.frombuffer(bytearray(image.tobytes()), np.uint8)
    return torch.from_numpy(array).view(image.height, image.width, -1).squeeze(2)


def pad_to(image, label, size):
    """Image and label (PIL or arrays) -> uint8 (3, h, w) and uint8 (h, w) tensors, padded
    bottom-right to `size` with 0 and 255 (the reference pads after normalising, so 0 there
    is 0 after)."""
    image, label = pixels(image).permute(2, 0, 1), pixels(label)
    if tuple(label.shape) == tuple(size):
        return image, label
    image_out = torch.zeros(3, *size, dtype=torch.uint8)
    label_out = torch.full(size, IGNORE_INDEX, dtype=torch.uint8)
    image_out[:, :image.shape[1], :image.shape[2]] = image
    label_out[:label.shape[0], :label.shape[1]] = label
    return image_out, label_out


def photometric_params(rng, valid_size):
    """One sample's photometric distortion, drawn as the reference draws it: each step with
    probability 0.5; hue deltas are integers in [-18, 18) as numpy's randint gives. float32,
    the precision they are applied in, so that a batch of them is one pinned float32 copy."""
    def coin():
        return rng.random() < 0.5
    draws = {
        'brightness': rng.uniform(-32, 32) if coin() else 0.0,
        'contrast': rng.uniform(0.5, 1.5) if coin() else 1.0,
        'contrast_first': float(coin()),
        'saturation': rng.uniform(0.5, 1.5) if coin() else 0.0,   # 0 = step skipped
        'hue': float(rng.integers(-18, 18)) if coin() else float('nan'),   # nan = skipped
    }
    return dict({'size': np.array(valid_size)},                 # unpadded (h, w)
                **{name: np.float32(value) for name, value in draws.items()})


def to_uint8(x):
    """numpy's float32 -> uint8 cast after clipping, as the reference does after each step."""
    return x.clamp(0, 255).floor()


@functools.lru_cache(maxsize=None)
def device_constants(device):
    """The data pipeline's constants on `device`, made once per device: a tensor built from
    Python numbers is a blocking host-to-device copy, which every iteration would pay."""
    return {
        'mean': torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
        'std': torch.tensor(STD, device=device).view(1, 3, 1, 1),
        # (r, g, b) per HSV sector as indices into (v, p, q, t): the standard HSV table
        'hsv_table': torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0],
                                   [0, 1, 2]], device=device),
    }


def normalize(images):
    """(x - MEAN) / STD for an RGB batch (N, 3, H, W), uint8 or float, as float32."""
    constants = device_constants(images.device)
    return (images.float() - constants['mean']) / constants['std']


def rgb_to_hsv(rgb):
    """OpenCV's 8-bit RGB -> HSV: H in [0, 180), S and V in [0, 255], all rounded."""
    r, g, b = rgb.unbind(1)
    v, _ = rgb.max(1)
    diff = v - rgb.min(1)[0]
    s = torch.where(v > 0, torch.floor(diff * 255 / v.clamp(min=1) + 0.5), torch.zeros_like(v))
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = torch.where(diff > 0, torch.floor(h * 30 / diff.clamp(min=1) + 0.5), torch.zeros_like(h))
    return torch.stack([torch.remainder(h, 180), s, v], 1)


def hsv_to_rgb(hsv):
    """OpenCV's 8-bit HSV -> RGB (float maths, rounded to the nearest integer)."""
    h, s, v = hsv[:, 0] / 30, hsv[:, 1] / 255, hsv[:, 2]
    sector = torch.floor(h)
    f = h - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = sector.long().remainder(6)
    choices = torch.stack([v, p, q, t], 1)
    index = device_constants(hsv.device)['hsv_table'][sector].permute(0, 3, 1, 2)
    return torch.round(torch.gather(choices, 1, index))


def distort_and_normalize(images, params):
    """Photometric distortion, normalisation and zero padding of a uint8 RGB batch (N, 3, H, W),
    on whatever device it lives; `params` is the collated photometric_params of its samples, on
    the CPU (pinned by the DataLoader on an accelerator).

    Each step reproduces the reference's uint8 arithmetic: brightness (+delta), contrast (xalpha,
    first or last), saturation (xalpha in HSV), hue (shift on the 0-180 scale), rounding to uint8
    after each, then (x - MEAN) / STD, then 0 outside each sample's unpadded size. Nothing here
    waits for the device: the copies do not block and decisions read the CPU-side parameters.
    """
    def column(name):
        return params[name].to(images.device, non_blocking=True).view(-1, 1, 1, 1)
    x = images.float()
    contrast, contrast_first = column('contrast'), column('contrast_first') > 0
    x = to_uint8(x + column('brightness'))
    x = torch.where(contrast_first, to_uint8(x * contrast), x)
    saturation, hue = column('saturation'), column('hue')
    if bool((params['saturation'] > 0).any()) or bool((~params['hue'].isnan()).any()):
        hsv = rgb_to_hsv(x)
        saturated = torch.cat([hsv[:, :1], to_uint8(hsv[:, 1:2] * saturation), hsv[:, 2:]], 1)
        x = torch.where(saturation > 0, hsv_to_rgb(saturated), x)
        hsv = rgb_to_hsv(x)
        shifted = torch.cat([torch.remainder(hsv[:, :1] + torch.nan_to_num(hue), 180), hsv[:, 1:]], 1)
        x = torch.where(hue.isnan(), x, hsv_to_rgb(shifted))
    x = torch.where(contrast_first, x, to_uint8(x * contrast))
    x = normalize(x)
    sizes = params['size'].to(images.device, non_blocking=True)
    rows = torch.arange(x.shape[2], device=x.device)[None, :, None] < sizes[:, 0, None, None]
    cols = torch.arange(x.shape[3], device=x.device)[None, None, :] < sizes[:, 1, None, None]
    return x * (rows & cols)[:, None].to(x.dtype)


class TrainTransform:
    """The reference's training augmentation, step for step.

    1. rescale by a ratio drawn in `ratio_range` of the image's own size (image bilinear, label
       nearest); 2. a random `crop_size` (h, w) crop, re-drawn up to 10 times until accept_crop;
    3. horizontal flip with p 0.5; 4. photometric distortion; 5. normalisation; 6. padding to the
    crop size (image 0, label 255). Only the crop region is ever resized: that is what makes this
    cheaper than the reference, which rescales the whole image.

    Returns (image float32 (3, h, w) normalised, label int64 (h, w)); with on_device=True steps
    4-6 are left to distort_and_normalize() on the accelerator, batched, and it returns
    (image uint8 (3, h, w), label uint8 (h, w), params): the sample's distortion parameters,
    drawn here. uint8 labels are an eighth of the bytes to pin and copy; .long() on the device.
    """

    def __init__(self, crop_size=(1024, 1024), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                 on_device=False):
        self.crop_size, self.ratio_range = tuple(crop_size), ratio_range
        self.cat_max_ratio, self.on_device = cat_max_ratio, on_device

    def __call__(self, image, label, rng):
        w, h = image_size(image)
        ratio = rng.uniform(*self.ratio_range)
        scaled_w, scaled_h = int(w * ratio + 0.5), int(h * ratio + 0.5)
        crop_h, crop_w = self.crop_size

        def random_box():      # (x1, y1, x2, y2) in the rescaled image
            y = rng.integers(0, max(scaled_h - crop_h, 0) + 1)
            x = rng.integers(0, max(scaled_w - crop_w, 0) + 1)
            return x, y, min(x + crop_w, scaled_w), min(y + crop_h, scaled_h)

        def resize_crop(img, box, resample):
            return rescale_crop(img, (w, h), (scaled_w, scaled_h), box, resample)

        box = random_box()
        label_crop = resize_crop(label, box, Image.NEAREST)
        if self.cat_max_ratio < 1:
            for _ in range(10):        # as the reference: the 11th draw is kept unchecked
                if accept_crop(label_crop, self.cat_max_ratio):
                    break
                box = random_box()
                label_crop = resize_crop(label, box, Image.NEAREST)
        image_crop = resize_crop(image, box, Image.BILINEAR)
        if rng.random() < 0.5:
            image_crop = image_crop.transpose(Image.FLIP_LEFT_RIGHT)
            label_crop = label_crop.transpose(Image.FLIP_LEFT_RIGHT)
        params = photometric_params(rng, valid_size=(label_crop.height, label_crop.width))
        image, label = pad_to(image_crop, label_crop, self.crop_size)
        if self.on_device:
            return image, label, params
        params = {k: torch.as_tensor(v)[None] for k, v in params.items()}
        return distort_and_normalize(image[None], params)[0], label.long()


class EvalTransform:
    """The whole image, normalised (float32 (3, H, W)), and its label (int64 (H, W)); with
    on_device=True both stay uint8 for normalize() and .long() on the accelerator."""

    def __init__(self, on_device=False):
        self.on_device = on_device

    def __call__(self, image, label, rng=None):
        width, height = image_size(image)
        image, label = pad_to(image, label, (height, width))
        if self.on_device:
            return image, label
        return normalize(image[None])[0], label.long()


# ----------------------------------------------------------------------------------------------
# A synthetic Cityscapes for demos and tests
# ----------------------------------------------------------------------------------------------


def synthetic_scene(rng, size=(256, 128)):
    """A street-like scene: (RGB uint8 (H, W, 3), raw labelIds uint8 (H, W)).

    Bands of sky, building, vegetation, sidewalk and road with objects on them; every class
    has its official colour plus noise, so colour and layout both teach the network.
    """
    w, h = size
    train = np.zeros((h, w), np.uint8)
    horizon, kerb, road = (int(h * rng.uniform(a, b)) for a, b in ((.15, .3), (.5, .6), (.65, .75)))
    train[:horizon] = 10                                        # sky
    train[horizon:kerb] = 2                                     # building
    train[kerb:road] = 1                                        # sidewalk
    train[road:] = 0                                            # road
    for cls, top, bottom in ((8, horizon, kerb), (3, horizon, kerb), (4, kerb - h // 10, kerb),
                             (9, kerb, road)):                  # vegetation, wall, fence, terrain
        x = rng.integers(0, w - w // 5)
        train[top:bottom, x:x + rng.integers(w // 10, w // 4)] = cls
    for _ in range(rng.integers(3, 7)):                         # objects standing on the street
        cls = rng.choice([5, 6, 7, 11, 12, 13, 14, 15, 16, 17, 18])
        ow, oh = (int(w * rng.uniform(.05, .2)), int(h * rng.uniform(.1, .35)))
        x, bottom = rng.integers(0, w - ow), rng.integers(kerb, h)
        train[max(bottom - oh, 0):bottom, x:x + ow] = cls
    train[h - h // 16:] = IGNORE_INDEX                          # the ego vehicle: ignored
    image = lookup_table(PALETTE)[train] + rng.normal(0, 12, (h, w, 3)) + rng.uniform(-20, 20)
    raw = lookup_table(LABEL_IDS, fill=1)[train]                # 1 = ego vehicle
    return np.clip(image, 0, 255).astype(np.uint8), raw


def make_synthetic_cityscapes(root, num_train=48, num_val=8, size=(256, 128), seed=0):
    """Write a small synthetic data set in the official Cityscapes layout, with raw labelIds."""
    rng = np.random.default_rng(seed)
    for split, count in (('train', num_train), ('val', num_val)):
        for i in range(count):
            city = f'city{i % 2}'
            name = f'{city}_{i:06d}_000019'
            image, label = synthetic_scene(rng, size)
            for folder, suffix, array in (('leftImg8bit', 'leftImg8bit', image),
                                          ('gtFine', 'gtFine_labelIds', label)):
                path = Path(root) / folder / split / city / f'{name}_{suffix}.png'
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)
    return Path(root)


# ----------------------------------------------------------------------------------------------
# Device, distributed backend and precision: decided here, and nowhere else
# ----------------------------------------------------------------------------------------------


def cpu_has_bf16():
    """Whether oneDNN runs bfloat16 on this CPU (AVX512-BF16, AMX, Arm BF16; also AVX-512
    cores, which convert)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_int8_dot():
    """Whether this CPU has int8 dot-product instructions (x86 VNNI or AMX, Arm dotprod), which
    make int8 models faster than fp32; None where the CPU's flags cannot be read."""
    try:
        flags = set(Path('/proc/cpuinfo').read_text().split())
    except OSError:
        return None
    return bool(flags & {'avx512_vnni', 'avx_vnni', 'amx_int8', 'asimddp'})


def import_torch_npu():
    """Import torch_npu if it is installed and loads; None otherwise. Never a requirement:
    installed without the CANN toolkit, it fails to load (and so would a plain import)."""
    import importlib.util
    if importlib.util.find_spec('torch_npu') is None:
        return None
    try:
        import torch_npu
        return torch_npu if torch.npu.is_available() else None
    except (ImportError, RuntimeError, OSError):
        return None


def torch_version():
    """(major, minor) of the installed torch."""
    return tuple(int(n) for n in re.match(r'(\d+)\.(\d+)', torch.__version__).groups())


def npu_saturates():
    """Whether this NPU computes fp16 in saturation mode (910A: an overflow gives the largest
    finite value, not inf). Ask after set_device: it initialises torch_npu's runtime."""
    supports_inf_nan = getattr(torch.npu.utils, 'is_support_inf_nan', None)
    return supports_inf_nan is not None and not supports_inf_nan()


def fused_sgd_available():
    """Whether this torch has a fused SGD (2.3 on; not 2.1-2.2)."""
    return 'fused' in inspect.signature(torch.optim.SGD).parameters


def sgd(parameters, fused=False, **kwargs):
    """torch.optim.SGD with its momentum buffers made now, at zero, rather than at the first
    step: the same arithmetic (0.9 x 0 + g = g), and a first step skipped for an fp16
    overflow leaves them at zero. torch's fused kernel makes them with empty_like at the
    first step and returns early on an overflow, leaving them uninitialised."""
    optimizer = torch.optim.SGD(parameters, **(dict(kwargs, fused=True) if fused else kwargs))
    for group in optimizer.param_groups:
        if group['momentum']:
            for parameter in group['params']:
                optimizer.state[parameter]['momentum_buffer'] = torch.zeros_like(
                    parameter, memory_format=torch.preserve_format)
    return optimizer


def init_worker(worker_id=None):
    """A DataLoader worker's worker_init_fn. The worker gets a process group of its own, so
    that a signal to the trainer's group (Ctrl-C in a terminal, torchrun's or a scheduler's
    SIGTERM) reaches the trainer alone, which stops at a sync point and ends its workers
    itself: torch's workers die of a SIGTERM from anyone but their parent, and the trainer
    would fail at its next batch instead of saving. On Linux the worker dies with its trainer
    (kill -9, a second Ctrl-C), even one forked in the instant before; elsewhere it exits by
    itself within seconds, as always. Either way quietly: a broken connection in its background
    threads (the batch being handed over when the trainer died) is no error of its own to
    print."""
    if hasattr(os, 'setpgid'):
        os.setpgid(0, 0)
    if sys.platform.startswith('linux'):
        import ctypes
        trainer = multiprocessing.parent_process()
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
        if trainer is not None and not trainer.is_alive():   # it died before the line above
            os._exit(0)
    excepthook = sys.excepthook

    def quiet_about_broken_connections(kind, value, traceback):
        if not issubclass(kind, ConnectionError):
            excepthook(kind, value, traceback)
    sys.excepthook = quiet_about_broken_connections


class Runtime:
    """Where and how this process runs: device, rank, world size, autocast and grad scaling.

    Under torchrun (WORLD_SIZE > 1) it joins the process group: hccl on NPU, nccl on CUDA,
    gloo on CPU; one device per process, picked by LOCAL_RANK (through device_list, the Ascend
    scripts' '0,1,2,3', when given).
    """

    def __init__(self, device='auto', amp=False, amp_dtype='fp16', device_list=None):
        self.rank = int(os.environ.get('RANK', 0))
        self.local_rank = int(os.environ.get('LOCAL_RANK', 0))
        self.world_size = int(os.environ.get('WORLD_SIZE', 1))
        npu = import_torch_npu() if device in ('auto', 'npu') else None
        if device == 'auto':
            device = 'npu' if npu else 'cuda' if torch.cuda.is_available() else 'cpu'
        if device == 'npu' and npu is None:
            raise SetupError('--device npu: torch_npu is not installed or cannot load (install '
                             'torch-npu matching torch and source CANN set_env.sh)')
        if device == 'cuda' and not torch.cuda.is_available():
            raise SetupError('--device cuda: no CUDA device is visible to this torch build')
        if amp and device == 'cpu' and amp_dtype == 'fp16':
            raise SetupError('--amp on CPU runs in bf16 only (fp16 autocast is slow there): add '
                             '--amp-dtype bf16 on a CPU with bf16 units, or drop --amp')
        if amp and device == 'cpu' and not cpu_has_bf16():
            raise SetupError('--amp-dtype bf16: this CPU has no bfloat16 units (AVX512-BF16, '
                             'AMX or Arm BF16); run in fp32 (drop --amp)')
        index = self.local_rank
        if device_list:
            try:
                ids = [int(i) for i in str(device_list).split(',') if i.strip()]
            except ValueError:
                raise SetupError(f'--device_list {device_list}: expected device ids such as '
                                 f'0,1,2,3') from None
            if self.local_rank >= len(ids):
                raise SetupError(f'--device_list {device_list} has no device for local rank '
                                 f'{self.local_rank}')
            index = ids[self.local_rank]
        if device == 'cpu':
            self.device = torch.device('cpu')
        else:
            accelerator = getattr(torch, device)
            count = accelerator.device_count()
            processes = int(os.environ.get('LOCAL_WORLD_SIZE', 1))     # torchrun's, per host
            if device_list and index >= count:
                raise SetupError(f'--device_list {device_list} names {device} device {index}, '
                                 f'but this host shows {count} {device} device(s)')
            if not device_list and processes > count:
                raise SetupError(f'{processes} processes on this host need {processes} {device} '
                                 f'devices, but it shows {count}: start at most {count} '
                                 f'(torchrun --nproc_per_node={count})')
            # First, before any other question to torch_npu: one that initialises its runtime
            # (is_bf16_supported, get_device_name, ...) would open a context on device 0.
            accelerator.set_device(index)                 # and before init_process_group
            if amp and amp_dtype == 'bf16' and not accelerator.is_bf16_supported():
                # Autocast would warn and run in fp32, or fail at the first forward pass.
                raise SetupError(f'--amp-dtype bf16: this {device} device has no bfloat16 '
                                 f'support (Atlas training NPUs, GPUs before Ampere); use '
                                 f'--amp-dtype fp16')
            self.device = torch.device(device, index)
        self.type = device
        if device == 'cuda':
            torch.backends.cudnn.benchmark = True    # fixed crop sizes, as the reference sets it
        self.backend = {'npu': 'hccl', 'cuda': 'nccl', 'cpu': 'gloo'}[device]
        self.distributed = self.world_size > 1
        if self.distributed:
            # Each torchrun round (--max-restarts) in a store namespace of its own: torchrun
            # keeps its store across a restart, and a restarted gloo group would otherwise
            # read the dead round's addresses and fail to connect.
            store, rank, world_size = next(torch.distributed.rendezvous('env://'))
            restart = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
            store = torch.distributed.PrefixStore(f'bisenet/round{restart}/', store)
            torch.distributed.init_process_group(self.backend, store=store, rank=rank,
                                                 world_size=world_size)
        self.amp_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}[amp_dtype] if amp else None
        self.precision = amp_dtype if amp else 'fp32'
        # channels_last is unsupported on NPU; it pays at inference on CPU and CUDA, and in
        # training on CUDA only.
        self.train_format = torch.channels_last if device == 'cuda' else torch.contiguous_format
        self.inference_format = (torch.channels_last if device in ('cpu', 'cuda')
                                 else torch.contiguous_format)

    def autocast(self):
        """The precision context of forward passes: autocast when --amp, else fp32."""
        if self.amp_dtype is None:
            return torch.autocast(self.type, enabled=False)
        return torch.autocast(self.type, dtype=self.amp_dtype)

    def loss_scaling(self, loss_scale=-1.0):
        """How fp16 losses are scaled: 'off' (fp32, bf16), 'dynamic' (an overflow skips the step
        and halves the scale), or 'static' (NPU with a fixed --loss-scale: torch_npu's static
        scale checks nothing, so train.py checks the weights itself)."""
        if self.amp_dtype != torch.float16:
            return 'off'
        return 'static' if self.type == 'npu' and loss_scale > 0 else 'dynamic'

    def grad_scaler(self, loss_scale=-1.0):
        """The fp16 GradScaler (disabled in fp32 and bf16). -1: dynamic. A number: start there
        and never grow; halve on overflow (on NPU: a true static scale, as apex's was). On NPU
        the dynamic scale is torch.amp's where this torch has it (2.3 on) and the NPU computes
        with inf and NaN (910B on): it waits for the device once a step, torch_npu's own three
        times; 910A's saturation mode needs torch_npu's, which reads its overflow flags."""
        mode = self.loss_scaling(loss_scale)
        kwargs = {} if loss_scale <= 0 else dict(init_scale=loss_scale, growth_interval=2 ** 30)
        if mode == 'static':
            return torch.npu.amp.GradScaler(init_scale=loss_scale, dynamic=False)
        if self.npu_scaler():
            return torch.npu.amp.GradScaler(enabled=mode != 'off', **kwargs)
        if hasattr(torch.amp, 'GradScaler'):                           # torch >= 2.3
            return torch.amp.GradScaler(self.type, enabled=mode != 'off', **kwargs)
        return torch.cuda.amp.GradScaler(enabled=mode != 'off', **kwargs)

    def npu_scaler(self):
        """Whether the dynamic scale is torch_npu's GradScaler (grad_scaler)."""
        return self.type == 'npu' and not (hasattr(torch.amp, 'GradScaler')
                                           and not npu_saturates())

    def scale_of(self, scaler):
        """The dynamic loss scale as a device tensor, copied without a wait, or None where the
        scale is not dynamic: a step after which it is lower was skipped for an overflow."""
        scale = getattr(scaler, '_scale', None)     # torch's and torch_npu's: made at scale()
        return scale.detach().clone() if scaler.is_enabled() and scale is not None else None

    def training_notes(self, loss_scale=-1.0):
        """What a training run should say at its start about this device and precision: where
        its step waits for the device, and on 910A that a fixed loss scale cannot see
        overflows."""
        waits, mode = [], self.loss_scaling(loss_scale)
        if mode == 'dynamic' and self.npu_scaler():
            waits.append('three times a step in torch_npu\'s fp16 GradScaler (it reads the '
                         'overflow flag and its growth counter on the host)')
        elif mode == 'dynamic' and not (self.type == 'cuda' and fused_sgd_available()):
            waits.append('once a step in the fp16 GradScaler (it reads whether the gradients '
                         'overflowed, to skip the step)')
        if self.distributed and self.type != 'cpu':
            waits.append('once per SyncBatchNorm layer (torch\'s SyncBatchNorm with several '
                         'processes, pytorch/pytorch#78656; torch_npu\'s too)')
        notes = [f'note: the host waits for the device {"; and ".join(waits)}'] if waits else []
        if mode == 'static' and npu_saturates():
            notes.append('note: this NPU (910A) computes fp16 in saturation mode: an overflow '
                         'gives the largest finite value, not inf, so the fixed --loss-scale '
                         'cannot be checked; the dynamic scale (--loss-scale -1) reads the '
                         'overflow flags')
        return notes

    def load_grad_scaler(self, scaler, state, loss_scale=-1.0):
        """Continue a checkpoint's loss scale if it was saved in this run's mode; None if so,
        else the reason the scaler starts fresh (a resume in another precision or mode)."""
        saved = 'off' if not state else 'static' if state.get('dynamic') is False else 'dynamic'
        mode = self.loss_scaling(loss_scale)
        if saved == mode:
            if mode != 'off':       # torch_npu's scaler also wants its 'dynamic' flag
                scaler.load_state_dict(dict(state, dynamic=mode == 'dynamic'))
            return None
        return (f'the checkpoint\'s loss scaling was {saved}, this run\'s is {mode} '
                f'({self.precision}): starting with a fresh loss scale')

    def data_parallel(self, model):
        """`model` in DistributedDataParallel under torchrun (one device a process), else
        `model` itself."""
        if not self.distributed:
            return model
        device_ids = None if self.type == 'cpu' else [self.device.index]
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def sgd(self, parameters, **kwargs):
        """SGD (sgd()), fused into one kernel on CUDA where this torch has it (not 2.1-2.2):
        faster, and under a GradScaler it needs no host sync (the unfused step reads the
        overflow flag on the host). NPU has no fused kernel; CPU keeps the default."""
        return sgd(parameters, fused=self.type == 'cuda' and fused_sgd_available(), **kwargs)

    def loader_options(self):
        """DataLoader arguments: batches pinned on an accelerator, so that copies to it do not
        block (without pinning torch_npu even synchronises the stream at each copy), and
        workers in a process group of their own (init_worker). Before torch 2.8 the DataLoader
        pins for CUDA unless told the device; from 2.9 it pins for the current accelerator and
        warns that pin_memory_device is deprecated."""
        options = {'pin_memory': self.type != 'cpu', 'worker_init_fn': init_worker}
        if self.type == 'npu' and torch_version() < (2, 9):
            options['pin_memory_device'] = 'npu'
        return options

    def forbid_syncs(self, forbid=True):
        """CUDA: make any host-device sync an error while forbidden (torch's sync debug mode);
        elsewhere a no-op. train.py --sync-debug checks its step with it."""
        if self.type == 'cuda':
            torch.cuda.set_sync_debug_mode('error' if forbid else 'default')

    def sync_batchnorm(self, module):
        """`module` with SyncBatchNorm for its BatchNorms where several processes on
        accelerators share the statistics; unchanged in one process (torch_npu 2.1.0.post6 to
        post11's SyncBatchNorm fails there without a process group) and on CPU, where
        SyncBatchNorm has no kernel."""
        if self.type == 'cpu' or not self.distributed:
            return module
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)

    def shard(self, size):
        """This process's share of `size` items: every world_size-th, none twice."""
        return list(range(self.rank, size, self.world_size))

    def profiler(self, trace_dir, steps=5):
        """A profiler of `steps` steps (after one skipped and one of warm-up) whose trace lands
        in trace_dir: torch_npu's on NPU, which also records the NPU's kernels, else torch's
        (with CUDA's kernels on CUDA)."""
        module = torch.profiler
        activities = [module.ProfilerActivity.CPU]
        if self.type == 'npu':
            import torch_npu
            module = torch_npu.profiler
            activities = [module.ProfilerActivity.CPU, module.ProfilerActivity.NPU]
        elif self.type == 'cuda':
            activities.append(module.ProfilerActivity.CUDA)
        return module.profile(
            activities=activities,
            schedule=module.schedule(wait=1, warmup=1, active=steps, repeat=1),
            on_trace_ready=module.tensorboard_trace_handler(str(trace_dir)))

    def synchronize(self):
        if self.type != 'cpu':
            getattr(torch, self.type).synchronize()

    def peak_memory(self):
        """(name, GB) of this process's peak memory: on an accelerator the device's peak
        allocation ('memory_gb'), on CPU, where the tensors live in the process, its peak
        resident set size ('peak_rss_gb'; Linux counts it in KiB, macOS in bytes)."""
        if self.type != 'cpu':
            peak = getattr(torch, self.type).max_memory_allocated(self.device)
            return 'memory_gb', peak / 2 ** 30
        if resource is None:                        # Windows
            return 'peak_rss_gb', float('nan')
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return 'peak_rss_gb', peak * (1 if sys.platform == 'darwin' else 1024) / 2 ** 30

    def all_reduce(self, tensor):
        """Sum `tensor` over all processes, in place (a no-op in one process)."""
        if self.distributed:
            torch.distributed.all_reduce(tensor)
        return tensor

    def print0(self, *args, **kwargs):
        """print, on rank 0 only."""
        if self.rank == 0:
            print(*args, **kwargs, flush=True)

    def close(self, finished=True):
        """Leave the process group. finished: every rank got here without an error, so all of
        them can meet first (torch 2.1's gloo can hang destroying its group when a peer process
        has already exited); after an error only this rank is known to be here."""
        self.forbid_syncs(False)            # whatever the loop left on: teardown may sync
        if self.distributed and torch.distributed.is_initialized():
            if finished:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Self-check, data check and benchmarks
# ----------------------------------------------------------------------------------------------


def all_cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def time_alternately(runs, rounds, synchronize=None):
    """Seconds per call of each of `runs` (name -> function) in `rounds` rounds, the order
    reversed every other round so that a noisy machine slows them alike: {name: [s, ...]}.
    `synchronize` (a device's) runs before each clock reading."""
    times = {name: [] for name in runs}
    for round_ in range(rounds):
        for name in (list(runs) if round_ % 2 == 0 else list(runs)[::-1]):
            if synchronize:
                synchronize()
            start = time.perf_counter()
            runs[name]()
            if synchronize:
                synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def decode_files(sample):
    """A bare decode of a sample's image and label files: what benchmark_data compares the
    check with."""
    for path in sample[:2]:
        with Image.open(path) as image:
            image.load()


def benchmark_data(root, split='train', crop_size=(1024, 1024), count=20, cache_dir=None):
    """Per-image cost of a DataLoader worker (one thread) against a bare decode of the files;
    with cache_dir also the same worker reading a warm decoded-data cache, filled first; and
    the check of --check-data against a bare decode of the images and labels, on all cores."""
    torch.set_num_threads(1)
    transform = TrainTransform(crop_size, on_device=True)
    dataset = SegmentationDataset(root, split, transform)
    indices = [i % len(dataset) for i in range(count)]

    def per_image(work):
        work(0, indices[0])                                      # warm-up
        start = time.perf_counter()
        for position, i in enumerate(indices):
            work(position, i)
        return (time.perf_counter() - start) / count

    decode = per_image(lambda _, i: [Image.open(path).load() for path in dataset.samples[i][:2]])
    worker = per_image(lambda position, i: dataset[(i, (0, position))])
    print(f'{count} images of {root}/{split}, crop {crop_size[0]}x{crop_size[1]}, one thread')
    print(f'bare decode (image + label): {decode * 1e3:6.1f} ms per image')
    print(f'worker (read, decode, rescale, crop, flip, pad): {worker * 1e3:6.1f} ms per image '
          f'({worker / decode:.2f} x the decode)')
    if cache_dir is not None:
        cached = SegmentationDataset(root, split, transform, cache_dir)
        print(cached.cache_note)
        for i in sorted(set(indices)):                          # fill: decoded once, untimed
            cached.load(i)
        warm = per_image(lambda position, i: cached[(i, (0, position))])
        print(f'worker with a warm cache: {warm * 1e3:6.1f} ms per image ({warm / worker:.2f} x '
              f'the uncached worker, {warm / decode:.2f} x the decode)')
    samples = [dataset.samples[i] for i in indices]
    processes = all_cores()
    chunk = max(1, len(samples) // (4 * processes))
    with multiprocessing.get_context().Pool(processes) as pool:
        check = functools.partial(look_at, dataset.layout, decode=True)
        times = time_alternately({        # four rounds, the first a warm-up
            'bare decode': lambda: pool.map(decode_files, samples, chunksize=chunk),
            'check': lambda: pool.map(check, samples, chunksize=chunk)}, rounds=4)
    bare, check = (min(times[name][1:]) / len(samples) for name in times)
    print(f'the check of --check-data on {processes} processes: {check * 1e3:.2f} ms per image '
          f'and label against {bare * 1e3:.2f} ms for a bare decode of both ({check / bare:.2f} '
          f'x)')


def group_line(kind, group, layout):
    """One line for every label that holds the same stray value or colour (survey's groups):
    how many, their share of those labels' pixels, the first few, and what to do."""
    (what, value), labels = kind, group['labels']
    names = ', '.join(str(label) for label in labels[:3]) + (
        f' and {len(labels) - 3} more' if len(labels) > 3 else '')
    found = (f'the {what} {value} in {len(labels)} labels ({group["bad"] / group["pixels"]:.2%} '
             f'of their pixels: {names})')
    listing = layout.classes_file or layout.root / 'classes.txt'
    if what == 'value':
        return (f'{found}: if {value} marks pixels to ignore, add the line "ignore: void {value}" '
                f'to {listing}; else fix those labels, or list the classes they hold there')
    if listing.name == 'labelmap.txt':
        return f'{found}: add it to {listing} as "NAME:{value[0]},{value[1]},{value[2]}::"'
    return (f'{found}: add it to {listing} as a class, or as "ignore: NAME {value[0]} '
            f'{value[1]} {value[2]}"')


def check_data(root, splits=('train', 'val'), processes=None):
    """python bisenet.py --check-data ROOT: every image and label of every split decoded and
    looked at, on all cores. Prints per split the images, their sizes, each class's share of
    the pixels and every problem; returns the number of problems."""
    layout = Layout(root)
    processes = processes or all_cores()
    source = (f'from {layout.classes_file}' if layout.classes_file
              else f'(the {layout.name} layout)')
    print(f'{root}: {len(layout.classes)} classes {source}')
    total, start, looked = 0, time.perf_counter(), 0
    for split in splits:
        try:
            samples, _, problems = layout.find(split)
        except DatasetError as e:
            print(f'{split}: problem: {e}')
            total += 1
            continue
        found = survey(layout, split, samples, processes=processes, decode=True)
        looked += found['looked']
        total += len(problems) + len(found['problems'])
        problems += found['ungrouped']
        sizes, pixels = found['sizes'], found['pixels']
        line = f'{split}: {len(samples)} images'
        if sizes:
            (w_min, h_min), (w_max, h_max) = np.min(sizes, 0), np.max(sizes, 0)
            line += f', {w_min}x{h_min} to {w_max}x{h_max} pixels'
        print(line)
        share = pixels / max(pixels.sum(), 1)
        rows = [(name, share[train_id]) for train_id, name in enumerate(layout.classes)]
        rows.append(('(ignored)', share[IGNORE_INDEX]))
        rows += [(f'value {value}: no class', group['bad'] / max(pixels.sum(), 1))
                 for (kind, value), group in found['groups'].items() if kind == 'value']
        width = max(len(name) for name, _ in rows) + 2
        print(f'  {"class":<{width}}share of pixels')
        for name, value in rows:
            print(f'  {name:<{width}}{100 * value:6.2f}%')
        for kind, group in found['groups'].items():     # one line for each stray value
            line = group['first'] if len(group['labels']) == 1 else group_line(kind, group, layout)
            print(f'  problem: {line}')
        for problem in problems:
            print(f'  problem: {problem}')
        for warning in found['warnings']:
            print(f'  warning: {warning}')
    elapsed = time.perf_counter() - start
    print(f'looked at {looked} images and labels in {elapsed:.1f} s on {processes} processes: '
          + (f'{total} problems' if total else 'no problems'))
    return total


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
              f'auxiliary heads); input {tuple(x.shape)} -> train {train_shapes}, eval {eval_shape}')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='BiSeNetV1 self-check, data check and benchmark')
    parser.add_argument('--check-data', metavar='ROOT', help='look at every label of a data set '
                        'folder (Cityscapes or your own) and name every problem')
    parser.add_argument('--splits', nargs='+', default=['train', 'val'],
                        help='with --check-data: the splits to look at')
    parser.add_argument('--bench-data', metavar='ROOT', help='time the training data pipeline '
                        'on a data set folder (e.g. data/cityscapes)')
    parser.add_argument('--crop-size', type=int, nargs='+', default=[1024], metavar='S',
                        help='training crop: S (S x S) or H W')
    parser.add_argument('--count', type=int, default=20, help='images to time')
    parser.add_argument('--cache-dir', help='also time a worker reading a warm decoded-data '
                        'cache in this folder (filled first)')
    args = parser.parse_args()
    try:
        if args.check_data:
            raise SystemExit(1 if check_data(args.check_data, args.splits) else 0)
        if args.bench_data:
            benchmark_data(args.bench_data, crop_size=parse_crop_size(args.crop_size),
                           count=args.count, cache_dir=args.cache_dir)
        else:
            self_check()
    except (DatasetError, SetupError) as e:
        raise SystemExit(f'error: {e}')
