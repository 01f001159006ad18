"""The data: Cityscapes (raw labelIds mapped to train ids as they load) first, from files to
augmented batches; then data sets of your own (classes.txt, images/, labels/), PASCAL VOC,
ADE20K, CVAT exports and split lists; a cache of decoded images; a synthetic set for demos.

    train = data.SegmentationDataset('data/cityscapes', 'train', data.TrainTransform((1024, 1024)))
    image, label = data.SegmentationDataset('data/cityscapes', 'val')[0]   # RGB, train ids
"""
import collections
import concurrent.futures
import contextlib
import errno
import functools
import io
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np

from runtime import SetupError  # first: it checks that this torch can run next to this NumPy
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from bisenet import CLASSES, PALETTE, default_palette  # noqa: E402


# ---- Errors in a data set folder -------------------------------------------------------------
class DatasetError(ValueError):
    """A data set that cannot be used as it is; a label's also says its `kind` (('value', V) or
    ('colour', (R, G, B))), its `bad` pixels (of how many) and its histogram (`counts`)."""

    def __init__(self, message, kind=None, bad=(0, 0), counts=None):
        super().__init__(message)
        self.kind, self.bad, self.counts = kind, bad, counts


def more(problems, root):
    """What follows the first of several problems in a one-line error."""
    if len(problems) == 1:
        return ''
    return (f' (and {len(problems) - 1} more problems: python tools/check_data.py {root} lists '
            f'them all)')


# ---- Folders and files: made before any work, written whole or not at all --------------------
class OutputError(SetupError):
    """A file that cannot be written (a full disk, a read-only folder)."""


def size_text(size):
    return f'{size / 1e9:.1f} GB' if size >= 1e9 else f'{size / 1e6:.2f} MB'


def make_dir(path, flag):
    """The output folder `path` of `flag`, made and tried with a file before any work."""
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
    """The output file `path` of `flag`, checked before any work: no folder, a writable place."""
    path = Path(path)
    if path.is_dir():
        raise SetupError(f'{flag} {path} is a folder: give a file name')
    make_dir(path.parent, flag)
    return path


@contextlib.contextmanager
def written(path, needed=0):
    """A temporary name beside `path` to write to, renamed into place at the end: a kill or a
    full disk leaves the earlier file intact and nothing behind (OutputError says why)."""
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
    """The line for a file that could not be written: why, its size, the space free."""
    try:
        free = f'{size_text(shutil.disk_usage(Path(path).parent).free)} free there'
    except OSError:
        free = 'its folder cannot be read'
    need = f'it needs {size_text(needed)}, ' if needed else ''
    return (f'cannot write {path} ({getattr(error, "strerror", None) or error}): {need}{free}; '
            f'free some space or give a writable place, and {then}')


def save_bytes(path, data):
    """Write `data` to `path` whole, or not at all (written)."""
    with written(path, len(data)) as tmp:
        Path(tmp).write_bytes(data)


def tensor_bytes(state):
    """The bytes of the tensors in a checkpoint's nested dicts and lists."""
    if isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, (list, tuple)):
        return sum(map(tensor_bytes, state))
    return state.numel() * state.element_size() if torch.is_tensor(state) else 0


def image_bytes(image, format='PNG'):
    """A PIL image encoded in memory, for save_bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def all_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


# ---- Cityscapes: raw label ids and train ids -------------------------------------------------
LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
IGNORE_INDEX = 255
MEAN = (123.675, 116.28, 103.53)   # ImageNet RGB statistics, as the reference normalises
STD = (58.395, 57.12, 57.375)
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
EXIF_ORIENTATION = 0x0112
# What Pillow raises for a file it cannot read: damaged, not an image, or a decompression bomb.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


TRAIN_IDS = np.full(256, IGNORE_INDEX, np.uint8)         # raw label id -> train id (or 255)
TRAIN_IDS[list(LABEL_IDS)] = np.arange(len(LABEL_IDS))
TRAIN_IDS_LIST = TRAIN_IDS.tolist()      # the form PIL's Image.point takes


def lookup_table(values, fill=0):
    """A 256-entry uint8 table of `values`, `fill` past them (train ids to colours or ids)."""
    values = np.asarray(values, np.uint8)
    table = np.full((256,) + values.shape[1:], fill, np.uint8)
    table[:len(values)] = values
    return table


def cityscapes_label_ids(classes):
    """Each train id's raw Cityscapes label id (what its benchmark reads); None for others."""
    return LABEL_IDS if tuple(classes) == CLASSES else None


