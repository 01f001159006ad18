"""Evaluate a BiSeNetV1 checkpoint with the reference's metric (Cityscapes or a data set of your
own), segment your own images with it, or time it. Works with this project's checkpoints and
mmsegmentation's: the backbone, the class count and the class names and colours come from the
checkpoint. train.py validates with evaluate().

    python eval.py --ckpt output/best.pth --data-path data/cityscapes            # val, whole image
    python eval.py --ckpt CKPT --data-path ROOT --aug-test                       # ms + flip
    python eval.py --ckpt CKPT --data-path ROOT --out-dir results --show-dir vis --json m.json
    torchrun --nproc_per_node=8 eval.py --ckpt CKPT --data-path ROOT             # 8 devices
    python eval.py --ckpt CKPT --images photos/ street.jpg 'more/*.png'          # your images
    python eval.py --benchmark [--device cuda --amp] [--compile] [--batch-size 8]   # FPS

--out-dir writes a PNG per image: for Cityscapes its labelIds (CITY/NAME_leftImg8bit.png, what
cityscapesscripts reads), for other classes a palette PNG of train ids. --show-dir writes the
image, prediction and ground truth side by side. Videos, ONNX and int8 are in tools/.
"""
import argparse
import copy
import glob
import json
import os
import shutil
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from runtime import Runtime, SetupError, fail, init_worker, one_line  # first: NumPy vs torch
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import bisenet  # noqa: E402
import data  # noqa: E402
from data import image_bytes, make_dir, output_file, save_bytes  # noqa: E402

AUG_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)     # the reference's multi-scale test
SLIDE_WINDOW, SLIDE_STRIDE = (1024, 1024), (768, 768)
TEST_SCALE = (2048, 1024)            # the reference's test Resize: fit, keeping the aspect ratio
DEFAULT_DATA_PATH = 'data/cityscapes'


# ---- The metric: per-class areas over the whole data set, as the reference accumulates them ----
def confusion(pred, label, num_classes, ignore_index=data.IGNORE_INDEX):
    """(num_classes, num_classes) counts of (label, pred) pairs, ignored pixels dropped, added
    into a fixed-size tensor (bincount reads its largest index on the host: a wait)."""
    index = torch.where(label != ignore_index, label * num_classes + pred,
                        torch.full_like(label, num_classes ** 2)).flatten().long()
    counts = torch.zeros(num_classes ** 2 + 1, dtype=torch.int64, device=index.device)
    counts.index_add_(0, index, torch.ones_like(index))
    return counts[:num_classes ** 2].view(num_classes, num_classes)


def summarize(confusion_matrix):
    """mIoU, mAcc, aAcc, per-class IoU and Acc (%); a class absent from both is NaN, skipped."""
    cm = confusion_matrix.double()
    intersection, label_area, pred_area = cm.diag(), cm.sum(1), cm.sum(0)
    union, nan = label_area + pred_area - intersection, torch.tensor(float('nan'))
    iou = torch.where(union > 0, intersection / union.clamp(min=1), nan)
    acc = torch.where(label_area > 0, intersection / label_area.clamp(min=1), nan)
    return {'mIoU': 100 * iou.nanmean().item(), 'mAcc': 100 * acc.nanmean().item(),
            'aAcc': 100 * (intersection.sum() / label_area.sum().clamp(min=1)).item(),
            'IoU': (100 * iou).tolist(), 'Acc': (100 * acc).tolist(),
            'pixels': int(label_area.sum())}


def metrics_record(metrics, class_names):
    """The metrics as JSON data for --json and metrics.jsonl, per class by name (null: absent)."""
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


# ---- Inference: whole image, sliding window, multi-scale + flip; the fast path ---------------
def slide_logits(model, image, num_classes):
    """The mean logits of overlapping 1024 x 1024 windows (stride 768), as the reference."""
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
    """Scores (1, C, H, W): logits, or with aug_test the mean softmax over scales and flips."""
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
            logits = infer(scaled.flip(3) if flip else scaled)
            logits = logits.flip(3) if flip else logits
            logits = F.interpolate(logits, size=(h, w), mode='bilinear', align_corners=False)
            scores = scores + logits.softmax(1)
    return scores / (2 * len(AUG_RATIOS))


