"""Evaluate a BiSeNetV1 checkpoint on Cityscapes or a data set of your own with the reference's
metric, segment your own images and videos with it, or export it to ONNX (fp32 or int8) and
run the exported file the same ways.

Works with this project's checkpoints and mmsegmentation's published ones; the backbone, the
class count and the class names and colours are read from the checkpoint (Cityscapes' where a
19-class checkpoint names none).

    python eval.py --ckpt output/best.pth --data-path data/cityscapes            # val, whole image
    python eval.py --ckpt CKPT --data-path ROOT --aug-test                       # ms + flip
    python eval.py --ckpt CKPT --data-path ROOT --out-dir results --show-dir vis --json m.json
    torchrun --nproc_per_node=8 eval.py --ckpt CKPT --data-path ROOT             # 8 devices
    python eval.py --ckpt CKPT --images photos/ street.jpg 'more/*.png'          # your images
    python eval.py --ckpt CKPT --video drive.mp4 clips/                          # videos (PyAV)
    python eval.py --ckpt CKPT --export-onnx bisenet.onnx                        # deployment
    python eval.py --ckpt CKPT --export-onnx int8.onnx --int8 --data-path ROOT   # int8, calibrated
    python eval.py --onnx int8.onnx --data-path ROOT        # the exported file in --ckpt's place
    python eval.py --benchmark [--device cuda --amp]       # inference FPS at 1024 x 2048
    python eval.py --benchmark --device cpu --amp --amp-dtype bf16               # CPU bf16

--out-dir writes one PNG per image: for Cityscapes its labelIds (CITY/NAME_leftImg8bit.png),
the format cityscapesscripts' evaluation and the benchmark server accept; for other classes a
palette PNG of train ids in the classes' colours (NAME.png). --show-dir writes pictures: the
image, the prediction and the ground truth side by side, captioned (own images: the prediction
over the image), with a legend of the classes present; for videos an overlay video NAME.mp4,
and the label maps as NAME/FRAME.png. train.py validates with evaluate() below.
"""
import argparse
import collections
import concurrent.futures
import contextlib
import copy
import fractions
import glob
import inspect
import json
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from pathlib import Path

import bisenet  # first: it checks that this torch can run next to this NumPy before torch loads
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

AUG_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)     # the reference's multi-scale test
CALIBRATION_IMAGES = 32                             # --int8's default: a few dozen suffice
SLIDE_WINDOW, SLIDE_STRIDE = (1024, 1024), (768, 768)
DEFAULT_DATA_PATH = 'data/cityscapes'


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--ckpt', help='checkpoint: ours (train.py) or mmsegmentation\'s')
    parser.add_argument('--data-path', '--data_path',
                        help='Cityscapes root (leftImg8bit/, gtFine/) or your own data set '
                             f'(classes.txt, images/, labels/); default {DEFAULT_DATA_PATH}')
    parser.add_argument('--images', nargs='+', metavar='PATH', help='segment these PNG/JPEG '
                        'files, folders (recursively) or globs instead; no labels needed')
    parser.add_argument('--video', nargs='+', metavar='PATH', help='segment these video files '
                        '(mp4, mkv, mov, avi, webm, ...; folders and globs too) frame by frame; '
                        'needs PyAV (pip install av)')
    parser.add_argument('--scale', type=int, nargs=2, metavar=('W', 'H'), help='with --images, '
                        '--video or --int8 --calibrate: rescale to fit W x H, keeping the aspect '
                        'ratio (default the reference\'s 2048 1024; smaller is faster)')
    parser.add_argument('--onnx', metavar='FILE', help='an exported ONNX file in place of '
                        '--ckpt: evaluation, --images, --video and --benchmark run it with '
                        'onnxruntime on the CPU')
    parser.add_argument('--export-onnx', metavar='FILE', help='write the inference fast path as '
                        'ONNX (uint8 RGB in, label map out) and check it with onnxruntime')
    parser.add_argument('--onnx-logits', action='store_true',
                        help='with --export-onnx: also output the logits')
    parser.add_argument('--int8', action='store_true', help='with --export-onnx: static int8 '
                        '(QDQ, per-channel weights), calibrated on images')
    parser.add_argument('--calibrate', metavar='DIR', help='with --int8: calibrate on images '
                        'here (a folder or glob); default the train split of --data-path')
    parser.add_argument('--calibrate-count', type=int, metavar='N', help='with --int8: how many '
                        f'images to calibrate on (default {CALIBRATION_IMAGES})')
    parser.add_argument('--threads', type=int, help='CPU threads of PyTorch and onnxruntime '
                        '(default all cores)')
    parser.add_argument('--split', default='val')
    parser.add_argument('--mode', choices=('whole', 'slide'), default='whole',
                        help='whole image (the reference) or sliding 1024 x 1024 windows')
    parser.add_argument('--aug-test', action='store_true',
                        help='multi-scale (0.5-1.75) + flip test, softmax averaged')
    parser.add_argument('--out-dir', help='write label PNGs here (Cityscapes: labelIds; '
                        'other classes: palette PNGs of train ids)')
    parser.add_argument('--show-dir', help='write colour pictures of the predictions here')
    parser.add_argument('--json', help='write {"mIoU", "mAcc", "aAcc", "per_class": IoU by '
                        'class name, "per_class_acc": Acc by class name} here')
    parser.add_argument('--device', choices=('auto', 'npu', 'cuda', 'cpu'), default='auto')
    parser.add_argument('--device_list', help='Ascend scripts\' device ids, e.g. 0,1,2,3')
    parser.add_argument('--amp', action='store_true', help='autocast (NPU/CUDA only)')
    parser.add_argument('--amp-dtype', choices=('fp16', 'bf16'), default='fp16')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the fast path (compiles per input size first)')
    parser.add_argument('--workers', type=int, default=4, help='data loading processes')
    parser.add_argument('--cache-dir', help='read images through a decoded-data cache here '
                        '(train.py --cache-dir); filled on first use')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='load a checkpoint that holds pickled objects (runs its code)')
    parser.add_argument('--prof_test', action='store_true',
                        help='profile inference of a few images; trace into --prof-dir')
    parser.add_argument('--prof-dir', default='output/prof_test')
    parser.add_argument('--benchmark', action='store_true',
                        help='time inference at 1024 x 2048 on random input; no data needed')
    parser.add_argument('--backbone', choices=('resnet18', 'resnet50'), default='resnet18',
                        help='model for --benchmark without --ckpt')
    parser.add_argument('--batch-size', type=int, default=1,
                        help='with --benchmark: images per forward pass')
    return parser


# ----------------------------------------------------------------------------------------------
# The metric: per-class areas over the whole data set, as the reference accumulates them
# ----------------------------------------------------------------------------------------------


def confusion(pred, label, num_classes, ignore_index=bisenet.IGNORE_INDEX):
    """(num_classes, num_classes) counts of (label, pred) pairs; ignored pixels dropped.
    Static shapes, and counts added into a tensor of a fixed size (bincount would read the
    largest index on the host): the host never waits for the device here."""
    valid = label != ignore_index
    index = torch.where(valid, label * num_classes + pred, torch.full_like(label, num_classes ** 2))
    index = index.flatten().long()
    counts = torch.zeros(num_classes ** 2 + 1, dtype=torch.int64, device=index.device)
    counts.index_add_(0, index, torch.ones_like(index))
    return counts[:num_classes ** 2].view(num_classes, num_classes)


def summarize(confusion_matrix):
    """mIoU, mAcc, aAcc (percent) and per-class IoU and Acc from summed counts: IoU_c =
    intersection / union over the data set; classes absent from labels and predictions are
    skipped in the means (NaN), as the reference does."""
    cm = confusion_matrix.double()
    intersection, label_area, pred_area = cm.diag(), cm.sum(1), cm.sum(0)
    union = label_area + pred_area - intersection
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.tensor(float('nan')))
    acc = torch.where(label_area > 0, intersection / label_area.clamp(min=1),
                      torch.tensor(float('nan')))
    return {'mIoU': 100 * iou.nanmean().item(), 'mAcc': 100 * acc.nanmean().item(),
            'aAcc': 100 * (intersection.sum() / label_area.sum().clamp(min=1)).item(),
            'IoU': (100 * iou).tolist(), 'Acc': (100 * acc).tolist(),
            'pixels': int(label_area.sum())}