ClassList = collections.namedtuple('ClassList',
                                   'names palette ignore_colours all_coloured id_table')
ClassList.__doc__ = """What labels mean: names in train-id order, colours, ignored colours,
whether every class has a colour (to read colour labels), and the index labels' id table."""
CITYSCAPES = ClassList(CLASSES, PALETTE, (), True, None)


# ---- A data set folder: where a split's images and labels are, and what the labels mean ------
Sample = collections.namedtuple('Sample', 'image label id_table')
Sample.__doc__ = """An image file, its label file, and the table (None: none) that turns the
label's values into train ids."""


def files_below(folder, suffix=''):
    """Every file below `folder` ending in `suffix`, sorted; symlinked folders followed (data
    sets are often laid out by links), each real folder once."""
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
    """Cityscapes: leftImg8bit/SPLIT/[CITY/]NAME_leftImg8bit.png beside gtFine/SPLIT/[CITY/]
    NAME_gtFine_labelIds.png (raw ids) or _labelTrainIds.png; what pair_up takes."""
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


def pair_up(images, labels, expected_label, expected_image, problems):
    """(samples, their names, every problem) of a split: images {name: path}, labels {name:
    (path, id table)}, where a missing one is expected, and the problems so far."""
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
    """A data set folder: its layout (where a split's files are), what its labels mean and how
    a label becomes train ids: an index image (L or P; 255: ignore) or colours (RGB)."""

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
        """(samples, their output names, the problems pairing them up) of a split."""
        files = cityscapes_files if self.cityscapes else voc_files if self.voc else own_files
        return pair_up(*files(self, split))

    def read_label(self, path, id_table=None, pixels=True):
        """(train ids, a PIL L or P image; their histogram) of a label file; a value that is no
        class nor 255 is DatasetError. pixels=False: the histogram only, the label as stored."""
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
        # Without pixels Pillow counts the colours (fast); else each pixel goes through a table.
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


# ---- The one reader of a sample, and its checks ----------------------------------------------
def exif_orientation(image):
    """An opened file's EXIF orientation from its header (1: as stored; a PNG's trailing EXIF:
    1, since finding it means decoding)."""
    if image.format == 'PNG' and 'exif' not in image.info:
        return 1
    return image.getexif().get(EXIF_ORIENTATION, 1)


def image_header(path):
    """(size as its EXIF orientation turns it, size as stored) of an image, from its header."""
    try:
        with Image.open(path) as image:
            stored_size = image.size
            turned = exif_orientation(image) in (5, 6, 7, 8)
    except IMAGE_ERRORS as e:
        raise DatasetError(f'cannot read {path}: {e}') from None
    return (stored_size[::-1] if turned else stored_size), stored_size


def open_image(path):
    """(an image file as RGB, turned by its EXIF orientation as cv2 reads it; its stored size)."""
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


def read_sample(layout, sample, pixels=True):
    """(RGB image, train-id label (PIL), histogram) of a Sample, checked: the one reader. With
    pixels=False: the image's size from its header and the label as stored, at a decode's cost."""
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
    if size != label.size:
        rotated = (': the sizes match only without the image\'s EXIF rotation, so the label was '
                   'drawn on the unrotated image; rotate the label too, or save the image '
                   'without its EXIF orientation') if label.size == stored_size else ''
        raise DatasetError(f'{image_path} is {size[0]}x{size[1]} but its label {label_path} is '
                           f'{label.width}x{label.height}{rotated}')
    return image, label, counts