def prepare_for_inference(model, runtime, compile_model=False):
    """A copy of `model`, BatchNorm folded, channels_last where it pays, maybe compiled."""
    model = bisenet.fold_batchnorm(copy.deepcopy(model).eval())
    model = model.to(runtime.device, memory_format=runtime.inference_format)
    if compile_model:
        if runtime.type == 'npu':
            raise SetupError('--compile is not supported on NPU: drop it')
        if runtime.type == 'cpu' and not any(shutil.which(c) for c in ('g++', 'clang++', 'c++')):
            raise SetupError('--compile on CPU needs a C++ compiler (g++ or clang++): install '
                             'one or drop --compile')
        try:
            model = torch.compile(model)
        except RuntimeError as e:               # e.g. a Python that this torch's Dynamo lacks
            raise SetupError(f'--compile is not available here ({e}): drop it') from e
    return model


# ---- Evaluation on a data set, and its outputs: label maps and pictures ----------------------
@torch.no_grad()
def evaluate(model, dataset, runtime, mode='whole', aug_test=False, out_dir=None,
             show_dir=None, workers=4, log=print, profiler=None, limit=None, keep_pictures=()):
    """The metrics of `model` on `dataset` (EvalTransform items), counts summed over all
    processes; 'pictures': the prediction_picture of this shard's `keep_pictures`, by name."""
    was_training, num_classes = model.training, model.num_classes
    model.eval()
    size = len(dataset) if limit is None else min(limit, len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=runtime.shard(size),
                                         num_workers=workers, **runtime.loader_options())
    label_ids = data.cityscapes_label_ids(dataset.classes)
    total = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=runtime.device)
    progress, pictures, skipped = Progress('[eval]', size, runtime.world_size, log), {}, []
    items = data.forking(iter, loader)                  # its workers start
    for step, index in enumerate(loader.sampler):
        try:                        # a file that cannot be read: named, left out of the metric
            image, label = next(items)
        except data.DatasetError as e:
            print(f'skipped {one_line(e)}', file=sys.stderr, flush=True)
            skipped.append(one_line(e))
            progress.step(step, len(loader))
            continue
        image = image[None].to(runtime.device, non_blocking=True)
        label = label[None].to(runtime.device, non_blocking=True).long()
        x = data.normalize(image).contiguous(memory_format=runtime.inference_format)
        with runtime.autocast():
            pred = predict(model, x, num_classes, mode, aug_test).argmax(1)
        total += confusion(pred, label, num_classes)
        if out_dir or show_dir or index in keep_pictures:
            name = dataset.name(index)
            pred_ids, truth = pred[0].cpu().numpy(), label[0].cpu().numpy()
            save_prediction(pred_ids, image[0],
                            f'{name}_leftImg8bit.png' if label_ids else f'{name}.png',
                            f'{name}.png', out_dir, show_dir, dataset.classes, dataset.palette,
                            truth, label_ids)
            if index in keep_pictures:
                pictures[name] = prediction_picture(pred_ids, image[0], dataset.classes,
                                                    dataset.palette, truth)
        if profiler is not None:
            profiler.step()
        progress.step(step, len(loader))
    runtime.all_reduce(total)
    model.train(was_training)
    return dict(summarize(total.cpu()), pictures=pictures, skipped=skipped)


class Progress:
    """'[what] done/total images, N images/s, ..., ETA s', every 10 s; Ctrl-C reports the last."""
    latest = None

    def __init__(self, what, total, world_size, log, unit='images'):
        self.what, self.total, self.log, self.unit = what, total, log, unit
        self.world_size, self.start, self.last, self.done = world_size, time.time(), 0, 0
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
    p = Progress.latest
    where = f' after {p.done} of {p.total or "?"} {p.unit} ({p.what.strip("[]")})' if p else ''
    return f'error: interrupted (Ctrl-C){where}; every file written is whole, none half written'


def save_prediction(pred, image, out_name, show_name, out_dir, show_dir, classes, palette,
                    label=None, label_ids=None):
    """The label map (palette PNG of train ids, or label_ids) and/or the picture of `pred`."""
    if out_dir:
        if label_ids is not None:
            label_map = Image.fromarray(data.lookup_table(label_ids)[pred])
        else:
            label_map = Image.fromarray(pred.astype(np.uint8))
            label_map.putpalette([v for colour in palette for v in colour])
        save_bytes(Path(out_dir) / out_name, image_bytes(label_map))
    if show_dir:
        picture = prediction_picture(pred, image, classes, palette, label)
        save_bytes(Path(show_dir) / show_name, image_bytes(picture))