def metrics_record(metrics, class_names):
    """The metrics as plain JSON data, each class's IoU and Acc under its name (null for a
    class absent from labels and predictions): what eval.py --json and train.py's
    metrics.jsonl write."""
    def named(values):
        return {name: None if np.isnan(v) else v for name, v in zip(class_names, values)}
    return {'mIoU': metrics['mIoU'], 'mAcc': metrics['mAcc'], 'aAcc': metrics['aAcc'],
            'per_class': named(metrics['IoU']), 'per_class_acc': named(metrics['Acc'])}


def format_table(metrics, class_names):
    width = max([15] + [len(name) + 2 for name in class_names])
    lines = [f'{"class":<{width}}{"IoU":>8}{"Acc":>8}']
    for name, iou, acc in zip(class_names, metrics['IoU'], metrics['Acc']):
        lines.append(f'{name:<{width}}{iou:8.2f}{acc:8.2f}')
    lines.append(f'mIoU {metrics["mIoU"]:.2f}  mAcc {metrics["mAcc"]:.2f}  '
                 f'aAcc {metrics["aAcc"]:.2f}')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# Inference: whole image, sliding window, multi-scale + flip
# ----------------------------------------------------------------------------------------------


def slide_logits(model, image, num_classes):
    """Average the logits of overlapping 1024 x 1024 windows (stride 768), as the reference."""
    _, _, h, w = image.shape
    (window_h, window_w), (stride_h, stride_w) = SLIDE_WINDOW, SLIDE_STRIDE
    logits = image.new_zeros((1, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for y in range(0, max(h - window_h + stride_h - 1, 0) // stride_h + 1):
        for x in range(0, max(w - window_w + stride_w - 1, 0) // stride_w + 1):
            y2, x2 = min(y * stride_h + window_h, h), min(x * stride_w + window_w, w)
            y1, x1 = max(y2 - window_h, 0), max(x2 - window_w, 0)
            logits[:, :, y1:y2, x1:x2] += model(image[:, :, y1:y2, x1:x2]).float()
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def predict(model, image, num_classes, mode='whole', aug_test=False):
    """Scores (1, C, H, W) of a normalised image (1, 3, H, W): logits, or with aug_test the
    mean softmax over the six scales, each also flipped."""
    def infer(x):
        return slide_logits(model, x, num_classes) if mode == 'slide' else model(x).float()
    if not aug_test:
        return infer(image)
    h, w = image.shape[2:]
    scores = 0
    for ratio in AUG_RATIOS:
        scaled = F.interpolate(image, size=(int(h * ratio + 0.5), int(w * ratio + 0.5)),
                               mode='bilinear', align_corners=False)
        for flip in (False, True):
            x = scaled.flip(3) if flip else scaled
            logits = infer(x)
            logits = logits.flip(3) if flip else logits
            logits = F.interpolate(logits, size=(h, w), mode='bilinear', align_corners=False)
            scores = scores + logits.softmax(1)
    return scores / (2 * len(AUG_RATIOS))


def prepare_for_inference(model, runtime, compile_model=False):
    """The inference fast path, as a new model (`model` itself is left as it is): BatchNorm
    folded into the convs, channels_last where it pays (CPU and CUDA; unsupported on NPU), and
    with compile_model torch.compile on top. Same outputs as the plain model (tested)."""
    model = bisenet.fold_batchnorm(copy.deepcopy(model).eval())
    model = model.to(runtime.device, memory_format=runtime.inference_format)
    if compile_model:
        if runtime.type == 'npu':
            raise bisenet.SetupError('--compile is not supported on NPU: drop it')
        if runtime.type == 'cpu' and not any(shutil.which(c) for c in ('g++', 'clang++', 'c++')):
            raise bisenet.SetupError('--compile on CPU needs a C++ compiler (g++ or clang++): '
                                     'install one or drop --compile')
        try:
            model = torch.compile(model)
        except RuntimeError as e:               # e.g. a Python that this torch's Dynamo lacks
            raise bisenet.SetupError(f'--compile is not available here ({e}): drop it') from e
    return model


# ----------------------------------------------------------------------------------------------
# Outputs: progress, label maps and pictures
# ----------------------------------------------------------------------------------------------


class Progress:
    """'[what] done/total images, N images/s, s elapsed, ETA s' every 10 s and at the end of a
    shard (runtime: the processes that share the items; None: this one alone). The latest one
    made is what an interruption reports (interrupted)."""
    latest = None

    def __init__(self, what, total, runtime, log, unit='images'):
        self.what, self.total, self.log, self.unit = what, total, log, unit
        self.world_size = runtime.world_size if runtime else 1
        self.start, self.last, self.done = time.time(), 0.0, 0
        Progress.latest = self

    def step(self, step, steps):
        """After step `step` (0-based) of this process's `steps` (0: not known)."""
        self.done = min((step + 1) * self.world_size, self.total or float('inf'))
        if time.time() - self.last > 10 or step + 1 == steps:
            elapsed = time.time() - self.start
            eta = f'{elapsed / (step + 1) * max(steps - step - 1, 0):.0f} s' if steps else '?'
            self.log(f'{self.what} {self.done}/{self.total or "?"} {self.unit}, '
                     f'{self.done / max(elapsed, 1e-9):.2f} {self.unit}/s, {elapsed:.0f} s '
                     f'elapsed, ETA {eta}')
            self.last = time.time()


def interrupted():
    """The line of a run that Ctrl-C ended: how far it got."""
    progress = Progress.latest
    where = f' after {progress.done} of {progress.total or "?"} {progress.unit} ' \
            f'({progress.what.strip("[]")})' if progress else ''
    return (f'error: interrupted (Ctrl-C){where}; every file written is complete, none is '
            f'left half written')


def colourize(train_ids, palette):
    """Train ids (H, W) in the classes' colours, uint8 (H, W, 3); ignored and unknown ids
    black. Pillow's palette lookup: four times numpy's indexing, for a video's every frame."""
    ids = Image.fromarray(np.asarray(train_ids, np.uint8), 'P')
    ids.putpalette([v for colour in palette for v in colour])
    return np.asarray(ids.convert('RGB'))


def legend_font(size):
    """Pillow's own font at `size` pixels (Pillow >= 10.1 scales it; older ones have one size)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def text_width(text, font):
    return ImageDraw.Draw(Image.new('RGB', (1, 1))).textbbox((0, 0), text, font=font)[2]


def legend(train_ids, classes, palette, width, size):
    """The classes `train_ids` (255: ignored) as swatches of their colours with their names, in
    rows wrapped to `width` (wider where one name needs it), in a font of `size` pixels: a white
    PIL image, what pictures show below the panels and videos over the frame's bottom."""
    font, pad, line = legend_font(size), size // 2, size + size // 2
    entries = [(tuple(palette[i]) if i < len(palette) else (0, 0, 0),
                classes[i] if i < len(classes) else 'ignored' if i == 255 else str(i))
               for i in train_ids]
    widths = [size + pad + text_width(name, font) + 2 * pad for _, name in entries]
    width = max([width] + [w + pad for w in widths])
    rows, x = 1 if entries else 0, pad
    for w in widths:
        if x + w > width and x > pad:
            rows, x = rows + 1, pad
        x += w
    key = Image.new('RGB', (width, rows * line + pad), 'white')
    draw = ImageDraw.Draw(key)
    x, y = pad, pad // 2
    for (colour, name), w in zip(entries, widths):
        if x + w > width and x > pad:
            x, y = pad, y + line
        draw.rectangle([x, y, x + size, y + size], fill=colour, outline='black')
        draw.text((x + size + pad, y), name, fill='black', font=font)
        x += w
    return key


def picture(panels, captions, train_ids, classes, palette):
    """Panels (uint8 (H, W, 3)) side by side, a caption above each, and below them the legend
    of the classes `train_ids`, sized to the panels."""
    height, width = panels[0].shape[0], sum(p.shape[1] for p in panels)
    size = max(11, height // 40)
    font, pad, line = legend_font(size), size // 2, size + size // 2
    last_caption = width - panels[-1].shape[1] + text_width(captions[-1], font) + 2 * pad
    key = legend(train_ids, classes, palette, max(width, last_caption), size)
    canvas = Image.new('RGB', (key.width, line + height + key.height), 'white')
    draw = ImageDraw.Draw(canvas)
    x = 0
    for panel, caption in zip(panels, captions):
        canvas.paste(Image.fromarray(panel), (x, line))
        draw.text((x + pad, pad // 2), caption, fill='black', font=font)
        x += panel.shape[1]
    canvas.paste(key, (0, line + height))
    return canvas


def blend(rgb, train_ids, palette):
    """The classes' colours over an image (uint8 (H, W, 3)) at half strength: (a + b) // 2,
    in uint8 without overflow."""
    colours = colourize(train_ids, palette)
    return (rgb >> 1) + (colours >> 1) + (rgb & colours & 1)


def overlay(pred, image, classes, palette, legends=None):
    """A video frame: the prediction over the image (uint8 (3, H, W)), and over its bottom the
    legend of the classes present, where that takes at most a third of the frame. `legends`
    keeps the legends drawn, by the classes they show (frames mostly show the same ones)."""
    frame = Image.fromarray(blend(image.permute(1, 2, 0).numpy(), pred, palette))
    present = tuple(np.flatnonzero(np.bincount(pred.ravel(), minlength=256)))
    legends = {} if legends is None else legends
    if present not in legends:
        legends[present] = legend(present, classes, palette, frame.width,
                                  max(11, frame.height // 40))
    key = legends[present]
    if key.height <= frame.height // 3:
        frame.paste(key.crop((0, 0, frame.width, key.height)), (0, frame.height - key.height))
    return frame


def prediction_picture(pred, image, classes, palette, label=None):
    """What --show-dir writes (and train.py --tensorboard shows): image | prediction | ground
    truth, or without a label the prediction over the image; captioned, with a legend."""
    rgb = image.permute(1, 2, 0).cpu().numpy()
    present = np.bincount(pred.ravel(), minlength=256)
    if label is None:
        panels = [blend(rgb, pred, palette)]
        captions = ['prediction']
    else:
        panels = [rgb, colourize(pred, palette), colourize(label, palette)]
        captions = ['image', 'prediction', 'ground truth']
        present = present + np.bincount(label.ravel(), minlength=256)
    return picture(panels, captions, np.flatnonzero(present[:256]), classes, palette)


def save_prediction(pred, image, out_name, show_name, out_dir, show_dir, classes, palette,
                    label=None, label_ids=None):
    """The label map OUT_DIR/out_name, and/or a picture SHOW_DIR/show_name: the image, the
    prediction and the ground truth side by side when a label is given, else the prediction
    over the image; captioned, with a legend of the classes present. The label map is a
    palette PNG of train ids in the classes' colours, or with label_ids (Cityscapes' labelIds,
    what its evaluation scripts read) those ids. pred, label: (H, W) train ids; image uint8
    (3, H, W)."""
    if out_dir:
        if label_ids is not None:
            label_map = Image.fromarray(bisenet.lookup_table(label_ids)[pred])
        else:
            label_map = Image.fromarray(pred.astype(np.uint8))
            label_map.putpalette([v for colour in palette for v in colour])
        bisenet.save_bytes(Path(out_dir) / out_name, bisenet.image_bytes(label_map))
    if show_dir:
        picture = prediction_picture(pred, image, classes, palette, label)
        bisenet.save_bytes(Path(show_dir) / show_name, bisenet.image_bytes(picture))


# ----------------------------------------------------------------------------------------------
# Evaluation on a data set
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, dataset, runtime, mode='whole', aug_test=False, out_dir=None,
             show_dir=None, workers=4, log=print, profiler=None, limit=None, keep_pictures=()):
    """Run `model` over `dataset` (a SegmentationDataset of EvalTransform(on_device=True)
    items; its first `limit` images, if given) in this process's shard and return the metrics
    of the counts summed over all processes. Outputs are named and coloured by the dataset.
    metrics['pictures'] holds the prediction_picture of each image of `keep_pictures` (dataset
    indices) in this process's shard, by name."""
    was_training = model.training
    model.eval()
    num_classes = model.num_classes
    size = len(dataset) if limit is None else min(limit, len(dataset))
    loader = torch.utils.data.DataLoader(
        Readable(dataset), batch_size=None, sampler=runtime.shard(size), num_workers=workers,
        **runtime.loader_options())
    label_ids = bisenet.cityscapes_label_ids(dataset.classes)
    total = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=runtime.device)
    progress, pictures, skipped = Progress('[eval]', size, runtime, log), {}, []
    for step, (index, (item, problem)) in enumerate(zip(loader.sampler, loader)):
        if problem is not None:                 # named, and left out of the metric
            print(f'skipped {problem}', file=sys.stderr, flush=True)
            skipped.append(problem)
            progress.step(step, len(loader))
            continue
        image = item[0][None].to(runtime.device, non_blocking=True)
        label = item[1][None].to(runtime.device, non_blocking=True).long()
        x = bisenet.normalize(image).contiguous(memory_format=runtime.inference_format)
        with runtime.autocast():
            scores = predict(model, x, num_classes, mode, aug_test)
        pred = scores.argmax(1)
        total += confusion(pred, label, num_classes)
        keep = index in keep_pictures
        if out_dir or show_dir or keep:
            name = dataset.name(index)
            pred_ids, truth = pred[0].cpu().numpy(), label[0].cpu().numpy()
            save_prediction(pred_ids, image[0],
                            f'{name}_leftImg8bit.png' if label_ids else f'{name}.png',
                            f'{name}.png', out_dir, show_dir, dataset.classes, dataset.palette,
                            truth, label_ids)
            if keep:
                pictures[name] = prediction_picture(pred_ids, image[0], dataset.classes,
                                                    dataset.palette, truth)
        if profiler is not None:
            profiler.step()
        progress.step(step, len(loader))
    runtime.all_reduce(total)
    model.train(was_training)
    return dict(summarize(total.cpu()), pictures=pictures, skipped=skipped)


class Readable(torch.utils.data.Dataset):
    """The items of a data set as (item, None), or (None, why) for one whose files cannot be
    read (a truncated image, say): evaluate() names and skips it, rather than losing the run
    that validates with it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index], None
        except bisenet.DatasetError as e:
            return None, bisenet.one_line(e)


# ----------------------------------------------------------------------------------------------
# Your own images: the reference's test pipeline on any PNG or JPEG
# ----------------------------------------------------------------------------------------------

TEST_SCALE = (2048, 1024)            # the reference's test Resize: fit, keeping the aspect ratio


def fit_size(width, height, scale=TEST_SCALE):
    """(w, h) of an image rescaled to fit `scale` keeping its aspect ratio, as mmcv's
    rescale_size does: the long side to at most max(scale), the short one to min(scale)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def find_images(patterns, flag='--images', suffixes=bisenet.IMAGE_SUFFIXES, kind='PNG or JPEG'):
    """Files, folders (searched recursively for files with `suffixes`) and globs -> sorted
    unique paths; also what --video finds its videos with."""
    found = set()
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = [p for p in bisenet.files_below(path) if p.suffix.lower() in suffixes]
        elif path.is_file():
            matches = [path]                        # named explicitly: tried whatever it is
        else:
            matches = [Path(p) for p in glob.glob(pattern, recursive=True)
                       if Path(p).suffix.lower() in suffixes]
        matches = [p.resolve() for p in matches if p.is_file()]
        if not matches:
            raise bisenet.SetupError(f'{flag} {pattern}: no {kind} file there')
        found.update(matches)
    return sorted(found)


def output_names(paths, suffix='.png'):
    """A collision-free relative output name for each input: its path below the inputs' common
    folder, with `suffix` for the file it becomes (photo.jpg -> photo.jpg.png, a.png -> a.png;
    for videos clip.mp4 -> clip.mp4, clip.mkv -> clip.mkv.mp4)."""
    root = Path(os.path.commonpath([p.parent for p in paths]))
    names = []
    for path in paths:
        name = path.relative_to(root).as_posix()
        names.append(name if path.suffix.lower() == suffix else name + suffix)
    return names


def rescaled(image, scale=TEST_SCALE):
    """An RGB PIL image as the reference's test pipeline feeds it to the model: (image uint8
    (3, H, W), the image rescaled to fit `scale` keeping its aspect ratio with cv2's bilinear,
    uint8 (3, h, w))."""
    size = fit_size(*image.size, scale)
    small = bisenet.rescale_crop(image, image.size, size, (0, 0) + size, Image.BILINEAR)
    return bisenet.pixels(image).permute(2, 0, 1), bisenet.pixels(small).permute(2, 0, 1)


class ImageFiles(torch.utils.data.Dataset):
    """Images for inference, as the reference's test pipeline reads them: RGB (EXIF orientation
    applied; greyscale, palette and RGBA converted), then rescaled(). An item is (image, the
    rescaled image, None), or (None, None, the reason) for a file that cannot be read."""

    def __init__(self, paths, scale=TEST_SCALE):
        self.paths, self.scale = paths, scale

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            image, _ = bisenet.open_image(self.paths[index])
        except bisenet.IMAGE_ERRORS as e:
            return None, None, bisenet.one_line(e)
        return rescaled(image, self.scale) + (None,)


def segment(model, image, small, runtime, mode='whole', aug_test=False):
    """The label map (train ids, uint8 (H, W) on the CPU) of an image (uint8 (3, H, W)) from
    its rescaled copy `small`: the scores go back to the image's own size (bilinear) before the
    argmax, as the reference predicts."""
    x = bisenet.normalize(small[None].to(runtime.device, non_blocking=True))
    with runtime.autocast():
        scores = predict(model, x.contiguous(memory_format=runtime.inference_format),
                         model.num_classes, mode, aug_test)
    scores = F.interpolate(scores, size=image.shape[1:], mode='bilinear', align_corners=False)
    return scores.argmax(1)[0].to(torch.uint8).cpu().numpy()


@torch.no_grad()
def segment_images(model, paths, runtime, mode='whole', aug_test=False, out_dir=None,
                   show_dir=None, workers=4, log=print, scale=TEST_SCALE):
    """Segment image files in this process's shard (segment()). Writes label PNGs and/or
    pictures; returns the files that could not be read."""
    dataset, names = ImageFiles(paths, scale), output_names(paths)
    label_ids = bisenet.cityscapes_label_ids(model.classes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         sampler=runtime.shard(len(dataset)),
                                         worker_init_fn=bisenet.init_worker)
    progress, failed = Progress('[images]', len(dataset), runtime, log), []
    for step, (index, (image, small, error)) in enumerate(zip(loader.sampler, loader)):
        if error is None:
            pred = segment(model, image, small, runtime, mode, aug_test)
            save_prediction(pred, image, names[index], names[index], out_dir, show_dir,
                            model.classes, model.palette, label_ids=label_ids)
        else:
            print(f'skipped {paths[index]}: cannot read it ({error})', file=sys.stderr, flush=True)
            failed.append(paths[index])
        progress.step(step, len(loader))
    return failed


# ----------------------------------------------------------------------------------------------
# Video: every frame through segment(), decoded and encoded in threads of their own
# ----------------------------------------------------------------------------------------------

VIDEO_SUFFIXES = ('.mp4', '.mkv', '.mov', '.avi', '.webm', '.m4v', '.mpg', '.mpeg', '.ts',
                  '.flv', '.wmv', '.3gp')
MP4_AUDIO = ('aac', 'mp3', 'ac3', 'eac3', 'opus', 'alac', 'flac')    # what MP4 holds as it is
STAGES = ('decoding', 'the model', 'drawing and encoding')        # each in a thread of its own


def import_av():
    """PyAV, FFmpeg's libraries in a wheel: an optional extra, asked for by --video alone."""
    try:
        import av
    except ImportError:
        raise bisenet.SetupError('--video needs PyAV (FFmpeg for Python): pip install av') \
            from None
    return av


def read_ahead(items, depth=8, clock=None):
    """The items of the iterator `items`, made by a thread of its own up to `depth` ahead, so
    that decoding overlaps inference (FFmpeg and Pillow release the GIL); an error raised
    there is raised here, after the items before it. The seconds spent making them add up in
    clock[0]."""
    ahead, stop, end = queue.Queue(depth), threading.Event(), object()
    clock = clock if clock is not None else [0.0]

    def offer(item):                    # False once the consumer has stopped taking items
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            made, start = iter(items), time.perf_counter()
            for item in made:
                clock[0] += time.perf_counter() - start
                if not offer(item):
                    return
                start = time.perf_counter()
            clock[0] += time.perf_counter() - start
            offer(end)
        except BaseException as e:      # handed to the consumer, which raises it
            offer(e)
    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = ahead.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def decoded_frames(av, container, video, audio, scale):
    """What a video file holds, in order: for each frame (its pts, the frame as an image
    uint8 (3, H, W) and rescaled to fit `scale`, as rescaled() does for --images), and the
    audio packets to copy. A file that breaks off raises av's error after its last frame."""
    streams = [video] + ([audio] if audio is not None else [])
    for packet in container.demux(*streams):
        if packet.stream.type == 'audio':
            if packet.dts is not None:              # not the demuxer's empty flush packet
                yield packet
            continue
        for frame in packet.decode():
            yield (frame.pts,) + rescaled(frame.to_image(), scale)


class VideoOutputs:
    """What --video writes of one file: the prediction over each frame as DIR/NAME.mp4 (H.264
    at the input's size and frame timing, the legend at its bottom, the audio copied), written
    to a temporary file and renamed at the end; and/or each frame's label map as
    OUT_DIR/NAME/FRAME.png, the PNGs --images writes."""

    def __init__(self, av, video, audio, name, out_dir, show_dir, classes, palette, log):
        self.av, self.name, self.out_dir = av, name, out_dir
        self.classes, self.palette = classes, palette
        self.label_ids = bisenet.cityscapes_label_ids(classes)
        self.path = self.container = self.audio = None
        self.legends = {}
        if not show_dir:
            return
        self.path = Path(show_dir) / f'{name}.mp4'
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + '.tmp')
        self.container = av.open(str(self.tmp), 'w', format='mp4')
        rate = fractions.Fraction(video.average_rate or video.guessed_rate or 25)
        self.stream = self.container.add_stream('libx264', rate=rate)
        width, height = video.codec_context.width, video.codec_context.height
        self.stream.width, self.stream.height = width, height
        # H.264 in 4:2:0 (what every player plays) needs even sizes; 4:4:4 takes any.
        self.stream.pix_fmt = 'yuv420p' if width % 2 == 0 and height % 2 == 0 else 'yuv444p'
        # A clock of at least 90 kHz with a whole number of ticks a frame: it holds the
        # input's frame rate exactly, and the times of a variable-rate input closely.
        ticks = rate.numerator * -(-90000 // rate.numerator)
        self.time_base = fractions.Fraction(1, ticks)
        self.stream.time_base = self.stream.codec_context.time_base = self.time_base
        self.input_time_base, self.frame_time, self.start = video.time_base, 1 / rate, None
        self.stream.options = {'crf': '18', 'preset': 'veryfast'}
        if audio is not None and audio.codec_context.name in MP4_AUDIO:
            template = getattr(self.container, 'add_stream_from_template', None)
            self.audio = template(audio) if template else self.container.add_stream(
                template=audio)
        elif audio is not None:
            log(f'{name}: its audio ({audio.codec_context.name}) is not copied: MP4 does not '
                f'hold that codec')

    def frame(self, index, pts, pred, image):
        """Write frame `index` (pts in the input's time base) and its label map `pred`."""
        if self.out_dir:
            save_prediction(pred, image, f'{self.name}/{index:06d}.png', None, self.out_dir,
                            None, self.classes, self.palette, label_ids=self.label_ids)
        if self.container is not None:
            frame = self.av.VideoFrame.from_image(overlay(pred, image, self.classes,
                                                          self.palette, self.legends))
            frame.pts, frame.time_base = self.timestamp(index, pts), self.time_base
            self.mux(self.stream.encode(frame))

    def timestamp(self, index, pts):
        """Frame `index`'s time on the output clock: the first frame's plus `index` frames at
        the input's rate, where the input's own time for it (pts) is that to the input's
        precision, so that a constant rate stays exactly the input's; else the input's time
        (a variable rate)."""
        steady = index * self.frame_time
        if pts is not None and self.input_time_base:
            shown = pts * self.input_time_base
            self.start = shown if self.start is None else self.start
            steady += self.start
            if abs(shown - steady) > self.input_time_base:     # a variable frame rate
                steady = shown
        return round(steady / self.time_base)

    def copy_audio(self, packet):
        if self.audio is not None:
            packet.stream = self.audio
            self.mux([packet])

    def mux(self, packets):
        """Write packets into the video; a write that fails (a full disk) is OutputError."""
        try:
            for packet in packets:
                self.container.mux(packet)
        except OSError as e:                             # PyAV's own OSError is one too
            raise bisenet.OutputError(bisenet.write_failure(self.path, e)) from None

    def close(self):
        """Finish the video (the encoder's last frames) and put it in place."""
        if self.container is not None:
            self.mux(self.stream.encode())
            try:
                self.container.close()
            except OSError as e:
                raise bisenet.OutputError(bisenet.write_failure(self.path, e)) from None
            os.replace(self.tmp, self.path)

    def discard(self):
        """Drop the unfinished video (an error, Ctrl-C): no temporary file is left behind."""
        if self.container is not None:
            with contextlib.suppress(Exception):
                self.container.close()
            self.tmp.unlink(missing_ok=True)


def ended_early(container, video, frames, last_pts):
    """Why a video that decoded without an error still ended early, or None: fewer frames
    than its header counts, or where it counts none, its last frame more than a second before
    the file's end (a cut-off Matroska file, say)."""
    if video.frames:
        return (f'it breaks off after {frames} of its {video.frames} frames'
                if frames < video.frames else None)
    if last_pts is None or video.time_base is None or not container.duration:
        return None
    shown, length = float(last_pts * video.time_base), container.duration / 1e6
    if shown < length - 1:
        return f'it breaks off after {frames} frames ({shown:.1f} s of {length:.1f} s)'
    return None


def timed(clock, work, *args):
    """work(*args), its seconds added to clock[0]."""
    start = time.perf_counter()
    try:
        return work(*args)
    finally:
        clock[0] += time.perf_counter() - start


@torch.no_grad()
def segment_video(av, model, path, name, runtime, mode='whole', aug_test=False, out_dir=None,
                  show_dir=None, scale=TEST_SCALE, log=print):
    """Segment each frame of one video file (segment(), as --images does for an image): a
    thread decodes and rescales the frames ahead of the model, another draws and encodes the
    outputs behind it. Returns (frames, seconds in all, the seconds of each stage (STAGES),
    why the file was skipped or cut short, or None)."""
    av_error = getattr(av, 'FFmpegError', None) or av.AVError        # PyAV < 14: AVError
    start, clocks = time.perf_counter(), [[0.0] for _ in STAGES]
    decoding, modelling, writing = clocks
    try:
        container = av.open(str(path))
    except (OSError, av_error) as e:
        return 0, 0.0, [0.0] * 3, f'FFmpeg cannot open it ({getattr(e, "strerror", None) or e})'
    with container, concurrent.futures.ThreadPoolExecutor(1) as writer:
        if not container.streams.video:
            return 0, 0.0, [0.0] * 3, 'it holds no video stream'
        video = container.streams.video[0]
        video.thread_type = 'AUTO'                       # FFmpeg's threads decode ahead
        audio = container.streams.audio[0] if container.streams.audio else None
        total = video.frames or int((container.duration or 0) / 1e6 * (video.average_rate or 0))
        outputs = VideoOutputs(av, video, audio, name, out_dir, show_dir, model.classes,
                               model.palette, log)
        frames, pts, problem, pending = 0, None, None, collections.deque()
        progress = Progress(f'[video] {name}', total, None, log, unit='frames')
        try:
            try:
                for item in read_ahead(decoded_frames(av, container, video, audio, scale),
                                       clock=decoding):
                    if not isinstance(item, tuple):                       # audio, copied
                        pending.append(writer.submit(outputs.copy_audio, item))
                        continue
                    pts, image, small = item
                    pred = timed(modelling, segment, model, image, small, runtime, mode,
                                 aug_test)
                    pending.append(writer.submit(timed, writing, outputs.frame, frames, pts,
                                                 pred, image))
                    frames += 1
                    while len(pending) > 8:               # the writer at most 8 items behind
                        pending.popleft().result()
                    progress.step(frames - 1, total)
            except av_error as e:
                problem = (f'it breaks off after {frames} frames '
                           f'({getattr(e, "strerror", None) or e})')
            for done in pending:
                done.result()
            timed(writing, outputs.close)                   # the encoder's last frames
        except BaseException:
            for done in pending:                # the writer's queue, dropped, and the frame
                done.cancel()                   # it is writing finished, before the discard
            concurrent.futures.wait(pending)
            outputs.discard()
            raise
        problem = problem or (ended_early(container, video, frames, pts) if frames
                              else 'no frame could be decoded')
    if problem and frames:
        problem += '; those were written'
    return frames, time.perf_counter() - start, [clock[0] for clock in clocks], problem


def segment_videos(av, model, paths, runtime, mode='whole', aug_test=False, out_dir=None,
                   show_dir=None, scale=TEST_SCALE, log=print):
    """Segment the video files of this process's shard (segment_video); returns the files
    that could not be read, or not to their end."""
    names = [name[:-len('.mp4')] for name in output_names(paths, '.mp4')]
    failed, frames, seconds, stages = [], 0, 0.0, np.zeros(len(STAGES))
    for index in runtime.shard(len(paths)):
        count, wall, stage_seconds, problem = segment_video(
            av, model, paths[index], names[index], runtime, mode, aug_test, out_dir, show_dir,
            scale, log)
        if problem:
            print(f'{"skipped" if not count else "cut short"} {paths[index]}: {problem}',
                  file=sys.stderr, flush=True)
            failed.append(paths[index])
        if count:
            log(f'{names[index]}: {count} frames in {wall:.1f} s, {count / wall:.2f} frames/s')
        frames, seconds, stages = frames + count, seconds + wall, stages + stage_seconds
    if frames:
        # The stages overlap, so the slowest one sets the pace.
        each = ', '.join(f'{stage} {1e3 * t / frames:.1f} ms' for stage, t in zip(STAGES, stages))
        slowest = int(np.argmax(stages))
        log(f'video: {frames} frames at {frames / seconds:.2f} frames/s in all, the model alone '
            f'at {frames / stages[1]:.2f} frames/s; per frame {each}: the run took '
            f'{seconds / stages[slowest]:.2f} x the time of its slowest stage ({STAGES[slowest]})')
    return failed


# ----------------------------------------------------------------------------------------------
# Export: the fast path as ONNX, for onnxruntime, TensorRT and the like
# ----------------------------------------------------------------------------------------------


class Deployable(nn.Module):
    """The exported interface: 'image' uint8 RGB (N, H, W, 3), any size, as images come from a
    decoder -> 'labels' uint8 (N, H, W) train ids (0 to C-1 for C classes), and with
    logits=True also 'logits' float32 (N, C, H, W). Normalisation is inside; resizing to fit
    2048 x 1024 is the caller's, as it is eval.py's."""

    def __init__(self, model, logits=False):
        super().__init__()
        self.model, self.logits = model, logits

    def forward(self, image):
        logits = self.model(bisenet.normalize(image.permute(0, 3, 1, 2)))
        labels = logits.argmax(1).to(torch.uint8)
        return (labels, logits) if self.logits else labels


def import_onnx(flag, need_onnxruntime=True):
    """The optional extras onnx and onnxruntime (None for a missing onnxruntime that is not
    needed), or one line naming the pip command."""
    try:
        import onnx
    except ImportError:
        onnx = None
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    if onnx is None or (onnxruntime is None and need_onnxruntime):
        raise bisenet.SetupError(f'{flag} needs the onnx and onnxruntime packages: pip install '
                                 f'onnx onnxruntime') from None
    return onnx, onnxruntime


def onnx_graph(onnx, deployable, classes, palette):
    """The fast path as an ONNX model with both outputs (opset 17, dynamic batch, height and
    width), the class names and colours in its metadata ('classes', 'palette': JSON)."""
    example = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    axes = {'image': {0: 'batch', 1: 'height', 2: 'width'},
            'labels': {0: 'batch', 1: 'height', 2: 'width'},
            'logits': {0: 'batch', 2: 'height', 3: 'width'}}
    kwargs = {}
    if 'dynamo' in inspect.signature(torch.onnx.export).parameters:
        kwargs['dynamo'] = False    # the TorchScript exporter: dynamic sizes, in every torch 2.x
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter('ignore')             # its deprecation notices, not ours to fix
        torch.onnx.export(deployable, (example,), f'{folder}/m.onnx', input_names=['image'],
                          output_names=['labels', 'logits'], dynamic_axes=axes, opset_version=17,
                          **kwargs)
        graph = onnx.load(f'{folder}/m.onnx')
    onnx.checker.check_model(graph)
    onnx.helper.set_model_props(graph, {'classes': json.dumps(classes),
                                        'palette': json.dumps(palette), 'precision': 'fp32'})
    return graph


def labels_only(graph):
    """A copy of an exported graph without its logits output: what users run by default."""
    graph = copy.deepcopy(graph)
    graph.graph.output.remove(graph.graph.output[1])
    return graph


def onnx_session(onnxruntime, graph, threads=None):
    """An onnxruntime CPU session of a model (a path, or a ModelProto), on `threads` threads
    (None: all cores)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or bisenet.all_cores()
    # No spinning between runs: onnxruntime's idle threads would take the cores from the
    # decoding, the drawing and PyTorch that run between and beside its runs.
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    source = graph.SerializeToString() if hasattr(graph, 'SerializeToString') else str(graph)
    return onnxruntime.InferenceSession(source, options, providers=['CPUExecutionProvider'])


def export_onnx(model, path, logits=False, check_sizes=((1024, 2048), (600, 800)), log=print):
    """Write the fast path (BN folded) as ONNX (onnx_graph), atomically; then run it with
    onnxruntime next to PyTorch on random images of `check_sizes`: label agreement, largest
    logit difference, CPU time per image. Returns the lowest agreement."""
    onnx, onnxruntime = import_onnx('--export-onnx', need_onnxruntime=False)
    deployable = Deployable(prepare_for_inference(model, bisenet.Runtime('cpu')), True).eval()
    graph = onnx_graph(onnx, deployable, model.classes, model.palette)
    bisenet.save_bytes(path, (graph if logits else labels_only(graph)).SerializeToString())
    log(f'exported {path}: image uint8 RGB (N, H, W, 3) -> labels uint8 (N, H, W)'
        + (f' and logits float32 (N, {model.num_classes}, H, W)' if logits else '')
        + f', ONNX opset 17, classes: {", ".join(model.classes)}')
    if onnxruntime is None:
        log('onnxruntime is not installed, so the export was not checked: pip install onnxruntime')
        return None
    session = onnx_session(onnxruntime, graph)
    agreements = []
    for height, width in check_sizes:
        image = torch.randint(0, 256, (1, height, width, 3), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(height))
        with torch.no_grad():
            want_labels, want_logits = deployable(image)
        got = session.run(None, {'image': image.numpy()})
        agree = float((got[0] == want_labels.numpy()).mean())
        agreements.append(agree)
        log(f'onnxruntime check at {height} x {width}: labels agree on {100 * agree:.3f}% of '
            f'pixels, largest logit difference {np.abs(got[1] - want_logits.numpy()).max():.2e}')
    times = time_per_image({'onnxruntime': onnx_session(onnxruntime, labels_only(graph)),
                            'fast path': Deployable(deployable.model)}, check_sizes[0])
    log(f'CPU time per {check_sizes[0][0]} x {check_sizes[0][1]} image: onnxruntime '
        f'{times["onnxruntime"] * 1e3:.0f} ms, fast path {times["fast path"] * 1e3:.0f} ms '
        f'({times["onnxruntime"] / times["fast path"]:.2f} x, one run, '
        f'{torch.get_num_threads()} threads)')
    return min(agreements)


def time_per_image(runs, size, rounds=3):
    """Median seconds per random uint8 image of `size` (h, w) of each onnxruntime session or
    Deployable in `runs` (of label maps alone, as users run them), in alternating rounds, the
    first a warm-up."""
    image = torch.randint(0, 256, (1, *size, 3), dtype=torch.uint8)

    def call(run):
        if isinstance(run, nn.Module):
            return lambda: run(image)
        return lambda: run.run(None, {'image': image.numpy()})
    with torch.no_grad():
        times = bisenet.time_alternately({n: call(r) for n, r in runs.items()}, rounds)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def label_agreement(first, second, images):
    """The share of pixels where two sessions' label maps agree, over `images` (uint8 (1, H, W,
    3) arrays)."""
    equal = total = 0
    for image in images:
        a, b = (s.run(['labels'], {'image': image})[0] for s in (first, second))
        equal, total = equal + int((a == b).sum()), total + a.size
    return equal / max(total, 1)


def export_int8(model, path, calibration, held_out=(), logits=False, log=print):
    """Write the fast path as a static int8 ONNX model (QDQ: int8 weights per channel, uint8
    activations, what x86's VNNI and AMX run), its activation ranges calibrated on
    `calibration` (uint8 (1, H, W, 3) arrays, rescaled as inference rescales). Reports the label
    agreement with the fp32 file on the calibration and the held-out images, and the time per
    image of the first calibration image's size (Cityscapes': 1024 x 2048) against fp32
    onnxruntime and the PyTorch fast path, side by side. Returns the agreement on the held-out
    images (on the calibration images where there are none)."""
    onnx, onnxruntime = import_onnx('--int8')
    from onnxruntime import quantization
    deployable = Deployable(prepare_for_inference(model, bisenet.Runtime('cpu')), True).eval()
    fp32 = onnx_graph(onnx, deployable, model.classes, model.palette)

    class Images(quantization.CalibrationDataReader):
        def __init__(self):
            self.images = iter(calibration)

        def get_next(self):
            image = next(self.images, None)
            return None if image is None else {'image': image}
    log(f'calibrating the int8 model on {len(calibration)} images ...')
    with tempfile.TemporaryDirectory() as folder:
        onnx.save(fp32, f'{folder}/fp32.onnx')
        quantization.quant_pre_process(f'{folder}/fp32.onnx', f'{folder}/pre.onnx')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            quantization.quantize_static(
                f'{folder}/pre.onnx', f'{folder}/int8.onnx', Images(),
                quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8)
        int8 = onnx.load(f'{folder}/int8.onnx')
    onnx.helper.set_model_props(int8, dict({p.key: p.value for p in fp32.metadata_props},
                                           precision='int8'))
    bisenet.save_bytes(path, (int8 if logits else labels_only(int8)).SerializeToString())
    log(f'exported {path}: int8 (QDQ, per-channel weights), image uint8 RGB (N, H, W, 3) -> '
        f'labels uint8 (N, H, W)' + (' and logits float32' if logits else '')
        + f', classes: {", ".join(model.classes)}')
    sessions = {'int8 onnxruntime': onnx_session(onnxruntime, labels_only(int8)),
                'fp32 onnxruntime': onnx_session(onnxruntime, labels_only(fp32))}
    agreement = label_agreement(*sessions.values(), calibration)
    line = f'int8 labels agree with fp32 on {100 * agreement:.2f}% of the pixels of the ' \
           f'{len(calibration)} calibration images'
    if held_out:
        agreement = label_agreement(*sessions.values(), held_out)
        line += f', {100 * agreement:.2f}% of {len(held_out)} held-out images'
    log(line)
    time_size = calibration[0].shape[1:3]
    times = time_per_image(dict(sessions, **{'PyTorch fast path': Deployable(deployable.model)}),
                           time_size)
    int8_time = times['int8 onnxruntime']
    log(f'CPU time per {time_size[0]} x {time_size[1]} image: ' + ', '.join(
        f'{name} {t * 1e3:.0f} ms' for name, t in times.items())
        + f' (int8: {int8_time / times["fp32 onnxruntime"]:.2f} x fp32 onnxruntime, '
        f'{int8_time / times["PyTorch fast path"]:.2f} x the fast path; one run, '
        f'{torch.get_num_threads()} threads)')
    if bisenet.cpu_has_int8_dot() is False:
        log('this CPU has no int8 dot-product instructions (x86 VNNI or AMX, Arm dotprod): '
            'int8 runs no faster than fp32 here, but will on a CPU that has them')
    return agreement


class OnnxModel:
    """An exported file in a model's place, run by onnxruntime on the CPU: called on a
    normalised batch (N, 3, H, W) as the model is, it gives the file's logits, or where the
    file has none the one-hot of its labels (whose argmax is the labels), so that evaluate(),
    predict() and segment() run the deployed file as they run a checkpoint. The class names
    and colours come from the file's metadata."""
    training = False

    def __init__(self, path, threads=None):
        if not Path(path).is_file():
            raise bisenet.CheckpointError(f'--onnx {path} does not exist' + (
                ' as a file' if Path(path).exists() else ''))
        if zipfile.is_zipfile(path):                # what torch.save writes
            raise bisenet.CheckpointError(f'{path} is a PyTorch checkpoint, not an ONNX file: '
                                          f'give it with --ckpt')
        onnx, onnxruntime = import_onnx('--onnx')
        try:
            self.session = onnx_session(onnxruntime, path, threads)
        except Exception as e:      # onnxruntime's own error types: not a model, unreadable
            raise bisenet.CheckpointError(f'cannot load {path} with onnxruntime: '
                                          f'{bisenet.one_line(e)[:200]}') from None
        meta = self.session.get_modelmeta().custom_metadata_map
        inputs, outputs = self.session.get_inputs(), [o.name for o in self.session.get_outputs()]
        try:
            names, palette = json.loads(meta['classes']), json.loads(meta.get('palette', 'null'))
        except (KeyError, ValueError):
            names = palette = None
        if not isinstance(names, list) or [i.name for i in inputs] != ['image'] \
                or 'labels' not in outputs:
            raise bisenet.CheckpointError(f'{path} is no BiSeNetV1 export with its classes '
                                          f'(image -> labels, metadata "classes"): export it '
                                          f'with eval.py --export-onnx')
        self.classes, self.palette = bisenet.class_meta(len(names), names, palette)
        self.num_classes, self.logits = len(self.classes), 'logits' in outputs
        self.threads = threads or bisenet.all_cores()
        self.path, self.backbone_name = path, f'ONNX {meta.get("precision", "")}'.strip()

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, x):
        constants = bisenet.device_constants(x.device)         # normalize(), undone
        image = (x.float() * constants['std'] + constants['mean']).round_().clamp_(0, 255)
        image = np.ascontiguousarray(image.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        if self.logits:
            return torch.from_numpy(self.session.run(['logits'], {'image': image})[0])
        labels = torch.from_numpy(self.session.run(['labels'], {'image': image})[0]).long()
        return F.one_hot(labels, self.num_classes).permute(0, 3, 1, 2).float()


# ----------------------------------------------------------------------------------------------
# Benchmark: the plain model against the fast path
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def benchmark(model, runtime, compile_model=False, size=(1024, 2048), batch=1, warmup=2,
              rounds=None, log=print):
    """Time per batch of whole-image inference, from the normalised images to the label maps
    (the logits' argmax, which mmsegmentation's benchmark also times): the plain model next to
    the fast path, and with compile_model the fast path under torch.compile too, in
    alternating rounds so that a noisy machine slows them alike; medians. The last line is
    'FPS: <images per second of the fastest>'."""
    rounds = rounds or (6 if runtime.type == 'cpu' else 30)
    x = torch.randn(batch, 3, *size, device=runtime.device)
    fast_x = x.contiguous(memory_format=runtime.inference_format)
    model = model.eval().to(runtime.device)
    fast = prepare_for_inference(model, runtime)

    def label_map(model, x):
        with runtime.autocast():
            return predict(model, x, model.num_classes).argmax(1)
    runs = {'plain model': lambda: label_map(model, x),
            'fast path': lambda: label_map(fast, fast_x)}
    if compile_model:
        compiled = prepare_for_inference(model, runtime, compile_model=True)
        runs['fast path, compiled'] = lambda: label_map(compiled, fast_x)
    for _ in range(warmup):      # also compiles: the compiled path first, so that a compiler
        for run in list(runs.values())[::-1]:             # that fails does so at once
            run()
    times = bisenet.time_alternately(runs, rounds, runtime.synchronize)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        spread = f'{min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}'
        log(f'{name:<19} {median[name] * 1e3:8.1f} ms per batch, {batch / median[name]:7.1f} '
            f'images/s (median of {len(t)}: {spread} ms)')
    what = 'folded BN' + (', channels_last' if runtime.inference_format == torch.channels_last
                          else '')
    line = f'fast path ({what}): {median["fast path"] / median["plain model"]:.2f} x the time'
    if compile_model:
        line += f'; compiled: {median["fast path, compiled"] / median["plain model"]:.2f} x'
    log(f'{line} ({size[0]} x {size[1]}, batch {batch}, {runtime.type}, {runtime.precision})')
    log(f'FPS: {batch / min(median.values()):.2f}')


def benchmark_onnx(model, size=(1024, 2048), warmup=2, rounds=6, log=print):
    """Time per image of an exported file (OnnxModel) at batch 1, from a uint8 image to the
    label map, as its users run it; the median. The last line is 'FPS: <the file>'."""
    image = np.random.default_rng(0).integers(0, 256, (1, *size, 3), dtype=np.uint8)

    def run():
        model.session.run(['labels'], {'image': image})
    for _ in range(warmup):
        run()
    times = bisenet.time_alternately({'file': run}, rounds)['file']
    median = statistics.median(times)
    log(f'{model.path} ({model.backbone_name}): {median * 1e3:.1f} ms per image (median of '
        f'{", ".join(f"{s * 1e3:.0f}" for s in times)}; {size[0]} x {size[1]}, batch 1, '
        f'onnxruntime on the CPU, {model.threads} threads)')
    log(f'FPS: {1 / median:.2f}')


# ----------------------------------------------------------------------------------------------
# The command line: one function per mode
# ----------------------------------------------------------------------------------------------


def load_model(args, runtime):
    """The model a command names, ready for inference: the exported file of --onnx, run by
    onnxruntime, or the inference fast path of --ckpt's checkpoint."""
    if args.onnx:
        return OnnxModel(args.onnx, args.threads)
    return prepare_for_inference(bisenet.model_from_checkpoint(args.ckpt, args.trust_pickle),
                                 runtime, args.compile)


def calibration_images(args):
    """--int8's images as inference sees them (uint8 (1, h, w, 3)): calibration
    (--calibrate-count of them, spread over --calibrate DIR or over the train split of
    --data-path) and up to 8 held out (others of DIR; the val split). Images of a folder are
    rescaled to fit --scale as --images does, a data set's kept at their size as evaluation
    does (unless --scale is given)."""
    scale = tuple(args.scale or TEST_SCALE) if args.calibrate or args.scale else None
    count = args.calibrate_count or CALIBRATION_IMAGES
    if args.calibrate:
        paths = find_images([args.calibrate], '--calibrate')
        chosen = bisenet.spread(len(paths), count)
        rest = [path for i, path in enumerate(paths) if i not in chosen]
        calibration = [paths[i] for i in chosen]
        held_out = [rest[i] for i in bisenet.spread(len(rest), 8)]
    else:
        try:
            train = bisenet.SegmentationDataset(args.data_path or DEFAULT_DATA_PATH, 'train')
        except bisenet.DatasetError as e:
            raise bisenet.SetupError(f'--int8 calibrates on --calibrate DIR, or on the train '
                                     f'split of --data-path, which cannot be read: {e}') from None
        calibration = [train.samples[i].image for i in bisenet.spread(len(train), count)]
        try:
            val = bisenet.SegmentationDataset(args.data_path or DEFAULT_DATA_PATH, 'val')
            held_out = [val.samples[i].image for i in bisenet.spread(len(val), 8)]
        except bisenet.DatasetError:
            held_out = []

    def load(paths):                    # an unreadable file is named and skipped
        images = []
        for path in paths:
            try:
                image, _ = bisenet.open_image(path)
            except bisenet.IMAGE_ERRORS as e:
                print(f'skipped {path}: cannot read it ({bisenet.one_line(e)})', file=sys.stderr)
                continue
            pixels = rescaled(image, scale)[1] if scale else bisenet.pixels(image).permute(2, 0, 1)
            images.append(pixels.permute(1, 2, 0)[None].numpy())
        return images
    calibration, held_out = load(calibration), load(held_out)
    if not calibration:
        raise bisenet.SetupError('no calibration image could be read (named above)')
    return calibration, held_out


def run_export(args):
    """--export-onnx: on the CPU, what ONNX files hold: fp32, or with --int8 int8."""
    bisenet.output_file(args.export_onnx, '--export-onnx')
    model = bisenet.model_from_checkpoint(args.ckpt, args.trust_pickle).eval()
    if args.int8:
        import_onnx('--int8')               # a missing package: before reading any image
        export_int8(model, args.export_onnx, *calibration_images(args), args.onnx_logits)
        return
    agreement = export_onnx(model, args.export_onnx, args.onnx_logits)
    if agreement is not None and agreement < 0.9999:
        raise bisenet.SetupError(f'the ONNX label maps agree with PyTorch on only '
                                 f'{100 * agreement:.3f}% of the pixels')


def run_benchmark(args, runtime):
    """--benchmark: a checkpoint's model, or a new one of --backbone, or an exported file,
    timed on random input."""
    if args.onnx:
        return benchmark_onnx(OnnxModel(args.onnx, args.threads), log=runtime.print0)
    model = (bisenet.model_from_checkpoint(args.ckpt, args.trust_pickle) if args.ckpt
             else bisenet.BiSeNetV1(19, args.backbone))
    runtime.print0(f'BiSeNetV1 {model.backbone_name}, {runtime.device}, {runtime.precision}')
    benchmark(model, runtime, args.compile, batch=args.batch_size, log=runtime.print0)


def run_images(args, runtime):
    """--images and --video: label maps and/or pictures (overlay videos) of image or video
    files; exits 1 if any could not be read."""
    video = bool(args.video)
    paths = (find_images(args.video, '--video', VIDEO_SUFFIXES, 'video') if video
             else find_images(args.images))
    av = import_av() if video else None             # a missing PyAV: before any work
    show_dir = args.show_dir
    if not (args.out_dir or args.show_dir):
        show_dir = 'output/segmented'       # pictures, unless asked for label maps
    for flag, folder in (('--out-dir', args.out_dir), ('--show-dir', show_dir)):
        if folder:
            bisenet.make_dir(folder, flag)
    scale = tuple(args.scale or TEST_SCALE)
    model = load_model(args, runtime)
    kind = 'videos' if video else 'images'
    runtime.print0(f'segmenting {len(paths)} {kind} with {args.ckpt or args.onnx} '
                   f'({model.num_classes} '
                   f'classes), {args.mode}{" + ms/flip" if args.aug_test else ""}, fit to '
                   f'{scale[0]} x {scale[1]}, {runtime.device}, {runtime.precision}; writing '
                   + ' and '.join(f'{what} to {folder}' for what, folder in (
                       ('label maps', args.out_dir),
                       ('overlay videos' if video else 'pictures', show_dir)) if folder))
    if video:
        failed = segment_videos(av, model, paths, runtime, args.mode, args.aug_test,
                                args.out_dir, show_dir, scale, log=runtime.print0)
    else:
        failed = segment_images(model, paths, runtime, args.mode, args.aug_test, args.out_dir,
                                show_dir, args.workers, log=runtime.print0, scale=scale)
    if failed:
        bisenet.fail(f'error: {len(failed)} of the {kind} could not be read' + (
            ' in full' if video else '') + ' (named above); the others were written')


def run_evaluation(args, runtime):
    """The metric of a checkpoint on --data-path's --split, its table, and what it writes."""
    for flag, folder in (('--out-dir', args.out_dir), ('--show-dir', args.show_dir),
                         ('--prof-dir', args.prof_test and args.prof_dir)):
        if folder:                          # fail now, not after the evaluation
            bisenet.make_dir(folder, flag)
    if args.json:
        bisenet.output_file(args.json, '--json')
    model, source = load_model(args, runtime), args.ckpt or args.onnx
    if args.data_path is None and not Path(DEFAULT_DATA_PATH).exists():
        raise bisenet.SetupError(f'no data set to evaluate on: give --data-path ROOT (the '
                                 f'default, {DEFAULT_DATA_PATH}, does not exist), or --images or '
                                 f'--video FILES to segment files')
    args.data_path = args.data_path or DEFAULT_DATA_PATH
    dataset = bisenet.SegmentationDataset(args.data_path, args.split,
                                          bisenet.EvalTransform(on_device=True), args.cache_dir)
    if model.num_classes != len(dataset.classes):
        raise bisenet.SetupError(f'{source} predicts {model.num_classes} classes but '
                                 f'{args.data_path} has {len(dataset.classes)}: evaluate a '
                                 f'model trained on this data set')
    if dataset.cache_note:
        runtime.print0(dataset.cache_note)
    limit = 8 if args.prof_test else None           # a few images are enough to profile
    runtime.print0(f'evaluating {source} ({model.backbone_name}, {model.num_classes} '
                   f'classes) on {min(len(dataset), limit or len(dataset))} images of '
                   f'{args.data_path}/{args.split}, '
                   f'{args.mode}{" + ms/flip" if args.aug_test else ""}, {runtime.device}, '
                   f'{runtime.precision}, {runtime.world_size} process(es)')
    profiler = runtime.profiler(args.prof_dir) if args.prof_test else None
    if profiler is not None:
        profiler.start()
    metrics = evaluate(model, dataset, runtime, args.mode, args.aug_test, args.out_dir,
                       args.show_dir, args.workers, log=runtime.print0, profiler=profiler,
                       limit=limit)
    if profiler is not None:
        profiler.stop()
        runtime.print0(f'profile trace written to {args.prof_dir}')
    if metrics['pixels'] == 0:                  # e.g. Cityscapes' test split
        runtime.print0('no labelled pixels: metrics skipped'
                       + (f' (predictions written to {args.out_dir})' if args.out_dir else ''))
        return
    runtime.print0(format_table(metrics, dataset.classes))
    if args.json and runtime.rank == 0:
        record = json.dumps(metrics_record(metrics, dataset.classes), indent=2) + '\n'
        bisenet.save_bytes(args.json, record.encode())
    if metrics['skipped']:
        bisenet.fail(f'error: {len(metrics["skipped"])} of the images could not be read '
                     f'(named above) and are left out of these metrics: mend or remove them and '
                     f'run again')


def check_args(args):
    """Flag combinations that cannot work, each refused in one line before any work."""
    if not (args.benchmark or args.ckpt or args.onnx):
        raise bisenet.SetupError('--ckpt is required (or --onnx FILE, or --benchmark for a '
                                 'timing run)')
    if args.ckpt and args.onnx:
        raise bisenet.SetupError('--ckpt and --onnx exclude each other: give the model once')
    if args.workers < 0:
        raise bisenet.SetupError(f'--workers cannot be negative, not {args.workers}')
    if args.threads is not None and args.threads < 1:
        raise bisenet.SetupError(f'--threads must be at least 1, not {args.threads}')
    if args.batch_size != 1 and not (args.benchmark and not args.onnx) or args.batch_size < 1:
        raise bisenet.SetupError(f'--batch-size {args.batch_size}: give a positive batch, with '
                                 f'--benchmark of a model (evaluation runs one image at a time)')
    given = [flag for flag, value in (('--images', args.images), ('--video', args.video),
                                      ('--export-onnx', args.export_onnx)) if value]
    if len(given) > 1:
        raise bisenet.SetupError(f'{" and ".join(given)} exclude each other: run once for each')
    if args.scale and not (args.images or args.video or args.int8):
        raise bisenet.SetupError('--scale applies to --images, --video and --int8 only (data '
                                 'sets are evaluated at their own size)')
    if args.scale and min(args.scale) <= 0:
        raise bisenet.SetupError(f'--scale takes a positive width and height, not '
                                 f'{args.scale[0]} {args.scale[1]}')
    if args.export_onnx and not args.ckpt:
        raise bisenet.SetupError('--export-onnx exports a checkpoint: give it with --ckpt')
    if (args.calibrate or args.calibrate_count is not None) and not args.int8 or \
            args.int8 and not args.export_onnx:
        raise bisenet.SetupError('--int8 goes with --export-onnx, and --calibrate and '
                                 '--calibrate-count with --int8')
    if args.calibrate_count is not None and args.calibrate_count < 1:
        raise bisenet.SetupError(f'--calibrate-count must be at least 1, not '
                                 f'{args.calibrate_count}')
    if args.onnx and (args.amp or args.compile or args.device not in ('auto', 'cpu')):
        raise bisenet.SetupError('--onnx runs the file with onnxruntime on the CPU, in the '
                                 'precision it was exported in: drop --amp, --compile and '
                                 '--device')


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    runtime, Progress.latest = None, None
    try:
        check_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.export_onnx:
            return run_export(args)
        runtime = bisenet.Runtime('cpu' if args.onnx else args.device, args.amp, args.amp_dtype,
                                  args.device_list)
        if args.benchmark:
            return run_benchmark(args, runtime)
        if args.images or args.video:
            return run_images(args, runtime)
        run_evaluation(args, runtime)
    except (bisenet.CheckpointError, bisenet.DatasetError, bisenet.SetupError) as e:
        bisenet.fail(f'error: {bisenet.one_line(e)}')
    except KeyboardInterrupt:
        print(interrupted(), file=sys.stderr, flush=True)
        sys.exit(130)                               # the shell's status for SIGINT
    except Exception as e:
        # torch.compile compiles at the first call, so its failures (no working compiler or
        # Triton, a backend bug) surface here rather than in prepare_for_inference.
        if args.compile and type(e).__module__.startswith(('torch._dynamo', 'torch._inductor')):
            cause = getattr(e, 'inner_exception', None) or e
            bisenet.fail(f'error: --compile failed at the first image '
                         f'({type(cause).__name__}: {bisenet.one_line(cause)[:200]}); drop '
                         f'--compile')
        raise
    finally:
        if runtime is not None:
            runtime.close(finished=sys.exc_info()[0] is None)


if __name__ == '__main__':
    main()