# ---- The data set and the sampler ------------------------------------------------------------
class SegmentationDataset(torch.utils.data.Dataset):
    """A split of a data set folder: (RGB uint8 (H, W, 3), train ids uint8 (H, W)) items, or
    transform(image, label, rng); a key is an index, or (index, rng_key) from InfiniteSampler,
    so that a sample's randomness follows its place in the stream. With cache_dir, samples are
    decoded once into a DecodedCache; `cache_note` says where and how large."""

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
        """The files sample `index` is decoded from (classes.txt too: it maps colours)."""
        sample, classes_file = self.samples[index], self.layout.classes_file
        return (sample.image, sample.label) + ((classes_file,) if classes_file else ())

    def size_cache(self):
        """Check that the cache fits on its disk (if not, go without it) and say how large."""
        total = missing = 0
        for index, sample in enumerate(self.samples):
            entry = self.cache.read(self.name(index), *self.sources(index))
            pixels = np.prod(image_header(sample.image)[1]) if entry is None else entry[1].size
            total += DecodedCache.HEADER + pixels * 4
            missing += (DecodedCache.HEADER + pixels * 4) * (entry is None)
        folder, free = self.cache.folder, shutil.disk_usage(self.cache.folder).free
        if missing > free - 2 ** 30:                      # leave the disk a GiB of room
            self.cache = None
            return (f'decoded-data cache {folder}: {size_text(missing)} more are needed but '
                    f'{size_text(free)} are free: going without the cache')
        return (f'decoded-data cache {folder}: {len(self.samples)} images, {size_text(total)} '
                f'({size_text(missing)} still to write, as each image is first used)')

    def load(self, index):
        """(RGB image, train-id label) of sample `index`: views of its memory-mapped cache entry,
        which the transforms read region by region, or without a cache PIL images."""
        if self.cache is None:
            return self.decode(index)
        name, sources = self.name(index), self.sources(index)
        entry = self.cache.read(name, *sources)
        if entry is None:
            entry = self.cache.write(name, *self.decode(index), *sources)
        return entry

    def decode(self, index):
        image, label, _ = read_sample(self.layout, self.samples[index])
        return image, label

    def __getitem__(self, key):
        index, rng_key = key if isinstance(key, tuple) else (key, None)
        image, label = self.load(index)
        if self.transform is None:
            return np.array(image), np.array(label)
        return self.transform(image, label, np.random.default_rng(rng_key))

    def name(self, index):
        """The image's path below its split folder, without its suffix (or _leftImg8bit.png)."""
        return self.names[index]


Cityscapes = SegmentationDataset     # the name scripts know; Cityscapes is one of its layouts


class InfiniteSampler(torch.utils.data.Sampler):
    """One rank's endless training stream: a seeded permutation per epoch, of which rank r takes
    positions r, r + world_size, ...; keys (index, (seed, position)) make each sample's
    augmentation depend on its place alone, with any worker count and after a resume (`start`)."""

    def __init__(self, size, seed=0, rank=0, world_size=1, start=0):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.start = start

    def __iter__(self):
        epoch, order, step = -1, None, self.start
        while True:
            position = step * self.world_size + self.rank
            if position // self.size != epoch:
                epoch = position // self.size
                order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            yield int(order[position % self.size]), (self.seed, position)
            step += 1


# ---- The reference's augmentation: rescale, crop, flip; on the device, distortion ------------
def parse_crop_size(values):
    """The --crop-size flag's values as (h, w): one value S means S x S, two are H W."""
    if len(values) not in (1, 2) or min(values) <= 0:
        raise SetupError(f'--crop-size takes one positive size or H W, not '
                         f'{" ".join(map(str, values))}')
    return values[0], values[-1]


def accept_crop(label, cat_max_ratio=0.75):
    """The reference's crop rule: more than one class, none covering `cat_max_ratio` or more."""
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
    """The box (x1, y1, x2, y2) of a PIL image or a memory-mapped array (reading only it)."""
    if isinstance(image, Image.Image):
        return image.crop(box)
    x1, y1, x2, y2 = box
    return Image.fromarray(np.ascontiguousarray(image[y1:y2, x1:x2]))


def rescale_crop(image, size, scaled_size, box, resample):
    """`box` of `image` (PIL or array) rescaled from `size` to `scaled_size` as cv2.resize
    does, as a PIL image: only the source pixels the crop samples are read (and two around)."""
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
    """A PIL image or an array as a uint8 tensor, copied once (np.asarray's is read-only)."""
    if not isinstance(image, Image.Image):
        return torch.from_numpy(np.array(image))
    array = np.frombuffer(bytearray(image.tobytes()), np.uint8)
    return torch.from_numpy(array).view(image.height, image.width, -1).squeeze(2)


def pad_to(image, label, size):
    """uint8 (3, h, w) and (h, w) tensors, padded bottom-right to `size` with 0 and 255 (the
    reference pads after normalising: 0 there is 0 after)."""
    image, label = pixels(image).permute(2, 0, 1), pixels(label)
    if tuple(label.shape) == tuple(size):
        return image, label
    image_out = torch.zeros(3, *size, dtype=torch.uint8)
    label_out = torch.full(size, IGNORE_INDEX, dtype=torch.uint8)
    image_out[:, :image.shape[1], :image.shape[2]] = image
    label_out[:label.shape[0], :label.shape[1]] = label
    return image_out, label_out


