"""A synthetic 2048 x 1024 Cityscapes-layout set for timing: leftImg8bit, gtFine labelIds (ours)
and labelTrainIds (mmsegmentation's). python make_data.py ROOT COUNT [WIDTH HEIGHT]"""
import multiprocessing, sys
from pathlib import Path
import numpy as np
from PIL import Image
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data

root, count = Path(sys.argv[1]), int(sys.argv[2])
size = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (2048, 1024)


def write(job):
    split, i = job
    image, label = data.synthetic_scene(np.random.default_rng(i + (10 ** 6 if split == 'val' else 0)), size)
    city = f'city{i % 4}'
    name = f'{city}_{i:06d}_000019'
    for folder, suffix, array in (('leftImg8bit', 'leftImg8bit', image),
                                  ('gtFine', 'gtFine_labelIds', label),
                                  ('gtFine', 'gtFine_labelTrainIds', data.TRAIN_IDS[label])):
        path = root / folder / split / city / f'{name}_{suffix}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)


if __name__ == '__main__':
    jobs = [('train', i) for i in range(count)] + [('val', i) for i in range(2)]
    with multiprocessing.Pool() as pool:
        pool.map(write, jobs, chunksize=1)
    print(f'{len(jobs)} images of {size[0]} x {size[1]} in {root}')
