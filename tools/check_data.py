"""Look at every image and label of a data set folder (Cityscapes or your own) on all cores, and
name every problem with its file; or time the training data pipeline on it.

    python tools/check_data.py data/mine                        # classes, shares, every problem
    python tools/check_data.py data/cityscapes --splits val
    python tools/check_data.py data/cityscapes --bench          # data loading against a decode
    python tools/check_data.py data/cityscapes --bench --cache-dir /fast/cache

Exit status 1 when there is any problem.
"""
import argparse
import functools
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the project, from anywhere
from runtime import SetupError, fail  # noqa: E402  first: NumPy against torch
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
from data import all_cores  # noqa: E402
import eval as evaluation  # noqa: E402


def groups_of(details):
    """The labels that hold the same stray value or colour, grouped ({kind: {'labels', 'bad',
    'pixels', 'first': the first one's problem}}), and the other problems."""
    groups, others = {}, []
    for message, kind, bad, label in details:
        if kind is None:
            others.append(message)
            continue
        group = groups.setdefault(kind, {'labels': [], 'bad': 0, 'pixels': 0, 'first': message})
        group['labels'].append(label)
        group['bad'], group['pixels'] = group['bad'] + bad[0], group['pixels'] + bad[1]
    return groups, others


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
    """Every image and label of every split decoded and looked at, on all cores: prints per split
    the images, their sizes, each class's share of the pixels and every problem; returns how
    many problems."""
    layout = data.Layout(root)
    processes = processes or all_cores()
    source = (f'from {layout.classes_file}' if layout.classes_file
              else f'(the {layout.name} layout)')
    print(f'{root}: {len(layout.classes)} classes {source}')
    total, start, looked = 0, time.perf_counter(), 0
    for split in splits:
        try:
            samples, _, problems = layout.find(split)
        except data.DatasetError as e:
            print(f'{split}: problem: {e}')
            total += 1
            continue
        found = data.survey(layout, split, samples, processes=processes, decode=True)
        looked += found['looked']
        total += len(problems) + len(found['problems'])
        groups, others = groups_of(found['details'])
        problems += others
        sizes, pixels = found['sizes'], found['pixels']
        line = f'{split}: {len(samples)} images'
        if sizes:
            (w_min, h_min), (w_max, h_max) = np.min(sizes, 0), np.max(sizes, 0)
            line += f', {w_min}x{h_min} to {w_max}x{h_max} pixels'
        print(line)
        share = pixels / max(pixels.sum(), 1)
        rows = [(name, share[train_id]) for train_id, name in enumerate(layout.classes)]
        rows.append(('(ignored)', share[data.IGNORE_INDEX]))
        rows += [(f'value {value}: no class', group['bad'] / max(pixels.sum(), 1))
                 for (kind, value), group in groups.items() if kind == 'value']
        width = max(len(name) for name, _ in rows) + 2
        print(f'  {"class":<{width}}share of pixels')
        for name, value in rows:
            print(f'  {name:<{width}}{100 * value:6.2f}%')
        for kind, group in groups.items():              # one line for each stray value
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


def decode_files(sample):
    """A bare decode of a sample's image and label files: what benchmark_data compares the
    check with."""
    for path in sample[:2]:
        with Image.open(path) as image:
            image.load()


def benchmark_data(root, split='train', crop_size=(1024, 1024), count=20, cache_dir=None):
    """Per-image cost of a DataLoader worker (one thread) against a bare decode of the files;
    with cache_dir also the same worker reading a warm decoded-data cache, filled first; and
    the check against a bare decode of the images and labels, on all cores."""
    torch.set_num_threads(1)
    transform = data.TrainTransform(crop_size, on_device=True)
    dataset = data.SegmentationDataset(root, split, transform)
    indices = [i % len(dataset) for i in range(count)]

    def per_image(work):
        work(0, indices[0])                                      # warm-up
        start = time.perf_counter()
        for position, i in enumerate(indices):
            work(position, i)
        return (time.perf_counter() - start) / count

    decode = per_image(lambda _, i: decode_files(dataset.samples[i]))
    worker = per_image(lambda position, i: dataset[(i, (0, position))])
    print(f'{count} images of {root}/{split}, crop {crop_size[0]}x{crop_size[1]}, one thread')
    print(f'bare decode (image + label): {decode * 1e3:6.1f} ms per image')
    print(f'worker (read, decode, rescale, crop, flip, pad): {worker * 1e3:6.1f} ms per image '
          f'({worker / decode:.2f} x the decode)')
    if cache_dir is not None:
        cached = data.SegmentationDataset(root, split, transform, cache_dir)
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
        check = functools.partial(data.look_at, dataset.layout, decode=True)
        times = evaluation.time_alternately({        # four rounds, the first a warm-up
            'bare decode': lambda: pool.map(decode_files, samples, chunksize=chunk),
            'check': lambda: pool.map(check, samples, chunksize=chunk)}, rounds=4)
    bare, check = (min(times[name][1:]) / len(samples) for name in times)
    print(f'the check on {processes} processes: {check * 1e3:.2f} ms per image and label '
          f'against {bare * 1e3:.2f} ms for a bare decode of both ({check / bare:.2f} x)')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('root', metavar='ROOT', help='a data set folder')
    parser.add_argument('--splits', nargs='+', default=['train', 'val'])
    parser.add_argument('--bench', action='store_true', help='time the training data pipeline')
    parser.add_argument('--crop-size', type=int, nargs='+', default=[1024], metavar='S',
                        help='with --bench: the training crop, S (S x S) or H W')
    parser.add_argument('--count', type=int, default=20, help='with --bench: images to time')
    parser.add_argument('--cache-dir', help='with --bench: also time a worker reading a warm '
                        'decoded-data cache in this folder (filled first)')
    args = parser.parse_args(argv)
    try:
        if not args.bench:
            sys.exit(1 if check_data(args.root, args.splits) else 0)
        benchmark_data(args.root, crop_size=data.parse_crop_size(args.crop_size),
                       count=args.count, cache_dir=args.cache_dir)
    except (data.DatasetError, SetupError) as e:
        fail(f'error: {e}')
    except KeyboardInterrupt:
        fail('error: interrupted (Ctrl-C); the check wrote nothing', 130)


if __name__ == '__main__':
    main()