def photometric_params(rng, valid_size):
    """One sample's photometric distortion, drawn as the reference draws it (each step with p
    0.5, hue an integer in [-18, 18)), as float32: a batch of them is one pinned copy."""
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
    """The pipeline's constants, made once per device (from Python numbers: a blocking copy)."""
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
    """Photometric distortion, normalisation and zero padding of a uint8 RGB batch on its device,
    by the collated photometric_params (on the CPU, pinned): brightness, contrast (first or last),
    saturation and hue, rounded to uint8 after each step as the reference. Nothing waits for
    the device: the copies do not block, and decisions read the CPU-side parameters."""
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
        hue_shifted = torch.remainder(hsv[:, :1] + torch.nan_to_num(hue), 180)
        shifted = torch.cat([hue_shifted, hsv[:, 1:]], 1)
        x = torch.where(hue.isnan(), x, hsv_to_rgb(shifted))
    x = torch.where(contrast_first, x, to_uint8(x * contrast))
    x = normalize(x)
    sizes = params['size'].to(images.device, non_blocking=True)
    rows = torch.arange(x.shape[2], device=x.device)[None, :, None] < sizes[:, 0, None, None]
    cols = torch.arange(x.shape[3], device=x.device)[None, None, :] < sizes[:, 1, None, None]
    return x * (rows & cols)[:, None].to(x.dtype)


class TrainTransform:
    """The reference's augmentation: rescale by a ratio in `ratio_range` (image bilinear, label
    nearest), a `crop_size` crop re-drawn up to 10 times until accept_crop, a flip with p 0.5,
    photometric distortion, normalisation, padding; only the crop region is ever resized.
    Returns (float32 image, int64 label); on_device: (uint8 image, uint8 label, params), the
    distortion left to distort_and_normalize on the accelerator, batched."""

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
    """The whole image normalised, its label int64; on_device: both uint8, for the device."""

    def __init__(self, on_device=False):
        self.on_device = on_device

    def __call__(self, image, label, rng=None):
        width, height = image_size(image)
        image, label = pad_to(image, label, (height, width))
        if self.on_device:
            return image, label
        return normalize(image[None])[0], label.long()


def padding_share(sizes, crop_size, ratio_range=(0.5, 2.0), steps=64):
    """The mean share of a training crop that is padding, over images of these (w, h) sizes and
    the rescale ratios TrainTransform draws."""
    crop_h, crop_w = crop_size
    ratios = ratio_range[0] + (np.arange(steps) + 0.5) / steps * (ratio_range[1] - ratio_range[0])
    sizes = np.array(sizes, np.float64)[:, None, :]
    scaled_w = np.floor(sizes[..., 0] * ratios + 0.5)
    scaled_h = np.floor(sizes[..., 1] * ratios + 0.5)
    covered = np.minimum(scaled_w, crop_w) * np.minimum(scaled_h, crop_h) / (crop_w * crop_h)
    return float(1 - covered.mean())


# ---- Other layouts: your own classes.txt, PASCAL VOC, ADE20K, CVAT, split lists --------------
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
    """classes.txt's ClassList: 'NAME [R G B]' a line in train-id order; 'ignore: [NAME] R G B'
    or 'ignore: [NAME] VALUE' for pixels to ignore; 'reduce_zero_label' for labels counting
    from 1 (ADE20K); '#' comments."""
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
    """CVAT's labelmap.txt ('NAME:R,G,B:PARTS:ACTIONS' a line): a ClassList of colours."""
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
    """Train ids of colours packed as R | G << 8 | B << 16 (ignored: 255, else UNLISTED)."""
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


def read_names(path):
    """The names of a split list (one a line, an image's path below its folder)."""
    names = [line.strip() for line in path.read_text(encoding='utf-8-sig').splitlines()]
    return [name[:-len(Path(name).suffix)] if Path(name).suffix.lower() in IMAGE_SUFFIXES
            else name for name in names if name and not name.startswith('#')]