def prediction_picture(pred, image, classes, palette, label=None):
    """image | prediction | ground truth, or without a label the prediction over the image."""
    rgb = image.permute(1, 2, 0).cpu().numpy()
    present = np.bincount(pred.ravel(), minlength=256)
    if label is None:
        panels, captions = [blend(rgb, pred, palette)], ['prediction']
    else:
        panels = [rgb, colourize(pred, palette), colourize(label, palette)]
        captions = ['image', 'prediction', 'ground truth']
        present = present + np.bincount(label.ravel(), minlength=256)
    return picture(panels, captions, np.flatnonzero(present[:256]), classes, palette)


def picture(panels, captions, train_ids, classes, palette):
    """Captioned panels (uint8 (H, W, 3)) side by side, the legend of `train_ids` below."""
    height, width = panels[0].shape[0], sum(p.shape[1] for p in panels)
    size = max(11, height // 40)
    font, pad, line = legend_font(size), size // 2, size + size // 2
    last_caption = width - panels[-1].shape[1] + text_width(captions[-1], font) + 2 * pad
    key = legend(train_ids, classes, palette, max(width, last_caption), size)
    canvas = Image.new('RGB', (key.width, line + height + key.height), 'white')
    draw, x = ImageDraw.Draw(canvas), 0
    for panel, caption in zip(panels, captions):
        canvas.paste(Image.fromarray(panel), (x, line))
        draw.text((x + pad, pad // 2), caption, fill='black', font=font)
        x += panel.shape[1]
    canvas.paste(key, (0, line + height))
    return canvas


def legend(train_ids, classes, palette, width, size):
    """Swatches and names of `train_ids` in rows wrapped to `width`: a white PIL image."""
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


def legend_font(size):
    """Pillow's own font at `size` pixels (Pillow >= 10.1 scales it; older ones have one size)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def text_width(text, font):
    return ImageDraw.Draw(Image.new('RGB', (1, 1))).textbbox((0, 0), text, font=font)[2]


def colourize(train_ids, palette):
    """Train ids in their colours, others black (Pillow's lookup: 4 x numpy's indexing)."""
    ids = Image.fromarray(np.asarray(train_ids, np.uint8), 'P')
    ids.putpalette([v for colour in palette for v in colour])
    return np.asarray(ids.convert('RGB'))


def blend(rgb, train_ids, palette):
    """The classes' colours over an image at half strength: (a + b) // 2, in uint8."""
    colours = colourize(train_ids, palette)
    return (rgb >> 1) + (colours >> 1) + (rgb & colours & 1)


# ---- Your own images: the reference's test pipeline on any PNG or JPEG -----------------------
def fit_size(width, height, scale=TEST_SCALE):
    """(w, h) rescaled to fit `scale`, keeping the aspect ratio, as mmcv's rescale_size."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def find_images(patterns, flag='--images', suffixes=data.IMAGE_SUFFIXES, kind='PNG or JPEG'):
    """Files, folders (searched recursively for `suffixes`) and globs: sorted unique paths."""
    found = set()
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = [p for p in data.files_below(path) if p.suffix.lower() in suffixes]
        elif path.is_file():
            matches = [path]                        # named explicitly: tried whatever it is
        else:
            matches = [Path(p) for p in glob.glob(pattern, recursive=True)
                       if Path(p).suffix.lower() in suffixes]
        matches = [p.resolve() for p in matches if p.is_file()]
        if not matches:
            raise SetupError(f'{flag} {pattern}: no {kind} file there'.strip())
        found.update(matches)
    return sorted(found)


def output_names(paths, suffix='.png'):
    """Output names: paths below the common folder, ending in `suffix` (a.jpg -> a.jpg.png)."""
    root = Path(os.path.commonpath([p.parent for p in paths]))
    names = [path.relative_to(root).as_posix() for path in paths]
    return [n if p.suffix.lower() == suffix else n + suffix for n, p in zip(names, paths)]


def rescaled(image, scale=TEST_SCALE):
    """(image, image rescaled to fit `scale` as cv2 does), uint8 (3, H, W), of an RGB image."""
    size = fit_size(*image.size, scale)
    small = data.rescale_crop(image, image.size, size, (0, 0) + size, Image.BILINEAR)
    return data.pixels(image).permute(2, 0, 1), data.pixels(small).permute(2, 0, 1)


class ImageFiles(torch.utils.data.Dataset):
    """Images as the reference reads them: (rescaled()..., None), or (None, None, why)."""

    def __init__(self, paths, scale=TEST_SCALE):
        self.paths, self.scale = paths, scale

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            image, _ = data.open_image(self.paths[index])
        except data.IMAGE_ERRORS as e:
            return None, None, one_line(e)
        return rescaled(image, self.scale) + (None,)


def segment(model, image, small, runtime, mode='whole', aug_test=False):
    """An image's label map (uint8, CPU) from `small`, scores resized back before the argmax."""
    x = data.normalize(small[None].to(runtime.device, non_blocking=True))
    with runtime.autocast():
        scores = predict(model, x.contiguous(memory_format=runtime.inference_format),
                         model.num_classes, mode, aug_test)
    if scores.shape[2:] != image.shape[1:]:           # at its own size: nothing to resize
        scores = F.interpolate(scores, size=image.shape[1:], mode='bilinear',
                               align_corners=False)
    return scores.argmax(1)[0].to(torch.uint8).cpu().numpy()


@torch.no_grad()
def segment_images(model, paths, runtime, mode='whole', aug_test=False, out_dir=None,
                   show_dir=None, workers=4, log=print, scale=TEST_SCALE):
    """Label maps and/or pictures of this shard of image files; returns those not read."""
    dataset, names = ImageFiles(paths, scale), output_names(paths)
    label_ids = data.cityscapes_label_ids(model.classes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         sampler=runtime.shard(len(dataset)),
                                         worker_init_fn=init_worker)
    progress, failed = Progress('[images]', len(dataset), runtime.world_size, log), []
    items = zip(loader.sampler, data.forking(iter, loader))
    for step, (index, (image, small, error)) in enumerate(items):
        if error is None:
            pred = segment(model, image, small, runtime, mode, aug_test)
            save_prediction(pred, image, names[index], names[index], out_dir, show_dir,
                            model.classes, model.palette, label_ids=label_ids)
        else:
            print(f'skipped {paths[index]}: cannot read it ({error})', file=sys.stderr, flush=True)
            failed.append(paths[index])
        progress.step(step, len(loader))
    return failed


# ---- Benchmark: the plain model against the fast path ----------------------------------------
def time_alternately(runs, rounds, synchronize=None):
    """{name: [seconds per call]} of `runs`, the order reversed every other round."""
    times, synchronize = {name: [] for name in runs}, synchronize or (lambda: None)
    for round_ in range(rounds):
        for name in (list(runs) if round_ % 2 == 0 else list(runs)[::-1]):
            synchronize()
            start = time.perf_counter()
            runs[name]()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return times


@torch.no_grad()
def benchmark(model, runtime, compile_model=False, size=(1024, 2048), batch=1, warmup=2,
              rounds=None, log=print):
    """Time per batch, normalised images to label maps: the plain model, the fast path (and
    compiled), alternated; medians. The last line is 'FPS: <the fastest's images/s>'."""
    rounds = rounds or (6 if runtime.type == 'cpu' else 30)
    x = torch.randn(batch, 3, *size, device=runtime.device)
    fast_x = x.contiguous(memory_format=runtime.inference_format)
    model, fast = model.eval().to(runtime.device), prepare_for_inference(model, runtime)

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
    times = time_alternately(runs, rounds, runtime.synchronize)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        log(f'{name:<19} {median[name] * 1e3:8.1f} ms per batch, {batch / median[name]:7.1f} '
            f'images/s (median of {len(t)}: {min(t) * 1e3:.1f}-{max(t) * 1e3:.1f} ms)')
    layout = ', channels_last' if runtime.inference_format == torch.channels_last else ''
    line = f'fast path (folded BN{layout}): {median["fast path"] / median["plain model"]:.2f} x ' \
        f'the time'
    if compile_model:
        line += f'; compiled: {median["fast path, compiled"] / median["plain model"]:.2f} x'
    log(f'{line} ({size[0]} x {size[1]}, batch {batch}, {runtime.type}, {runtime.precision})')
    log(f'FPS: {batch / min(median.values()):.2f}')


# ---- The command line ------------------------------------------------------------------------
def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add = parser.add_argument
    add('--ckpt', help='checkpoint: ours (train.py) or mmsegmentation\'s')
    add('--data-path', '--data_path', help='Cityscapes root (leftImg8bit/, gtFine/) or your own '
        f'data set (classes.txt, images/, labels/); default {DEFAULT_DATA_PATH}')
    add('--split', default='val')
    add('--images', nargs='+', metavar='PATH', help='segment these PNG/JPEG files, folders '
        '(recursively) or globs instead; no labels needed')
    add('--scale', type=int, nargs=2, metavar=('W', 'H'), help='with --images: rescale to fit '
        'W x H, keeping the aspect ratio (default 2048 1024)')
    add('--mode', choices=('whole', 'slide'), default='whole',
        help='whole image (the reference) or sliding 1024 x 1024 windows')
    add('--aug-test', action='store_true', help='multi-scale (0.5-1.75) + flip, softmax averaged')
    add('--out-dir', help='label PNGs here (Cityscapes: labelIds; else palette PNGs of train ids)')
    add('--show-dir', help='colour pictures of the predictions here')
    add('--json', help='the metrics here (mIoU, mAcc, aAcc, per class)')
    add('--device', choices=('auto', 'npu', 'cuda', 'cpu'), default='auto')
    add('--device_list', help='Ascend scripts\' device ids, e.g. 0,1,2,3')
    add('--amp', action='store_true', help='autocast')
    add('--amp-dtype', choices=('fp16', 'bf16'), default='fp16')
    add('--compile', action='store_true', help='torch.compile the fast path')
    add('--threads', type=int, help='CPU threads (default all cores)')
    add('--workers', type=int, default=4, help='data loading processes')
    add('--cache-dir', help='read images through train.py\'s decoded cache')
    add('--trust-pickle', action='store_true', help='load a checkpoint holding pickled objects '
        '(runs their code)')
    add('--prof_test', action='store_true', help='profile a few images into --prof-dir')
    add('--prof-dir', default='output/prof_test')
    add('--benchmark', action='store_true', help='time inference at 1024 x 2048, random input')
    add('--backbone', choices=('resnet18', 'resnet50'), default='resnet18',
        help='model for --benchmark without --ckpt')
    add('--batch-size', type=int, default=1, help='with --benchmark: images per forward pass')
    return parser


MOVED = {'--video': 'tools/video.py', '--onnx': 'tools/run_onnx.py',      # to the tools
         '--export-onnx': 'tools/export_onnx.py', '--int8': 'tools/export_onnx.py'}


def check_args(args):
    """Flag combinations that cannot work, each refused in one line before any work."""
    if not (args.benchmark or args.ckpt):
        raise SetupError('--ckpt is required (or --benchmark for a timing run)')
    for name, least in (('workers', 0), ('batch_size', 1)):
        if getattr(args, name) < least:
            raise SetupError(f'--{name.replace("_", "-")} must be at least {least}, not '
                             f'{getattr(args, name)}')
    if args.batch_size != 1 and not args.benchmark:
        raise SetupError('--batch-size goes with --benchmark: evaluation runs one image at a '
                         'time')
    if args.scale and not args.images:
        raise SetupError('--scale applies to --images only (data sets are evaluated at their '
                         'own size)')
    if args.scale and min(args.scale) <= 0:
        raise SetupError(f'--scale takes a positive width and height, not {args.scale[0]} '
                         f'{args.scale[1]}')


def output_folders(args):
    """(--out-dir, --show-dir), made first; with neither, pictures go to output/segmented."""
    show_dir = args.show_dir or (None if args.out_dir else 'output/segmented')
    for flag, folder in (('--out-dir', args.out_dir), ('--show-dir', show_dir)):
        if folder:
            make_dir(folder, flag)
    return args.out_dir, show_dir


def run_images(args, runtime, model, source):
    """--images: label maps and/or pictures; status 1 if any file could not be read."""
    paths = find_images(args.images)
    out_dir, show_dir = output_folders(args)
    scale = tuple(args.scale or TEST_SCALE)
    writes = [f'{what} to {folder}' for what, folder in (('label maps', out_dir),
                                                         ('pictures', show_dir)) if folder]
    runtime.print0(f'segmenting {len(paths)} images with {source} ({model.num_classes} classes), '
                   f'{args.mode}{" + ms/flip" if args.aug_test else ""}, fit to {scale[0]} x '
                   f'{scale[1]}, {runtime.device}, {runtime.precision}; writing '
                   f'{" and ".join(writes)}')
    failed = segment_images(model, paths, runtime, args.mode, args.aug_test, out_dir, show_dir,
                            args.workers, log=runtime.print0, scale=scale)
    if failed:
        fail(f'error: {len(failed)} of the images could not be read (named above); the others '
             f'were written')


def run_evaluation(args, runtime, model, source):
    """The metric on --data-path's --split, its table, and the outputs asked for."""
    for flag, folder in (('--out-dir', args.out_dir), ('--show-dir', args.show_dir),
                         ('--prof-dir', args.prof_test and args.prof_dir)):
        if folder:                          # fail now, not after the evaluation
            make_dir(folder, flag)
    if args.json:
        output_file(args.json, '--json')
    if args.data_path is None and not Path(DEFAULT_DATA_PATH).exists():
        raise SetupError(f'no data set to evaluate on: give --data-path ROOT (the default, '
                         f'{DEFAULT_DATA_PATH}, does not exist), or --images FILES')
    root = args.data_path or DEFAULT_DATA_PATH
    dataset = data.SegmentationDataset(root, args.split, data.EvalTransform(on_device=True),
                                       args.cache_dir)
    if model.num_classes != len(dataset.classes):
        raise SetupError(f'{source} predicts {model.num_classes} classes but {root} has '
                         f'{len(dataset.classes)}: evaluate a model trained on this data set')
    if dataset.cache_note:
        runtime.print0(dataset.cache_note)
    limit = 8 if args.prof_test else None           # a few images are enough to profile
    runtime.print0(f'evaluating {source} ({model.backbone_name}, {model.num_classes} classes) '
                   f'on {min(len(dataset), limit or len(dataset))} images of {root}/'
                   f'{args.split}, {args.mode}{" + ms/flip" if args.aug_test else ""}, '
                   f'{runtime.device}, {runtime.precision}, {runtime.world_size} process(es)')
    with runtime.profiler(args.prof_dir) if args.prof_test else nullcontext() as profiler:
        metrics = evaluate(model, dataset, runtime, args.mode, args.aug_test, args.out_dir,
                           args.show_dir, args.workers, runtime.print0, profiler, limit)
    if profiler is not None:
        runtime.print0(f'profile trace written to {args.prof_dir}')
    if metrics['pixels'] == 0:                  # e.g. Cityscapes' test split
        runtime.print0('no labelled pixels: metrics skipped'
                       + (f' (predictions written to {args.out_dir})' if args.out_dir else ''))
        return
    runtime.print0(format_table(metrics, dataset.classes))
    if args.json and runtime.rank == 0:
        record = json.dumps(metrics_record(metrics, dataset.classes), indent=2) + '\n'
        save_bytes(args.json, record.encode())
    if metrics['skipped']:
        fail(f'error: {len(metrics["skipped"])} of the images could not be read (named above) '
             f'and are left out of these metrics: mend or remove them and run again')


def guarded(args, work, device=None):
    """work(runtime), one line for a user's error, Ctrl-C (130) or --compile (tools use it)."""
    runtime, Progress.latest = None, None
    try:
        if args.threads is not None and args.threads < 1:
            raise SetupError(f'--threads must be at least 1, not {args.threads}')
        if args.threads:
            torch.set_num_threads(args.threads)
        if device is not None:
            runtime = Runtime(device, args.amp, args.amp_dtype, args.device_list)
        work(runtime)
    except (bisenet.CheckpointError, data.DatasetError, SetupError) as e:
        fail(f'error: {one_line(e)}')
    except KeyboardInterrupt:
        fail(interrupted(), 130)                # the shell's status for SIGINT
    except Exception as e:
        # torch.compile compiles at the first call: a compiler's failures surface here.
        if getattr(args, 'compile', False) and type(e).__module__.startswith(
                ('torch._dynamo', 'torch._inductor')):
            cause = getattr(e, 'inner_exception', None) or e
            fail(f'error: --compile failed at the first image ({type(cause).__name__}: '
                 f'{one_line(cause)[:200]}); drop --compile')
        raise
    finally:
        if runtime is not None:
            runtime.close(finished=sys.exc_info()[0] is None)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    moved = [flag.split('=')[0] for flag in argv if flag.split('=')[0] in MOVED]
    if moved:
        fail(f'error: {moved[0]} is now python {MOVED[moved[0]]} (see tools/README.md)')
    args = get_args_parser().parse_args(argv)

    def work(runtime):
        check_args(args)
        log = runtime.print0
        if args.benchmark:
            model = (bisenet.model_from_checkpoint(args.ckpt, args.trust_pickle) if args.ckpt
                     else bisenet.BiSeNetV1(19, args.backbone))
            log(f'BiSeNetV1 {model.backbone_name}, {runtime.device}, {runtime.precision}')
            return benchmark(model, runtime, args.compile, batch=args.batch_size, log=log)
        model = prepare_for_inference(
            bisenet.model_from_checkpoint(args.ckpt, args.trust_pickle), runtime, args.compile)
        (run_images if args.images else run_evaluation)(args, runtime, model, args.ckpt)
    guarded(args, work, args.device)


if __name__ == '__main__':
    main()