def own_files(layout, split):
    """Your own: images/SPLIT/**/NAME.{png,jpg} beside labels/SPLIT/**/NAME.png (or ADE20K's
    annotations/training/...), or images/ and labels/ with splits/SPLIT.txt, for pair_up."""
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
    """PASCAL VOC 2012 and CVAT's "Segmentation mask" export: JPEGImages/NAME.jpg beside
    SegmentationClass/NAME.png, names in ImageSets/Segmentation/SPLIT.txt; for train also the
    augmented set (aug.txt, SegmentationClassAug/) as mmsegmentation's VOC-aug. For pair_up."""
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


# ---- Looking at labels before a run: train.py's quick look and the data check ----------------
def look_at(layout, sample, decode=False):
    """(image size, label histogram, None), or (None, histogram, (message, kind, bad pixels,
    label file)): a sample looked at, the image from its header, or decoded with `decode`."""
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


def forking(call, *args, **kwargs):
    """call(*args, **kwargs), which starts processes, with Ctrl-C held (in them it stays held):
    Python drops an error raised in fork's handlers, so one landing there is raised on return."""
    if not hasattr(signal, 'pthread_sigmask'):                           # POSIX only
        return call(*args, **kwargs)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return call(*args, **kwargs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def survey(layout, split, samples, limit=None, processes=1, decode=False):
    """Look at a split's samples (all, or `limit` spread over it) in `processes` processes:
    {'looked', 'sizes' [(w, h)], 'pixels' (per train id), 'problems' (one line each),
    'details' (look_at's problems), 'warnings' (trainable, but likely wrong)}."""
    count = len(samples)
    if limit is not None and limit < count:
        samples = [samples[i] for i in spread(count, limit)]
    work = functools.partial(look_at, layout, decode=decode)
    if processes > 1 and len(samples) > 1:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context('fork' if 'fork' in methods else None)
        chunk = max(1, min(8, len(samples) // (processes * 4)))   # Ctrl-C waits for those queued
        try:        # an executor, not a Pool: a killed process fails the map instead of hanging
            with concurrent.futures.ProcessPoolExecutor(
                    min(processes, len(samples)), mp_context=context,     # Ctrl-C: the caller's
                    initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
                results = list(forking(pool.map, work, samples, chunksize=chunk))
        except concurrent.futures.process.BrokenProcessPool:
            raise SetupError(f'a process looking at the {split} labels died (killed, most '
                             f'likely for memory): run again, or with fewer --workers') from None
    else:
        results = [work(sample) for sample in samples]
    pixels, sizes, details = np.zeros(256, np.int64), [], []
    for size, counts, problem in results:
        if counts is not None:              # also a label with a stray value or colour
            pixels += counts
        if problem is None:
            sizes.append(size)
        else:
            details.append(problem)
    problems = [problem[0] for problem in details]
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
        details.append((problems[-1], None, None, None))
    elif sizes:
        absent = [name for i, name in enumerate(classes) if not pixels[i]]
        if absent:
            warnings_.append(f'class {", ".join(repr(n) for n in absent)} never occurs in '
                             f'{looked}: the model cannot learn it')
    return {'looked': len(samples), 'sizes': sizes, 'pixels': pixels, 'problems': problems,
            'details': details, 'warnings': warnings_}


# ---- Decode each image once: the cache -------------------------------------------------------
class DecodedCache:
    """Each sample's RGB pixels and train ids, uint8, in a file of its own, written on first use
    (to a temporary name: workers and ranks fill it at once) and memory-mapped after: a worker
    reads its crop's rows, the page cache serves every process. A 4 KiB header names the source
    files, sizes and times; a stale or damaged entry is rebuilt, never read as pixels."""
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
            pixels = np.memmap(path, np.uint8, 'r', offset=self.HEADER)   # image, then label
            return (pixels[:height * width * 3].reshape(height, width, 3),
                    pixels[height * width * 3:].reshape(height, width))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, name, image, label, *source_paths):
        """Store a decoded sample and return it; a failed write (a full disk) costs only speed."""
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


# ---- A synthetic Cityscapes-layout set, for demos and tests ----------------------------------
def synthetic_scene(rng, size=(256, 128)):
    """A street-like scene (RGB, raw labelIds): bands of sky, building, sidewalk and road with
    objects on them, each class in its colour plus noise, so colour and layout both teach."""
    w, h = size
    train = np.zeros((h, w), np.uint8)
    horizon, kerb, road = (int(h * rng.uniform(a, b))
                           for a, b in ((.15, .3), (.5, .6), (.65, .75)))
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
