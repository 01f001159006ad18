"""Tests of BiSeNetV1, its data pipeline, eval.py and train.py: real code paths on tiny inputs.

    python -m pytest -q test_bisenet.py          # about 4 minutes on 2 CPU cores

The command-line tests run the scripts as users do (subprocesses, torchrun with gloo on CPU)
where the process is the point, and short trainings in this process (run_here) elsewhere.
"""
import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import bisenet
import data as datalib
import eval as evaluation
import runtime
import train

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / 'tools'))
import check_data  # noqa: E402
import export_onnx  # noqa: E402
import run_onnx  # noqa: E402
import video as video_tool  # noqa: E402
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(HERE))

# mmsegmentation 1.2.2's BiSeNetV1 R-18 state dict, the entries outside its ResNet (which uses
# torchvision's names); BatchNorm buffers follow each bn's weight. Facts from the reference.
REFERENCE_KEYS = """
backbone.context_path.arm16.conv_layer.conv.weight 128,256,3,3
backbone.context_path.arm16.conv_layer.bn.weight 128
backbone.context_path.arm16.conv_layer.bn.bias 128
backbone.context_path.arm16.atten_conv_layer.1.conv.weight 128,128,1,1
backbone.context_path.arm16.atten_conv_layer.1.bn.weight 128
backbone.context_path.arm16.atten_conv_layer.1.bn.bias 128
backbone.context_path.arm32.conv_layer.conv.weight 128,512,3,3
backbone.context_path.arm32.conv_layer.bn.weight 128
backbone.context_path.arm32.conv_layer.bn.bias 128
backbone.context_path.arm32.atten_conv_layer.1.conv.weight 128,128,1,1
backbone.context_path.arm32.atten_conv_layer.1.bn.weight 128
backbone.context_path.arm32.atten_conv_layer.1.bn.bias 128
backbone.context_path.conv_head32.conv.weight 128,128,3,3
backbone.context_path.conv_head32.bn.weight 128
backbone.context_path.conv_head32.bn.bias 128
backbone.context_path.conv_head16.conv.weight 128,128,3,3
backbone.context_path.conv_head16.bn.weight 128
backbone.context_path.conv_head16.bn.bias 128
backbone.context_path.gap_conv.1.conv.weight 128,512,1,1
backbone.context_path.gap_conv.1.bn.weight 128
backbone.context_path.gap_conv.1.bn.bias 128
backbone.spatial_path.layer1.conv.weight 64,3,7,7
backbone.spatial_path.layer1.bn.weight 64
backbone.spatial_path.layer1.bn.bias 64
backbone.spatial_path.layer2.conv.weight 64,64,3,3
backbone.spatial_path.layer2.bn.weight 64
backbone.spatial_path.layer2.bn.bias 64
backbone.spatial_path.layer3.conv.weight 64,64,3,3
backbone.spatial_path.layer3.bn.weight 64
backbone.spatial_path.layer3.bn.bias 64
backbone.spatial_path.layer4.conv.weight 128,64,1,1
backbone.spatial_path.layer4.bn.weight 128
backbone.spatial_path.layer4.bn.bias 128
backbone.ffm.conv1.conv.weight 256,256,1,1
backbone.ffm.conv1.bn.weight 256
backbone.ffm.conv1.bn.bias 256
backbone.ffm.conv_atten.0.conv.weight 256,256,1,1
backbone.ffm.conv_atten.0.bn.weight 256
backbone.ffm.conv_atten.0.bn.bias 256
decode_head.conv_seg.weight 19,256,1,1
decode_head.conv_seg.bias 19
decode_head.convs.0.conv.weight 256,256,3,3
decode_head.convs.0.bn.weight 256
decode_head.convs.0.bn.bias 256
auxiliary_head.0.conv_seg.weight 19,64,1,1
auxiliary_head.0.conv_seg.bias 19
auxiliary_head.0.convs.0.conv.weight 64,128,3,3
auxiliary_head.0.convs.0.bn.weight 64
auxiliary_head.0.convs.0.bn.bias 64
auxiliary_head.1.conv_seg.weight 19,64,1,1
auxiliary_head.1.conv_seg.bias 19
auxiliary_head.1.convs.0.conv.weight 64,128,3,3
auxiliary_head.1.convs.0.bn.weight 64
auxiliary_head.1.convs.0.bn.bias 64
"""
# The official Cityscapes table (cityscapesscripts labels.py): label id -> train id.
OFFICIAL_TRAIN_IDS = {0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255,
                      10: 255, 11: 2, 12: 3, 13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255,
                      19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15,
                      29: 255, 30: 255, 31: 16, 32: 17, 33: 18}


def run(script, *args, check=True, timeout=240, threads=1):
    """Run a project script as a user would; returns the CompletedProcess. One thread unless
    told (the same float sums in every process); inference-heavy checks that compare within
    a tolerance take both cores."""
    result = subprocess.run([sys.executable, str(HERE / script), *map(str, args)],
                            env=dict(ENV, OMP_NUM_THREADS=str(threads)), capture_output=True,
                            text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def torchrun(script, *args, nproc=2):
    """Run a project script under torchrun with `nproc` CPU processes (gloo)."""
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                             f'--nproc_per_node={nproc}', str(HERE / script), *map(str, args)],
                            env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_here(module, *args, check=False):
    """A script's main() run in this process, on one thread as `run` runs it: what `run`
    returns, without a new interpreter's start (torch's import, seconds each). Where the
    process itself is the point (signals, kills, torchrun, one case of each script as users
    run it), the tests use `run`."""
    threads, out, err = torch.get_num_threads(), io.StringIO(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(threads)
    if isinstance(code, str):
        err.write(f'{code}\n')
    result = subprocess.CompletedProcess(args, 1 if isinstance(code, str) else code or 0,
                                         out.getvalue(), err.getvalue())
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_here(*args, check=True):
    """train.py's main() in this process (run_here)."""
    return run_here(train, *args, check=check)


def assert_one_line_error(result, *words):
    """A user error: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:'), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """A tiny synthetic Cityscapes (raw labelIds, city folders)."""
    return datalib.make_synthetic_cityscapes(tmp_path_factory.mktemp('cityscapes'), num_train=8,
                                             num_val=4, size=(128, 64), seed=1)


def random_state(model, seed=0):
    """Random weights and BatchNorm statistics, so that tests see more than the init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                noise = torch.rand(value.shape, generator=g) + 0.5 if 'running_var' in name \
                    else torch.randn(value.shape, generator=g) * 0.1
                value.copy_(noise)
    return model


# ---- Model -----------------------------------------------------------------------------------


def test_parameter_counts_equal_the_reference():
    for backbone, expected in (('resnet18', 13_425_721), ('resnet50', 59_243_385)):
        model = bisenet.BiSeNetV1(19, backbone)
        assert sum(p.numel() for p in model.parameters()) == expected
    heads = sum(p.numel() for p in bisenet.BiSeNetV1().auxiliary_head.parameters())
    assert 13_425_721 - heads == 13_275_539


def test_output_shapes_for_odd_input_sizes():
    model = bisenet.BiSeNetV1(19)
    x = torch.randn(2, 3, 75, 101)
    decode, aux8, aux16 = model.train()(x)
    assert decode.shape == aux8.shape == (2, 19, 10, 13)      # stride 8, rounded up
    assert aux16.shape == (2, 19, 5, 7)                       # stride 16
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 19, 75, 101)


def test_gradients_reach_every_parameter():
    model = random_state(bisenet.BiSeNetV1(5)).train()   # random: zero-init BNs block grads
    loss = sum(out.square().mean() for out in model(torch.randn(2, 3, 64, 96)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_names_and_shapes_follow_the_reference_key_list():
    own = bisenet.BiSeNetV1().state_dict()
    assert len(own) == 222
    for line in REFERENCE_KEYS.strip().splitlines():
        key, shape = line.split()
        shape = tuple(int(s) for s in shape.split(',') if s)
        assert tuple(own[key].shape) == shape, key
        if key.endswith('bn.weight') or key.endswith('.bn.bias'):
            prefix = key[:-len(key.split('.')[-1])]
            assert prefix + 'running_mean' in own and prefix + 'num_batches_tracked' in own


def test_reference_layout_checkpoint_loads_strictly_and_round_trips(tmp_path):
    model = random_state(bisenet.BiSeNetV1().eval())
    mmseg_file = tmp_path / 'mmseg.pth'        # mmsegmentation's layout: meta + state_dict
    torch.save({'meta': {'CLASSES': bisenet.CLASSES, 'iter': 160000},
                'state_dict': model.state_dict(), 'optimizer': {}}, mmseg_file)
    loaded = bisenet.load_checkpoint(bisenet.BiSeNetV1(), mmseg_file).eval()
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    ours = tmp_path / 'ours.pth'               # our layout, saved from a DDP wrapper
    torch.save({'model': {'module.' + k: v for k, v in model.state_dict().items()},
                'iteration': 3}, ours)
    again = bisenet.model_from_checkpoint(ours).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_checkpoint_of_another_model_or_class_count_is_refused(tmp_path):
    torch.save({'state_dict': bisenet.BiSeNetV1(21).state_dict()}, tmp_path / 'c21.pth')
    with pytest.raises(bisenet.CheckpointError, match='shape mismatch.*decode_head.conv_seg'):
        bisenet.load_checkpoint(bisenet.BiSeNetV1(19), tmp_path / 'c21.pth')
    torch.save({'state_dict': bisenet.BiSeNetV1(19, 'resnet50').state_dict()}, tmp_path / 'r50.pth')
    with pytest.raises(bisenet.CheckpointError, match='is a resnet50 .* run with --backbone resnet50'):
        bisenet.load_checkpoint(bisenet.BiSeNetV1(19), tmp_path / 'r50.pth')
    torch.save(bisenet.ResNet('resnet50').state_dict(), tmp_path / 'imagenet50.pth')
    with pytest.raises(bisenet.CheckpointError, match='are a resnet50, .* --backbone resnet50'):
        bisenet.load_imagenet_backbone(bisenet.BiSeNetV1(19), tmp_path / 'imagenet50.pth')
    torch.save({'fc.weight': torch.zeros(3, 3)}, tmp_path / 'other.pth')
    with pytest.raises(bisenet.CheckpointError, match='222 missing.*1 unexpected: fc.weight'):
        bisenet.load_checkpoint(bisenet.BiSeNetV1(19), tmp_path / 'other.pth')
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(bisenet.CheckpointError, match='not a PyTorch checkpoint'):
        bisenet.load_checkpoint(bisenet.BiSeNetV1(19), tmp_path / 'junk.pth')


def test_checkpoint_config_is_read_from_the_checkpoint(tmp_path):
    torch.save({'state_dict': bisenet.BiSeNetV1(7, 'resnet50').state_dict()}, tmp_path / 'c.pth')
    model = bisenet.model_from_checkpoint(tmp_path / 'c.pth')
    assert (model.backbone_name, model.num_classes) == ('resnet50', 7)


def test_imagenet_backbone_loader(tmp_path):
    resnet = random_state(bisenet.ResNet('resnet18'))
    weights = dict(resnet.state_dict(), **{'fc.weight': torch.zeros(1000, 512),
                                           'fc.bias': torch.zeros(1000)})   # torchvision format
    torch.save(weights, tmp_path / 'resnet18.pth')
    model = bisenet.load_imagenet_backbone(bisenet.BiSeNetV1(), tmp_path / 'resnet18.pth')
    for key, value in resnet.state_dict().items():
        assert torch.equal(model.backbone.context_path.backbone.state_dict()[key], value)
    del weights['layer4.1.conv2.weight']
    torch.save(weights, tmp_path / 'broken.pth')
    with pytest.raises(bisenet.CheckpointError, match='missing: layer4.1.conv2.weight'):
        bisenet.load_imagenet_backbone(bisenet.BiSeNetV1(), tmp_path / 'broken.pth')


def test_fast_inference_path_equals_the_plain_model():
    model = random_state(bisenet.BiSeNetV1().eval())
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = torch.randn(1, 3, 67, 123)
    with torch.no_grad():
        plain = model(x)
        fast_model = evaluation.prepare_for_inference(model, runtime.Runtime('cpu'))
        fast = fast_model(x.contiguous(memory_format=torch.channels_last))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast_model.modules())
    assert batch_norms == [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert (fast - plain).abs().max() <= 1e-4 * plain.abs().max()
    assert (fast.argmax(1) == plain.argmax(1)).float().mean() > 0.999


def test_benchmark_times_the_plain_model_against_the_fast_path():
    model, lines = bisenet.BiSeNetV1().eval(), []
    evaluation.benchmark(model, runtime.Runtime('cpu'), size=(64, 128), warmup=1, rounds=2,
                         log=lines.append)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())   # really plain
    assert lines[0].startswith('plain model') and lines[1].startswith('fast path')
    assert 'channels_last' in lines[2] and float(lines[2].split(': ')[1].split(' x')[0]) > 0
    assert lines[-1].startswith('FPS: ') and float(lines[-1].split()[1]) > 0


# ---- Data ------------------------------------------------------------------------------------


def test_label_map_is_the_official_table():
    for label_id, train_id in OFFICIAL_TRAIN_IDS.items():
        assert datalib.TRAIN_IDS[label_id] == train_id, label_id
    assert (datalib.TRAIN_IDS[34:] == 255).all()
    assert len(bisenet.CLASSES) == len(bisenet.PALETTE) == 19


def write_pair(root, split, stem, label_suffix='labelIds', size=(40, 20), value=7):
    for folder, suffix, array in (('leftImg8bit', 'leftImg8bit', np.zeros((size[1], size[0], 3), np.uint8)),
                                  ('gtFine', f'gtFine_{label_suffix}', np.full((size[1], size[0]), value, np.uint8))):
        path = root / folder / split / f'{stem}_{suffix}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)


def test_layouts_official_and_flat_with_extra_files(tmp_path):
    official, flat = tmp_path / 'official', tmp_path / 'flat'
    write_pair(official, 'train', 'aachen/aachen_000000_000019', value=26)        # car
    write_pair(official, 'train', 'bonn/bonn_000001_000019', 'labelTrainIds', value=13)
    for extra in ('gtFine_color.png', 'gtFine_instanceIds.png', 'gtFine_polygons.json'):
        (official / 'gtFine' / 'train' / 'aachen' / f'aachen_000000_000019_{extra}').write_bytes(b'x')
    dataset = datalib.Cityscapes(official, 'train')
    assert len(dataset) == 2
    assert [dataset.name(i) for i in range(2)] == ['aachen/aachen_000000_000019',
                                                   'bonn/bonn_000001_000019']
    for i in range(2):
        image, label = dataset[i]
        assert image.shape == (20, 40, 3) and image.dtype == np.uint8
        assert label.shape == (20, 40) and (label == 13).all()     # raw 26 and train id 13: car
    write_pair(flat, 'val', 'frankfurt_000000_000294', value=3)      # raw 3: ignored
    assert (datalib.Cityscapes(flat, 'val')[0][1] == 255).all()


def test_broken_data_sets_fail_with_the_path(tmp_path):
    with pytest.raises(datalib.DatasetError, match='does not exist'):
        datalib.Cityscapes(tmp_path / 'nowhere')
    write_pair(tmp_path, 'train', 'a/a_0_0')
    with pytest.raises(datalib.DatasetError, match='leftImg8bit/val is missing'):
        datalib.Cityscapes(tmp_path, 'val')
    (tmp_path / 'leftImg8bit' / 'test').mkdir()
    (tmp_path / 'gtFine' / 'test').mkdir()
    with pytest.raises(datalib.DatasetError, match='no \\*_leftImg8bit.png images'):
        datalib.Cityscapes(tmp_path, 'test')
    write_pair(tmp_path, 'train', 'a/a_1_0')
    (tmp_path / 'gtFine' / 'train' / 'a' / 'a_1_0_gtFine_labelIds.png').unlink()
    with pytest.raises(datalib.DatasetError, match='label missing for .*a_1_0_leftImg8bit.png'):
        datalib.Cityscapes(tmp_path, 'train')
    write_pair(tmp_path, 'train', 'a/a_1_0')
    (tmp_path / 'leftImg8bit' / 'train' / 'a' / 'a_1_0_leftImg8bit.png').write_bytes(b'\x89PNG junk')
    with pytest.raises(datalib.DatasetError, match='cannot read .*a_1_0_leftImg8bit.png'):
        datalib.Cityscapes(tmp_path, 'train')[1]


def test_crop_rule():
    assert not datalib.accept_crop(np.full((10, 10), 3, np.uint8))             # one class
    label = np.full((10, 10), 3, np.uint8)
    label[:2] = 5                                                               # 80 % class 3
    assert not datalib.accept_crop(label)
    label[:3] = 5                                                               # 70 %
    assert datalib.accept_crop(label)
    label[:5] = 255                                                             # 3 vs 2 labelled
    label[5:7] = 5
    assert datalib.accept_crop(label)
    label[5:6] = 255
    assert not datalib.accept_crop(label)                                       # 3 vs 1: 75 %


def test_train_transform_outputs(data):
    dataset = datalib.Cityscapes(data, 'train', datalib.TrainTransform((96, 96)))
    for position in range(6):
        image, label = dataset[(position % len(dataset), (0, position))]
        assert image.shape == (3, 96, 96) and image.dtype == torch.float32
        assert label.shape == (96, 96) and label.dtype == torch.int64
        assert image.min() >= -2.2 and image.max() <= 2.7          # normalised 0..255
        assert set(label.unique().tolist()) <= set(range(19)) | {255}
    # Smaller than the crop (64 rows at ratio <= 1): padded with 0 and 255 at the bottom
    dataset.transform = datalib.TrainTransform((200, 300), ratio_range=(0.5, 0.5), on_device=True)
    image, label, params = dataset[(0, (0, 0))]
    assert image.dtype == torch.uint8 and image.shape == (3, 200, 300)
    assert params['size'].tolist() == [32, 64]
    assert (image[:, 32:] == 0).all() and (label[32:] == 255).all() and (label[:, 64:] == 255).all()
    batch = torch.utils.data.default_collate([dataset[(0, (0, 0))]])
    normalised = datalib.distort_and_normalize(batch[0], batch[2])
    assert (normalised[0, :, 32:] == 0).all() and (normalised[0, :, :, 64:] == 0).all()


def test_samples_are_the_same_with_any_worker_count_and_after_a_resume(data):
    dataset = datalib.Cityscapes(data, 'train', datalib.TrainTransform((64, 64), on_device=True))

    def batches(workers, start=0, count=4):
        sampler = datalib.InfiniteSampler(len(dataset), seed=3, start=start)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler,
                                             num_workers=workers)
        return [batch for _, batch in zip(range(count), loader)]
    zero, two, resumed = batches(0), batches(2), batches(0, start=4, count=2)
    for a, b in zip(zero, two):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(zero[2:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(zero[0][0], zero[1][0])
    other_seed = datalib.InfiniteSampler(len(dataset), seed=4)
    assert [k for _, k in zip(range(8), other_seed)] != [k for _, k in zip(range(8), datalib.InfiniteSampler(len(dataset), seed=3))]


def cached_and_plain(data, cache_dir, transform):
    return (datalib.Cityscapes(data, 'train', transform, cache_dir=cache_dir),
            datalib.Cityscapes(data, 'train', transform))


def assert_same_samples(a, b, positions=range(8)):
    for position in positions:
        key = (position % len(b), (7, position))
        for x, y in zip(a[key], b[key]):
            if isinstance(x, dict):
                assert all(np.array_equal(x[k], y[k], equal_nan=True) for k in x), position
            else:
                assert torch.equal(x, y), position


def test_cached_samples_are_bitwise_those_of_the_files(data, tmp_path):
    for transform in (datalib.TrainTransform((48, 80), ratio_range=(0.5, 2.0), on_device=True),
                      datalib.TrainTransform((64, 64)), datalib.EvalTransform(on_device=True)):
        cached, plain = cached_and_plain(data, tmp_path / 'cache', transform)
        assert_same_samples(cached, plain)           # filling: decoded, written
        assert_same_samples(cached, plain)           # warm: read from the memory maps
    entries = sorted((tmp_path / 'cache' / 'train').rglob('*.rgbl'))
    assert len(entries) == len(plain)
    assert 'cache' in cached.cache_note and f'{len(plain)} images' in cached.cache_note
    image, label = cached.load(0)
    assert isinstance(image, np.memmap) and image.shape == (64, 128, 3) and label.shape == (64, 128)


def test_a_truncated_entry_or_a_changed_source_is_rebuilt(data, tmp_path):
    transform = datalib.TrainTransform((64, 64), on_device=True)
    cached, plain = cached_and_plain(data, tmp_path, transform)
    assert_same_samples(cached, plain)
    entry = cached.cache.path(cached.name(0))
    entry.write_bytes(entry.read_bytes()[:-100])                       # truncated
    assert cached.cache.read(cached.name(0), *cached.samples[0][:2]) is None
    assert_same_samples(cached, plain, positions=[0])
    assert entry.stat().st_size == 4096 + 64 * 128 * 4                  # rebuilt whole
    entry.write_bytes(b'garbage' * 100)                                  # not an entry at all
    assert_same_samples(cached, plain, positions=[0])
    # A new image under the same name (a different scene): the cache follows the file.
    copy = tmp_path / 'copy'
    shutil.copytree(data, copy)
    cached, plain = cached_and_plain(copy, tmp_path / 'cache2', transform)
    assert_same_samples(cached, plain, positions=[0])
    image, _ = datalib.synthetic_scene(np.random.default_rng(99), size=(128, 64))
    Image.fromarray(image).save(plain.samples[0][0])
    assert_same_samples(cached, plain, positions=[0])


def test_two_processes_filling_one_cache_at_once(data, tmp_path):
    # Each writer waits, before it renames its finished entry into place, until the other has
    # finished the same entry too: both temporary files exist at once, for every entry.
    script = ('import os, sys, time, data as datalib\n'
              'from pathlib import Path\n'
              'rename = os.replace\n'
              'def meet_then_rename(src, dst):\n'
              '    Path(f"{dst}.ready.{os.getpid()}").touch()\n'
              '    deadline = time.time() + 60\n'
              '    while len(list(Path(dst).parent.glob(Path(dst).name + ".ready.*"))) < 2 \\\n'
              '            and time.time() < deadline:\n'
              '        time.sleep(0.001)\n'
              '    rename(src, dst)\n'
              'os.replace = meet_then_rename\n'
              'd = datalib.Cityscapes(sys.argv[1], "train", cache_dir=sys.argv[2])\n'
              'for r in range(3):\n'
              '    for i in range(len(d)): d[i]\n')
    processes = [subprocess.Popen([sys.executable, '-c', script, str(data), str(tmp_path)],
                                  env=ENV, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    assert len(list(tmp_path.rglob('*.ready.*'))) == 2 * 8              # they met at every entry
    assert not list(tmp_path.rglob('*.tmp'))                            # no leftovers
    transform = datalib.TrainTransform((64, 64), on_device=True)
    cached, plain = cached_and_plain(data, tmp_path, transform)
    assert all(cached.cache.read(cached.name(i), *cached.samples[i][:2]) is not None
               for i in range(len(cached)))
    assert_same_samples(cached, plain)


def test_too_little_disk_for_the_cache_goes_without_it(data, tmp_path, monkeypatch):
    usage = datalib.shutil.disk_usage(tmp_path)._replace(free=10 ** 6)
    monkeypatch.setattr(datalib.shutil, 'disk_usage', lambda path: usage)
    dataset = datalib.Cityscapes(data, 'train', cache_dir=tmp_path)
    assert dataset.cache is None and 'going without the cache' in dataset.cache_note
    assert np.array_equal(dataset[0][1], datalib.Cityscapes(data, 'train')[0][1])


def test_sampler_shards_the_stream_between_ranks():
    def take(rank, world, n=12):
        return [k for _, k in zip(range(n), datalib.InfiniteSampler(10, 0, rank, world))]
    single = take(0, 1, 24)
    merged = [k for pair in zip(take(0, 2), take(1, 2)) for k in pair]
    assert merged == single
    assert sorted(i for i, _ in single[:10]) == list(range(10))       # an epoch: each once


def reference_distortion(image, p):
    """A straightforward per-image version of the reference's photometric distortion in numpy
    float32, with OpenCV's 8-bit HSV rounding and the textbook HSV formulas (chroma and sector),
    not the batched code's. Array maths only, so NumPy 1 and 2 promote alike."""
    def trunc(x):
        return np.floor(np.clip(x, 0, 255))
    def to_hsv(rgb):
        r, g, b = np.moveaxis(rgb, -1, 0)
        v, chroma = rgb.max(-1), rgb.max(-1) - rgb.min(-1)
        c = np.maximum(chroma, 1)
        degrees = np.select([chroma == 0, v == r, v == g],
                            [0 * v, (g - b) / c * 60, 120 + (b - r) / c * 60], 240 + (r - g) / c * 60)
        s = np.where(v > 0, np.floor(chroma / np.maximum(v, 1) * 255 + 0.5), 0)
        return np.stack([np.floor(degrees / 2 + 0.5) % 180, s, v], -1).astype(np.float32)
    def to_rgb(hsv):
        h, s, v = np.moveaxis(hsv, -1, 0)
        chroma = v * s / 255
        sector = h / 30                                           # 0-180 scale: 30 per sector
        x = chroma * (1 - np.abs(sector % 2 - 1))
        zero = 0 * v
        rgb = np.select([(sector < k)[..., None] for k in range(1, 7)],
                        [np.stack(t, -1) for t in ((chroma, x, zero), (x, chroma, zero),
                                                   (zero, chroma, x), (zero, x, chroma),
                                                   (x, zero, chroma), (chroma, zero, x))])
        return np.round(rgb + (v - chroma)[..., None]).astype(np.float32)
    x = image.astype(np.float32)
    x = trunc(x + np.float32(p['brightness']))
    if p['contrast_first']:
        x = trunc(x * np.float32(p['contrast']))
    if p['saturation'] > 0:
        hsv = to_hsv(x)
        hsv[..., 1] = trunc(hsv[..., 1] * np.float32(p['saturation']))
        x = to_rgb(hsv)
    if not np.isnan(p['hue']):
        hsv = to_hsv(x)
        hsv[..., 0] = (hsv[..., 0] + p['hue']) % 180
        x = to_rgb(hsv)
    if not p['contrast_first']:
        x = trunc(x * np.float32(p['contrast']))
    return (x - np.array(datalib.MEAN)) / np.array(datalib.STD)


def test_batched_distortion_matches_a_per_image_version():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 12, 10, 3), dtype=np.uint8)
    images[0, :4] = 128                                                # grey: saturation 0
    params = [datalib.photometric_params(rng, (12, 10)) for _ in range(6)]
    params[1].update(saturation=1.4, hue=-18.0, contrast_first=1.0)   # every step on
    params[2].update(saturation=0.0, hue=float('nan'), brightness=0.0, contrast=1.0)   # none
    batch = torch.utils.data.default_collate(params)
    out = datalib.distort_and_normalize(torch.from_numpy(images).permute(0, 3, 1, 2), batch)
    std = torch.tensor(datalib.STD).view(3, 1, 1)
    for i in range(6):
        expected = torch.from_numpy(reference_distortion(images[i], params[i])).permute(2, 0, 1)
        difference = ((out[i].double() - expected) * std).abs()         # in 0..255 units
        assert difference.max() <= 1.01, (i, params[i])
        assert (difference > 0.01).float().mean() < 0.02
    identity = (images[2].astype(np.float64) - datalib.MEAN) / datalib.STD
    assert torch.allclose(out[2].double(), torch.from_numpy(identity).permute(2, 0, 1), atol=1e-5)


# ---- Your own data set -----------------------------------------------------------------------

# Four classes of synthetic_scene's streets, by Cityscapes train id; everything else is ignored.
OWN_CLASSES = {10: 0, 2: 1, 1: 2, 0: 3}
OWN_COLOURS = ((70, 130, 180), (70, 70, 70), (244, 35, 232), (128, 64, 128))
CLASSES_TXT = ('# name R G B, in train-id order\nsky 70 130 180\nbuilding 70 70 70\n'
               'side walk 244 35 232\nroad 128 64 128\nignore: void 0 0 0\n')


def make_own_data(root, num_train=8, num_val=4, colour_labels=False, seed=0):
    """A data set of one's own, as users bring it: four classes with colours, PNG and JPEG
    images of odd sizes (some EXIF-rotated), L and P index labels with ignored regions (or RGB
    colour labels, void black), sub-folders."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / 'classes.txt').write_text(CLASSES_TXT)
    for split, count in (('train', num_train), ('val', num_val)):
        for i in range(count):
            width, height = int(rng.integers(90, 160)), int(rng.integers(50, 90))
            image, raw = datalib.synthetic_scene(rng, (width, height))
            train_ids = datalib.TRAIN_IDS[raw]
            label = np.full_like(train_ids, 255)
            for cityscapes_id, own_id in OWN_CLASSES.items():
                label[train_ids == cityscapes_id] = own_id
            folder = f'{split}/part{i % 2}'
            for kind in ('images', 'labels'):
                (root / kind / folder).mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(image)
            if i % 3 == 2:              # stored turned; EXIF says to turn it back (orientation 6)
                exif = picture.getexif()
                exif[datalib.EXIF_ORIENTATION] = 6
                picture.transpose(Image.ROTATE_90).save(root / 'images' / folder / f'{i}.jpg',
                                                        exif=exif, quality=95)
            else:
                picture.save(root / 'images' / folder / (f'{i}.jpg' if i % 3 else f'{i}.png'),
                             **({'quality': 95} if i % 3 else {}))
            if colour_labels:
                colours = np.zeros((256, 3), np.uint8)
                colours[:4] = OWN_COLOURS
                written = Image.fromarray(colours[label])
            else:
                written = Image.fromarray(label)
                if i % 2:               # a palette PNG: its indices are the ids, not its colours
                    written.putpalette([v for c in reversed(OWN_COLOURS) for v in c] + [9] * 756)
            written.save(root / 'labels' / folder / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def own_data(tmp_path_factory):
    return make_own_data(tmp_path_factory.mktemp('own'))


def test_classes_file_names_colours_defaults_and_ignore_colours(tmp_path):
    path = tmp_path / 'classes.txt'
    path.write_text('# comment\nback ground\ntraffic light 250 170 30\n\nignore: void 0 0 0\n'
                    'pole 3\n')
    names, palette, ignored, all_coloured, id_table = datalib.read_classes(path)
    assert names == ('back ground', 'traffic light', 'pole 3') and ignored == ((0, 0, 0),)
    assert palette[1] == (250, 170, 30) and not all_coloured and id_table is None
    assert len(set(palette)) == 3 and (0, 0, 0) not in palette       # distinct defaults
    assert datalib.read_classes(path)[1] == palette                   # and fixed
    for text, words in (('a 1 2 3\nb 1 2 3\n', r'colour \(1, 2, 3\) twice'), ('a\na\n', 'name a twice'),
                        ('a 1 2 300\n', 'above 255'), ('ignore: void\n', 'needs a colour'),
                        ('# nothing\n', 'lists no class'), ('1 2 3\n', 'needs a name')):
        path.write_text(text)
        with pytest.raises(datalib.DatasetError, match=words):
            datalib.read_classes(path)


def test_own_layout_index_and_colour_labels_exif_and_sub_folders(own_data, tmp_path):
    dataset = datalib.SegmentationDataset(own_data, 'train')
    assert dataset.classes == ('sky', 'building', 'side walk', 'road')
    assert dataset.palette == OWN_COLOURS and len(dataset) == 8
    assert dataset.names[:2] == ['part0/0', 'part0/2'] and dataset.names[4] == 'part1/1'
    coloured = datalib.SegmentationDataset(make_own_data(tmp_path / 'rgb', colour_labels=True))
    for i in range(len(dataset)):
        image, label = dataset[i]
        stored = Image.open(dataset.samples[i][0]).size
        turned = int(dataset.name(i).split('/')[1]) % 3 == 2
        assert image.shape[:2] == label.shape                     # EXIF applied to the image
        assert (image.shape[1], image.shape[0]) == (stored[::-1] if turned else stored)
        assert set(np.unique(label)) <= {0, 1, 2, 3, 255} and (label == 255).any()
        # a P label's indices, not its colours; an RGB label read through classes.txt
        assert np.array_equal(label, coloured[i][1])
    assert (np.bincount(np.concatenate([dataset[i][1].ravel() for i in range(8)]))[:4] > 0).all()


def write_own(root, name, image_size=(40, 30), label=None, image_suffix='.png', split='train'):
    """One image (random pixels) and, unless label is False, its label array (default zeros)."""
    (root / 'images' / split).mkdir(parents=True, exist_ok=True)
    (root / 'labels' / split).mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (image_size[1], image_size[0], 3), np.uint8)
    Image.fromarray(pixels).save(root / 'images' / split / f'{name}{image_suffix}')
    if label is not False:
        label = np.zeros(image_size[::-1], np.uint8) if label is None else label
        Image.fromarray(label).save(root / 'labels' / split / f'{name}.png')


def problems_of(root, split='train'):
    layout = datalib.Layout(root)
    samples, _, problems = layout.find(split)
    return problems + datalib.survey(layout, split, samples)['problems']


def test_every_label_problem_is_named_with_the_file(tmp_path):
    root = tmp_path / 'data'
    write_own(root, 'good', label=np.arange(40 * 30, dtype=np.uint8).reshape(30, 40) % 3)
    with pytest.raises(datalib.DatasetError, match='classes.txt is missing'):
        datalib.Layout(root)
    (root / 'classes.txt').write_text('a 10 10 10\nb 20 20 20\nc 30 30 30\n')
    assert problems_of(root) == []
    bad = np.zeros((30, 40), np.uint8)
    bad[:3] = 7
    write_own(root, 'bad', label=bad)
    [problem] = problems_of(root)
    assert 'bad.png holds the value 7 in 10.00% of its pixels' in problem and '0-2' in problem
    with pytest.raises(datalib.DatasetError, match='value 7'):      # and when it is read
        datalib.SegmentationDataset(root)[0]
    colours = np.full((30, 40, 3), 10, np.uint8)
    colours[0] = (1, 2, 3)
    Image.fromarray(colours).save(root / 'labels' / 'train' / 'bad.png')
    [problem] = problems_of(root)
    assert 'colour (1, 2, 3), which classes.txt does not list, in 3.33%' in problem
    with pytest.raises(datalib.DatasetError, match=r'colour \(1, 2, 3\).* in 3.33%'):
        datalib.SegmentationDataset(root)[0]                       # read pixel by pixel
    (root / 'labels' / 'train' / 'bad.png').unlink()
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(root / 'labels' / 'train' / 'bad.jpg')
    [problem] = problems_of(root)
    assert 'bad.jpg is a JPEG label' in problem and 'save labels as PNG' in problem
    (root / 'labels' / 'train' / 'bad.jpg').unlink()
    write_own(root, 'orphan', label=np.zeros((30, 40), np.uint8))
    (root / 'images' / 'train' / 'orphan.png').unlink()
    (root / 'images' / 'train' / 'bad.png').unlink()
    [problem] = problems_of(root)
    assert 'label without an image' in problem and 'orphan.png' in problem
    (root / 'labels' / 'train' / 'orphan.png').unlink()
    write_own(root, 'small', label=np.zeros((20, 40), np.uint8))
    [problem] = problems_of(root)
    assert 'small.png is 40x30 but its label' in problem and '40x20' in problem
    # A phone photo stored 30 x 40 and shown turned (EXIF 6), its label drawn on the stored one.
    turned = Image.open(root / 'images' / 'train' / 'small.png')
    exif = turned.getexif()
    exif[datalib.EXIF_ORIENTATION] = 6
    turned.save(root / 'images' / 'train' / 'small.jpg', exif=exif)
    (root / 'images' / 'train' / 'small.png').unlink()
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(root / 'labels' / 'train' / 'small.png')
    [problem] = problems_of(root)
    assert 'is 30x40 but its label' in problem and 'only without the image\'s EXIF rotation' in problem
    with pytest.raises(datalib.DatasetError, match='images/val is missing'):
        datalib.SegmentationDataset(root, 'val')
    (root / 'images' / 'val').mkdir()
    (root / 'labels' / 'val').mkdir()
    with pytest.raises(datalib.DatasetError, match='the split is empty'):
        datalib.SegmentationDataset(root, 'val')


def test_the_other_label_messages_and_label_formats(tmp_path):
    """The README's table, the lines test_every_label_problem... does not make: colour labels
    without colours, a JPEG behind .png, an image without its label, a class that never
    occurs; and index labels of 1 bit and of 16 bits."""
    root = tmp_path / 'data'
    (root / 'classes.txt').parent.mkdir(parents=True)
    (root / 'classes.txt').write_text('a\nb\nc\n')
    write_own(root, 'rgb', label=np.zeros((30, 40, 3), np.uint8))
    [problem] = problems_of(root)
    assert 'rgb.png is a colour (RGB) label, but classes.txt does not give every class a ' \
        'colour' in problem and 'add R G B after each name' in problem
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(root / 'labels' / 'train' / 'rgb.png',
                                                       format='JPEG')
    [problem] = problems_of(root)
    assert 'rgb.png is a JPEG file' in problem and 'save labels as PNG' in problem
    (root / 'labels' / 'train' / 'rgb.png').unlink()
    [problem] = problems_of(root)
    assert problem.startswith('label missing for') and 'labels/train/rgb.png' in problem
    (root / 'images' / 'train' / 'rgb.png').unlink()
    # 1 bit: 0/1 are the ids; 16 bits: values up to 255, and above is named
    bits = np.zeros((30, 40), bool)
    bits[:, 20:] = True
    write_own(root, 'one_bit', label=False)
    Image.fromarray(bits).save(root / 'labels' / 'train' / 'one_bit.png')
    write_own(root, 'sixteen_bits', label=False)
    deep = np.full((30, 40), 2, np.uint16)
    deep[:5] = 255
    Image.fromarray(deep).save(root / 'labels' / 'train' / 'sixteen_bits.png')
    assert Image.open(root / 'labels' / 'train' / 'one_bit.png').mode == '1'
    assert Image.open(root / 'labels' / 'train' / 'sixteen_bits.png').mode.startswith('I')
    dataset = datalib.SegmentationDataset(root)
    labels = {dataset.name(i): dataset[i][1] for i in range(len(dataset))}
    assert np.array_equal(labels['one_bit'], bits.astype(np.uint8))
    assert np.array_equal(labels['sixteen_bits'], deep.astype(np.uint8))
    found = datalib.survey(dataset.layout, 'train', dataset.samples)
    assert found['problems'] == [] and found['pixels'][[0, 1, 2, 255]].tolist() == [600, 600, 1000, 200]
    assert found['warnings'] == []
    deep[0, 0] = 300
    Image.fromarray(deep).save(root / 'labels' / 'train' / 'sixteen_bits.png')
    [problem] = problems_of(root)
    assert 'sixteen_bits.png holds the value 300' in problem
    (root / 'classes.txt').write_text('a\nb\nc\nd\n')
    deep[0, 0] = 2
    Image.fromarray(deep).save(root / 'labels' / 'train' / 'sixteen_bits.png')
    layout = datalib.Layout(root)
    [warning] = datalib.survey(layout, 'train', layout.find('train')[0])['warnings']
    assert warning == "class 'd' never occurs in the train labels: the model cannot learn it"
    result = run_here(train, '--data-path', root, '--device', 'cpu', '--crop-size', 16,
                      '--iters', 1, '--workers', 0, '--no-validate', '--work-dir', tmp_path / 'w')
    assert result.returncode == 0
    assert "warning: class 'd' never occurs" in (tmp_path / 'w' / 'train.log').read_text()


def test_the_look_at_the_labels_on_several_processes_queues_chunks_of_at_most_8(
        tmp_path, monkeypatch):
    """On Ctrl-C the process pool still runs the chunks already queued (twice the processes,
    and one): small chunks make that seconds, not a good part of the look."""
    for i in range(201):
        write_own(tmp_path, f'{i:03d}', image_size=(16, 16))
    (tmp_path / 'classes.txt').write_text('a\nb\n')
    layout, chunks = datalib.Layout(tmp_path), []
    pool = datalib.concurrent.futures.ProcessPoolExecutor
    real_map = pool.map
    monkeypatch.setattr(pool, 'map', lambda self, *args, chunksize=1: (
        chunks.append(chunksize), real_map(self, *args, chunksize=chunksize))[1])
    found = datalib.survey(layout, 'train', layout.find('train')[0], processes=2)
    assert found['problems'] == [] and chunks == [8]


def test_a_bad_label_the_quick_look_skipped_ends_the_run_in_one_line_when_read(tmp_path):
    """train.py looks at 200 labels of a split before training; one of the others is checked
    when a data worker reads it, mid-training, and still ends in one line."""
    root = tmp_path / 'data'
    (root / 'classes.txt').parent.mkdir(parents=True)
    (root / 'classes.txt').write_text('a\nb\n')
    label = np.zeros((16, 16), np.uint8)
    label[8:] = 1
    for i in range(201):
        write_own(root, f'{i:03d}', image_size=(16, 16), label=label)
    layout = datalib.Layout(root)
    samples = layout.find('train')[0]
    # the quick look takes 200 labels spread evenly over the split's 201: all but one
    skipped = sorted(set(range(201)) - set(np.linspace(0, 200, 200).round().astype(int).tolist()))
    assert len(skipped) == 1
    bad = root / 'labels' / 'train' / f'{skipped[0]:03d}.png'
    Image.fromarray(label * 7).save(bad)
    assert datalib.survey(layout, 'train', samples, limit=200)['problems'] == []
    result = run_here(train, '--data-path', root, '--device', 'cpu', '--crop-size', 16,
                      '--batch-size', 32, '--iters', 20, '--workers', 2, '--no-validate',
                      '--work-dir', tmp_path / 'work')
    assert_one_line_error(result, f'{bad} holds the value 7', 'lists 2 classes')


def test_ade20k_names_and_labels_that_count_from_one(tmp_path):
    (tmp_path / 'classes.txt').write_text('reduce_zero_label\nwall\nfloor\n')
    label = np.array([[0, 1, 2, 255]] * 30, np.uint8).repeat(10, 1)
    write_own(tmp_path, 'ADE_train_1', label=label, split='training')
    (tmp_path / 'labels').rename(tmp_path / 'annotations')
    dataset = datalib.SegmentationDataset(tmp_path, 'train')
    assert dataset.names == ['ADE_train_1']
    assert dataset[0][1][0].tolist() == [255] * 10 + [0] * 10 + [1] * 10 + [255] * 10


def test_ignore_values_in_classes_txt_and_the_line_a_stray_value_asks_for(tmp_path, capsys):
    """CamVid's index labels as they ship: 11 classes, 11 for void. Without a line for it the
    message names the line to add; with it the labels train as they are."""
    names = ''.join(f'class{i}\n' for i in range(11))
    label = np.array([[0, 5, 10, 11, 255]] * 30, np.uint8).repeat(8, 1)
    write_own(tmp_path, 'camvid', label=label)
    (tmp_path / 'classes.txt').write_text(names)
    [problem] = problems_of(tmp_path)
    assert 'camvid.png holds the value 11 in 20.00% of its pixels' in problem
    assert f'add the line "ignore: void 11" to {tmp_path / "classes.txt"}' in problem
    for i in range(5):
        write_own(tmp_path, f'more{i}', label=label)
    check_data.check_data(tmp_path, splits=('train',), processes=1)
    out = capsys.readouterr().out.splitlines()
    [line] = [line for line in out if 'problem:' in line]         # one line for six labels
    assert 'the value 11 in 6 labels (20.00% of their pixels' in line and 'and 3 more' in line
    assert f'add the line "ignore: void 11" to {tmp_path / "classes.txt"}' in line
    shares = dict(line.strip().rsplit(None, 1) for line in out if line.endswith('%'))
    assert shares['class0'] == '20.00%' and shares['value 11: no class'] == '20.00%'
    (tmp_path / 'classes.txt').write_text(names + 'ignore: void 11\nignore: 12\n')
    assert problems_of(tmp_path) == []
    check_data.check_data(tmp_path, splits=('train',), processes=1)
    out = capsys.readouterr().out
    assert out.strip().endswith('no problems')
    assert dict(line.strip().rsplit(None, 1) for line in out.splitlines()
                if line.endswith('%'))['(ignored)'] == '40.00%'
    dataset = datalib.SegmentationDataset(tmp_path)
    assert dataset[dataset.names.index('camvid')][1][0].tolist() == \
        [0] * 8 + [5] * 8 + [10] * 8 + [255] * 16
    # after reduce_zero_label's shift: value 0 ignored, 1 -> class 0, and 12 ignored too
    (tmp_path / 'classes.txt').write_text('reduce_zero_label\n' + names + 'ignore: 12\n')
    assert datalib.read_classes(tmp_path / 'classes.txt').id_table[:14] == \
        [255] + list(range(11)) + [255, 12]
    assert problems_of(tmp_path) == []                 # the file's 11 is class10 here
    dataset = datalib.SegmentationDataset(tmp_path)
    assert dataset[dataset.names.index('camvid')][1][0].tolist() == \
        [255] * 8 + [4] * 8 + [9] * 8 + [10] * 8 + [255] * 8
    write_own(tmp_path, 'camvid', label=np.full((30, 40), 13, np.uint8))
    [problem] = problems_of(tmp_path)                   # named as the file holds it
    assert 'holds the value 13 in 100.00%' in problem and '"ignore: void 13"' in problem
    for text, words in (('a\nignore: void 0\n', "label value 0 is the class 'a'"),
                        ('a\nignore: 300\n', 'go up to 254')):
        (tmp_path / 'classes.txt').write_text(text)
        with pytest.raises(datalib.DatasetError, match=words):
            datalib.read_classes(tmp_path / 'classes.txt')


def make_voc(root, names, subsets=('train', 'val'), cvat=False, aug=()):
    """VOCdevkit/VOC2012 as unpacked (palette PNGs, 255 the boundary band), or with cvat a
    CVAT "Segmentation mask 1.1" export of it (colour PNGs, labelmap.txt); aug: the names of
    an augmented set (SegmentationClassAug/, aug.txt)."""
    voc = root / 'VOCdevkit' / 'VOC2012'
    for folder in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(names))
    label = np.zeros((40, 60), np.uint8)
    label[:, 20:40], label[:, 40:] = 1, 15                      # background, aeroplane, person
    label[:, 19:21] = 255
    colours = datalib.lookup_table(datalib.VOC_PALETTE)
    for i, name in enumerate(list(names) + [f'aug{n}' for n in range(len(aug))]):
        image = rng.integers(0, 255, (40, 60, 3), np.uint8)
        image[label == 1] = (200, 30, 30)
        Image.fromarray(image).save(voc / 'JPEGImages' / f'{name}.jpg', quality=95)
        if name.startswith('aug'):
            (voc / 'SegmentationClassAug').mkdir(exist_ok=True)
            Image.fromarray(label).save(voc / 'SegmentationClassAug' / f'{name}.png')
        elif cvat:
            Image.fromarray(colours[np.where(label == 255, 0, label)]).save(
                voc / 'SegmentationClass' / f'{name}.png')
        else:
            written = Image.fromarray(label)
            written.putpalette([v for c in datalib.VOC_PALETTE for v in c])
            written.save(voc / 'SegmentationClass' / f'{name}.png')
    for subset, count in zip(subsets, (len(names) - 2, 2)) if len(subsets) == 2 else \
            [(subsets[0], len(names))]:
        chosen = names[:count] if subset != 'val' else names[-count:]
        (voc / 'ImageSets' / 'Segmentation' / f'{subset}.txt').write_text(
            ''.join(f'{n}\n' for n in chosen))
    if aug:
        (voc / 'ImageSets' / 'Segmentation' / 'aug.txt').write_text(
            ''.join(f'aug{n}\n' for n in range(len(aug))))
    if cvat:
        (voc / 'labelmap.txt').write_text('# label:color_rgb:parts:actions\n' + ''.join(
            f'{name}:{r},{g},{b}::\n' for name, (r, g, b) in
            zip(datalib.VOC_CLASSES, datalib.VOC_PALETTE)))
    return voc


def test_pascal_voc_and_its_augmented_set_train_and_evaluate_as_unpacked(tmp_path):
    names = [f'2007_{i:06d}' for i in range(6)]
    make_voc(tmp_path, names, aug=range(3))
    for root in (tmp_path, tmp_path / 'VOCdevkit', tmp_path / 'VOCdevkit' / 'VOC2012'):
        train_set = datalib.SegmentationDataset(root, 'train')
        assert train_set.classes == datalib.VOC_CLASSES and len(train_set) == 4 + 3
    assert train_set.names[:4] == names[:4] and train_set.names[4] == 'aug/aug0'
    cached = datalib.SegmentationDataset(tmp_path, 'train', cache_dir=tmp_path / 'cache')
    assert all(np.array_equal(cached[i][1], train_set[i][1]) for i in range(len(cached)))
    assert (tmp_path / 'cache' / 'train' / 'aug' / 'aug0.rgbl').is_file()
    val = datalib.SegmentationDataset(tmp_path, 'val')
    assert val.names == names[-2:]
    image, label = val[0]
    assert image.shape == (40, 60, 3) and sorted(np.unique(label)) == [0, 1, 15, 255]
    work = tmp_path / 'work'
    train_here('--data-path', tmp_path, '--device', 'cpu', '--crop-size', 32, '--batch-size', 2,
               '--iters', 2, '--val-interval', 2, '--workers', 0, '--work-dir', work)
    result = run_here(evaluation, '--ckpt', work / 'best.pth', '--data-path', tmp_path,
                      '--device', 'cpu', '--workers', 0, check=True)
    assert 'aeroplane' in result.stdout and 'pottedplant' in result.stdout


def test_a_cvat_segmentation_mask_export_trains_with_its_labelmap(tmp_path):
    names = [f'frame_{i:06d}' for i in range(5)]
    voc = make_voc(tmp_path, names, subsets=('default',), cvat=True)
    with pytest.raises(datalib.DatasetError, match='has the subsets default only; list the '
                                                   'train images. names there'):
        datalib.SegmentationDataset(tmp_path, 'train')
    lists = voc / 'ImageSets' / 'Segmentation'
    (lists / 'train.txt').write_text(''.join(f'{n}\n' for n in names[:3]))
    (lists / 'val.txt').write_text(''.join(f'{n}.jpg\n' for n in names[3:]))
    train_set = datalib.SegmentationDataset(tmp_path, 'train')
    assert train_set.layout.classes_file == voc / 'labelmap.txt' and len(train_set) == 3
    assert train_set.classes == datalib.VOC_CLASSES and train_set.palette == datalib.VOC_PALETTE
    assert sorted(np.unique(train_set[0][1])) == [0, 1, 15]        # colours read as ids
    work = tmp_path / 'work'
    result = train_here('--data-path', tmp_path, '--device', 'cpu', '--crop-size', 32,
                        '--batch-size', 2, '--iters', 2, '--val-interval', 2, '--workers', 0,
                        '--work-dir', work)
    assert 'aeroplane' in result.stdout


def test_ade20k_as_unpacked_needs_no_classes_txt(tmp_path):
    ade = tmp_path / 'ADEChallengeData2016'
    label = np.array([[0, 1, 2, 150]] * 30, np.uint8).repeat(10, 1)
    for split, stem in (('training', 'ADE_train_00000001'), ('validation', 'ADE_val_00000001')):
        for kind in ('images', 'annotations'):
            (ade / kind / split).mkdir(parents=True)
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(ade / 'images' / split /
                                                              f'{stem}.jpg')
        Image.fromarray(label).save(ade / 'annotations' / split / f'{stem}.png')
    dataset = datalib.SegmentationDataset(tmp_path, 'val')
    assert len(dataset.classes) == 150 and dataset.classes[:3] == ('wall', 'building', 'sky')
    assert dataset[0][1][0].tolist() == [255] * 10 + [0] * 10 + [1] * 10 + [149] * 10
    assert check_data.check_data(tmp_path, processes=1) == 0
    work = tmp_path / 'work'
    train_here('--data-path', tmp_path, '--device', 'cpu', '--crop-size', 32, '--batch-size', 2,
               '--iters', 1, '--workers', 0, '--work-dir', work)
    result = run_here(evaluation, '--ckpt', work / 'latest.pth', '--data-path', tmp_path,
                      '--device', 'cpu', '--workers', 0, check=True)
    assert '150 classes' in result.stdout and 'windowpane' in result.stdout


def test_split_lists_choose_samples_from_one_shared_folder(tmp_path):
    (tmp_path / 'classes.txt').write_text('a\nb\n')
    for i in range(5):
        write_own(tmp_path, f'x{i}', label=np.eye(30, 40, dtype=np.uint8), split='')
    (tmp_path / 'splits').mkdir()
    (tmp_path / 'splits' / 'train.txt').write_text('x0\nx1.png\nx2\n')
    (tmp_path / 'splits' / 'val.txt').write_text('x3\nx4\n')
    assert datalib.SegmentationDataset(tmp_path, 'train').names == ['x0', 'x1', 'x2']
    assert datalib.SegmentationDataset(tmp_path, 'val').names == ['x3', 'x4']
    # a folder linked in, as data sets are often laid out, is followed
    (tmp_path / 'elsewhere').mkdir()
    write_own(tmp_path / 'elsewhere', 'x5', label=np.eye(30, 40, dtype=np.uint8), split='')
    (tmp_path / 'images' / 'more').symlink_to(tmp_path / 'elsewhere' / 'images')
    (tmp_path / 'labels' / 'more').symlink_to(tmp_path / 'elsewhere' / 'labels')
    (tmp_path / 'splits' / 'val.txt').write_text('x3\nmore/x5\n')
    assert datalib.SegmentationDataset(tmp_path, 'val').names == ['x3', 'more/x5']
    (tmp_path / 'splits' / 'val.txt').write_text('x3\nmissing\n')
    [problem] = problems_of(tmp_path, 'val')
    assert 'val.txt names missing, which is not an image under' in problem


def test_binary_masks_saved_as_0_and_255_are_named(tmp_path):
    (tmp_path / 'classes.txt').write_text('background\nobject\n')
    mask = np.zeros((30, 40), np.uint8)
    mask[10:20, 10:30] = 255
    write_own(tmp_path, 'a', label=mask)
    [problem] = problems_of(tmp_path)
    assert 'only the values 0 and 255' in problem and "'object' would never be learnt" in problem
    write_own(tmp_path, 'a', label=mask // 255)                     # 0/1: fine
    assert problems_of(tmp_path) == []


def test_check_data_prints_each_split_and_every_problem(own_data, tmp_path):
    result = run('tools/check_data.py', own_data)
    assert 'train: 8 images' in result.stdout and 'val: 4 images' in result.stdout
    assert 'side walk' in result.stdout and '(ignored)' in result.stdout
    assert result.stdout.strip().endswith('no problems')
    shutil.copytree(own_data, tmp_path / 'copy')
    label = tmp_path / 'copy' / 'labels' / 'val' / 'part0' / '0.png'
    values = np.array(Image.open(label))
    values[0, 0] = 9
    Image.fromarray(values).save(label)
    result = run('tools/check_data.py', tmp_path / 'copy', check=False)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert f'problem: {label} holds the value 9' in result.stdout
    assert result.stdout.strip().endswith('1 problems')


def test_a_tool_runs_from_any_folder_without_pythonpath(own_data, tmp_path):
    env = {key: value for key, value in ENV.items() if key != 'PYTHONPATH'}
    result = subprocess.run([sys.executable, str(HERE / 'tools' / 'check_data.py'), own_data,
                             '--splits', 'val'], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'val: 4 images' in result.stdout and result.stdout.strip().endswith('no problems')


def test_train_on_own_data_then_eval_with_its_names_and_colours(own_data, tmp_path):
    work = tmp_path / 'work'
    result = run('train.py', '--data-path', own_data, '--device', 'cpu', '--crop-size', 64,
                 '--batch-size', 4, '--iters', 8, '--val-interval', 8, '--log-interval', 4,
                 '--workers', 2, '--work-dir', work)
    assert '4 classes' in result.stdout and 'side walk' in result.stdout
    best = torch.load(work / 'best.pth', weights_only=True)
    dataset_meta = best['meta']['dataset_meta']
    assert dataset_meta == {'classes': ['sky', 'building', 'side walk', 'road'],
                            'palette': [list(c) for c in OWN_COLOURS]}
    trained = [line for line in result.stdout.splitlines() if line.startswith('mIoU')][-1]
    record = json.loads((work / 'metrics.jsonl').read_text().splitlines()[-1])
    assert record['iter'] == 8 and list(record['per_class']) == list(dataset_meta['classes'])
    assert set(record['per_class_acc']) == set(record['per_class'])
    evaluated = run('eval.py', '--ckpt', work / 'best.pth', '--data-path', own_data, '--device',
                    'cpu', '--workers', 0, '--out-dir', tmp_path / 'out', '--show-dir',
                    tmp_path / 'show', threads=2)
    assert trained in evaluated.stdout and 'side walk' in evaluated.stdout
    out = Image.open(tmp_path / 'out' / 'part0' / '0.png')
    assert out.mode == 'P' and out.getpalette()[:12] == [v for c in OWN_COLOURS for v in c]
    assert out.size == Image.open(own_data / 'labels' / 'val' / 'part0' / '0.png').size
    images = run('eval.py', '--ckpt', work / 'best.pth', '--images',
                 own_data / 'images' / 'val' / 'part0' / '0.png', '--device', 'cpu',
                 '--workers', 0, '--out-dir', tmp_path / 'segmented', threads=2)
    out = Image.open(tmp_path / 'segmented' / '0.png')
    assert '4 classes' in images.stdout and out.mode == 'P'
    assert out.getpalette()[:12] == [v for c in OWN_COLOURS for v in c]


def test_train_refuses_a_bad_label_in_one_line_before_the_first_iteration(own_data, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(own_data, root)
    label = root / 'labels' / 'train' / 'part1' / '3.png'
    values = np.array(Image.open(label))
    values[:2] = 30
    Image.fromarray(values).save(label)
    result = train_here('--data-path', root, '--device', 'cpu', '--crop-size', 64, '--iters', 2,
                        '--workers', 2, '--work-dir', tmp_path / 'work', check=False)
    assert_one_line_error(result, str(label), 'holds the value 30', '4 classes')
    assert 'iter ' not in result.stdout and not list((tmp_path / 'work').glob('*.pth'))


def test_fine_tune_from_a_19_class_checkpoint_loads_all_but_the_classifiers(checkpoint, own_data,
                                                                            tmp_path):
    model = bisenet.BiSeNetV1(4)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    source = torch.load(checkpoint, weights_only=True)['state_dict']
    bisenet.load_checkpoint(model, checkpoint, new_classes=True)
    for key, value in model.state_dict().items():
        expected = fresh[key] if key.startswith(bisenet.CLASSIFIERS) else source[key]
        assert torch.equal(value, expected), key
    with pytest.raises(bisenet.CheckpointError, match='shape mismatch'):
        bisenet.load_checkpoint(bisenet.BiSeNetV1(4), checkpoint)      # only when asked
    with pytest.raises(bisenet.CheckpointError, match='resnet18 BiSeNetV1 but the model is resnet50'):
        bisenet.load_checkpoint(bisenet.BiSeNetV1(4, 'resnet50'), checkpoint, new_classes=True)
    result = train_here('--data-path', own_data, '--load-from', checkpoint, '--device', 'cpu',
                        '--crop-size', 64, '--iters', 1, '--workers', 0, '--no-validate',
                        '--work-dir', tmp_path)
    assert 'loaded every weight but the three classifiers' in result.stdout
    assert '19 classes there, 4 here' in result.stdout


def test_checkpoints_name_their_classes_cityscapes_by_default(checkpoint, tmp_path):
    assert bisenet.model_from_checkpoint(checkpoint).classes == bisenet.CLASSES
    state = bisenet.BiSeNetV1(2).state_dict()
    torch.save({'meta': {'dataset_meta': {'classes': ('bg', 'cat'),
                                          'palette': [[0, 0, 0], [255, 0, 0]]}},
                'state_dict': state}, tmp_path / 'mmseg1.pth')
    torch.save({'meta': {'CLASSES': ('bg', 'dog')}, 'state_dict': state}, tmp_path / 'mmseg0.pth')
    torch.save(state, tmp_path / 'bare.pth')
    one = bisenet.model_from_checkpoint(tmp_path / 'mmseg1.pth')
    assert one.classes == ('bg', 'cat') and one.palette == ((0, 0, 0), (255, 0, 0))
    assert bisenet.model_from_checkpoint(tmp_path / 'mmseg0.pth').classes == ('bg', 'dog')
    bare = bisenet.model_from_checkpoint(tmp_path / 'bare.pth')
    assert bare.classes == ('0', '1') and len(set(bare.palette)) == 2


def test_padding_share_of_crops_larger_than_the_images():
    # 100 x 100 images, 200 x 200 crops: the crop holds (r / 2)^2 of image, r in [0.5, 2].
    assert datalib.padding_share([(100, 100)], (200, 200)) == pytest.approx(1 - 1.75 / 4, abs=2e-3)
    assert datalib.padding_share([(1000, 800)], (200, 200)) == 0


def test_pictures_have_captions_and_a_legend_of_the_classes_present(tmp_path):
    pred = np.zeros((60, 80), np.int64)
    pred[:, 40:] = 2
    label = pred.copy()
    label[:10] = 255
    image = torch.zeros(3, 60, 80, dtype=torch.uint8)
    palette = ((200, 10, 10), (10, 200, 10), (10, 10, 200))
    evaluation.save_prediction(pred, image, 'x.png', 'x.png', None, tmp_path, ('a', 'b', 'c'),
                               palette, label)
    picture = np.array(Image.open(tmp_path / 'x.png'))
    assert picture.shape[1] == 3 * 80
    assert_panel(picture, evaluation.colourize(pred, palette), left=80)
    legend = picture[picture.shape[0] - 20:].reshape(-1, 3)
    present = {tuple(c) for c in legend.tolist()}
    assert palette[0] in present and palette[2] in present and palette[1] not in present
    assert not np.all(picture[:10] == 255)                          # a caption above


def test_onnx_export_of_a_four_class_model_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnx')
    torch.manual_seed(0)
    model = bisenet.BiSeNetV1(4, classes=('a', 'b', 'c', 'd')).eval()
    lines = []
    agreement = export_onnx.export_onnx(model, tmp_path / 'm.onnx', logits=True,
                                       check_sizes=((64, 96),), log=lines.append)
    assert agreement == 1.0
    assert 'logits float32 (N, 4, H, W)' in lines[0] and 'classes: a, b, c, d' in lines[0]
    session = ort.InferenceSession(str(tmp_path / 'm.onnx'), providers=['CPUExecutionProvider'])
    image = datalib.synthetic_scene(np.random.default_rng(0), (96, 64))[0][None]
    labels, logits = session.run(None, {'image': image})
    assert labels.shape == (1, 64, 96) and logits.shape == (1, 4, 64, 96)
    # against the plain model (BatchNorm unfolded), normalised here
    with torch.no_grad():
        want = model(datalib.normalize(torch.from_numpy(image).permute(0, 3, 1, 2)))
    assert np.abs(logits - want.numpy()).max() < 1e-4
    assert (labels == want.argmax(1).numpy()).mean() > 0.999 and len(np.unique(labels)) > 1


# ---- Evaluation ------------------------------------------------------------------------------


def test_metric_against_brute_force():
    rng = np.random.default_rng(0)
    num_classes, total = 5, torch.zeros(5, 5, dtype=torch.int64)
    preds, labels = [], []
    for _ in range(3):
        pred = rng.integers(0, 4, (7, 9))                      # class 4 never predicted
        label = rng.choice([0, 1, 2, 255], (7, 9))             # 3 and 4 never labelled
        total += evaluation.confusion(torch.from_numpy(pred), torch.from_numpy(label), num_classes)
        preds.append(pred)
        labels.append(label)
    pred, label = np.concatenate(preds), np.concatenate(labels)
    metrics = evaluation.summarize(total)
    ious, accs = [], []
    for c in range(num_classes):
        valid = label != 255
        inter = ((pred == c) & (label == c) & valid).sum()
        union = (((pred == c) | (label == c)) & valid).sum()
        ious.append(inter / union if union else np.nan)
        accs.append(inter / (label == c).sum() if (label == c).sum() else np.nan)
    assert np.isnan(metrics['IoU'][4]) and metrics['IoU'][3] == 0        # absent / only predicted
    assert np.allclose(metrics['IoU'], 100 * np.array(ious), equal_nan=True)
    assert metrics['mIoU'] == pytest.approx(100 * np.nanmean(ious))
    assert metrics['mAcc'] == pytest.approx(100 * np.nanmean(accs))
    assert metrics['aAcc'] == pytest.approx(100 * (pred == label)[label != 255].mean())


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A random-weight mmsegmentation-layout checkpoint."""
    path = tmp_path_factory.mktemp('ckpt') / 'mmseg_random.pth'
    torch.manual_seed(0)
    torch.save({'meta': {}, 'state_dict': random_state(bisenet.BiSeNetV1()).state_dict()}, path)
    return path


@pytest.fixture(scope='module')
def initial_checkpoint(tmp_path_factory):
    """The reference's initial weights: unlike random_state's, its predictions vary across an
    image, so comparing label maps means something."""
    path = tmp_path_factory.mktemp('ckpt') / 'initial.pth'
    torch.manual_seed(0)
    torch.save({'meta': {}, 'state_dict': bisenet.BiSeNetV1().state_dict()}, path)
    return path


def test_eval_writes_cityscapes_label_ids_and_pictures(data, checkpoint, tmp_path):
    run('eval.py', '--ckpt', checkpoint, '--data-path', data, '--device', 'cpu', '--workers', 0,
        '--out-dir', tmp_path / 'out', '--show-dir', tmp_path / 'show', '--json', tmp_path / 'm.json')
    model = bisenet.model_from_checkpoint(checkpoint).eval()
    dataset = datalib.Cityscapes(data, 'val', datalib.EvalTransform())
    total = torch.zeros(19, 19, dtype=torch.int64)
    for i in range(len(dataset)):
        image, label = dataset[i]
        with torch.no_grad():
            pred = model(image[None]).argmax(1)[0]
        written = np.array(Image.open(tmp_path / 'out' / f'{dataset.name(i)}_leftImg8bit.png'))
        assert (torch.from_numpy(datalib.TRAIN_IDS[written]).long() == pred).float().mean() > 0.999
        picture = np.array(Image.open(tmp_path / 'show' / f'{dataset.name(i)}.png'))
        # image | prediction | ground truth under their captions, the legend below
        assert picture.shape[1] == 3 * 128 and picture.shape[0] > 64
        assert_panel(picture, evaluation.colourize(pred.numpy(), bisenet.PALETTE), left=128)
        total += evaluation.confusion(pred, label, 19)
    result = json.loads((tmp_path / 'm.json').read_text())
    assert result['mIoU'] == pytest.approx(evaluation.summarize(total)['mIoU'], abs=0.05)
    assert set(result['per_class']) == set(bisenet.CLASSES)


def assert_panel(picture, panel, left):
    """`panel` stands in `picture` at column `left`, below a caption of some height."""
    height, width = panel.shape[:2]
    tops = [top for top in range(picture.shape[0] - height + 1)
            if np.array_equal(picture[top:top + height, left:left + width], panel)]
    assert tops, 'panel not found in the picture'


def test_slide_and_aug_test_against_explicit_windows_and_scales(data, checkpoint):
    model = bisenet.model_from_checkpoint(checkpoint).eval()
    image = datalib.normalize(torch.from_numpy(np.array(Image.open(
        datalib.Cityscapes(data, 'val').samples[0][0]))).permute(2, 0, 1)[None])
    assert image.shape[2:] == (64, 128)
    with torch.no_grad():
        whole = model(image)
        assert torch.equal(evaluation.predict(model, image, 19), whole)
        # a window larger than the image: one window, the whole image
        assert torch.allclose(evaluation.predict(model, image, 19, 'slide'), whole)
        # 48 x 48 windows at stride 32 over 64 x 128: rows 0-48 and 16-64 (the last window
        # ends at the border), columns 0-48, 32-80, 64-112 and 80-128; logits averaged
        total, count = torch.zeros_like(whole), torch.zeros(1, 1, 64, 128)
        for y1 in (0, 16):
            for x1 in (0, 32, 64, 80):
                total[:, :, y1:y1 + 48, x1:x1 + 48] += model(image[:, :, y1:y1 + 48, x1:x1 + 48])
                count[:, :, y1:y1 + 48, x1:x1 + 48] += 1
        evaluation.SLIDE_WINDOW, evaluation.SLIDE_STRIDE = (48, 48), (32, 32)
        try:
            slide = evaluation.predict(model, image, 19, 'slide')
        finally:
            evaluation.SLIDE_WINDOW, evaluation.SLIDE_STRIDE = (1024, 1024), (768, 768)
        assert torch.allclose(slide, total / count, atol=1e-6)
        # ms + flip: the softmax at scales 0.5 to 1.75 of 64 x 128, each also flipped, back at
        # 64 x 128 (bilinear), averaged over the twelve
        scores = 0
        for size in ((32, 64), (48, 96), (64, 128), (80, 160), (96, 192), (112, 224)):
            scaled = F.interpolate(image, size=size, mode='bilinear', align_corners=False)
            for logits in (model(scaled), model(scaled.flip(3)).flip(3)):
                scores = scores + F.interpolate(logits, size=(64, 128), mode='bilinear',
                                                align_corners=False).softmax(1)
        aug = evaluation.predict(model, image, 19, aug_test=True)
    assert torch.allclose(aug, scores / 12, atol=1e-6)


def test_two_process_eval_equals_one(data, checkpoint, tmp_path):
    common = ['--ckpt', checkpoint, '--data-path', data, '--device', 'cpu', '--workers', 0]
    run('eval.py', *common, '--json', tmp_path / 'one.json')
    result = torchrun('eval.py', *common, '--json', tmp_path / 'two.json')
    assert '2 process(es)' in result.stdout
    one, two = (json.loads((tmp_path / f'{n}.json').read_text()) for n in ('one', 'two'))
    assert one == two


def test_eval_bad_input(data, tmp_path):
    junk = tmp_path / 'junk.pth'
    junk.write_text('hello')
    assert_one_line_error(run('eval.py', '--ckpt', junk, '--data-path', data, check=False),
                          'not a PyTorch checkpoint')
    torch.save({'state_dict': {'conv.weight': torch.zeros(1)}}, tmp_path / 'other.pth')
    assert_one_line_error(run_here(evaluation, '--ckpt', tmp_path / 'other.pth', '--data-path',
                                   data), 'not a BiSeNetV1 checkpoint')
    torch.save({'state_dict': bisenet.BiSeNetV1().state_dict()}, tmp_path / 'ok.pth')
    assert_one_line_error(run_here(evaluation, '--ckpt', tmp_path / 'ok.pth', '--data-path',
                                   tmp_path / 'none'), 'does not exist')
    assert_one_line_error(run_here(evaluation, '--ckpt', tmp_path / 'ok.pth', '--data-path',
                                   data, '--split', 'test'), 'leftImg8bit/test is missing')
    assert_one_line_error(run_here(evaluation, '--ckpt', tmp_path / 'ok.pth', '--data-path',
                                   data, '--json', junk / 'm.json'),
                          f'--json {junk} is a file, not a folder')


def test_prof_test_writes_what_it_profiles(data, checkpoint, tmp_path):
    result = run('eval.py', '--ckpt', checkpoint, '--data-path', data, '--device', 'cpu',
                 '--workers', 0, '--prof_test', '--prof-dir', tmp_path / 'prof', '--out-dir',
                 tmp_path / 'out')
    assert 'profile trace written' in result.stdout and any((tmp_path / 'prof').iterdir())
    assert len(list((tmp_path / 'out').rglob('*_leftImg8bit.png'))) == 4


def test_a_split_without_labelled_pixels_skips_the_metrics(tmp_path, checkpoint):
    for i in range(2):                            # like Cityscapes' test split: raw id 0 only
        write_pair(tmp_path / 'data', 'test', f'berlin/berlin_{i:06d}_000019', value=0)
    result = run('eval.py', '--ckpt', checkpoint, '--data-path', tmp_path / 'data', '--split',
                 'test', '--device', 'cpu', '--workers', 0, '--out-dir', tmp_path / 'out')
    assert 'no labelled pixels: metrics skipped' in result.stdout and 'mIoU' not in result.stdout
    assert len(list((tmp_path / 'out').rglob('*_leftImg8bit.png'))) == 2


def test_fit_size_is_the_reference_test_resize():
    assert evaluation.fit_size(2048, 1024) == (2048, 1024)
    assert evaluation.fit_size(1000, 500) == (2048, 1024)         # enlarged x 2.048
    assert evaluation.fit_size(2500, 1300) == (1969, 1024)        # the short side binds
    assert evaluation.fit_size(480, 640) == (1024, 1365)          # portrait: 1024 / 480


@pytest.fixture(scope='module')
def own_images(tmp_path_factory):
    """A folder as users have them: PNG, JPEG with EXIF rotation, greyscale, palette, RGBA, odd
    sizes, two files with one stem, and a broken file."""
    root = tmp_path_factory.mktemp('photos')
    (root / 'sub').mkdir()

    def scene(w, h, seed):
        return Image.fromarray(datalib.synthetic_scene(np.random.default_rng(seed), (w, h))[0])
    scene(200, 100, 1).save(root / 'street.png')
    scene(123, 77, 2).save(root / 'street.jpg', quality=95)
    rotated = scene(96, 64, 3)
    exif = rotated.getexif()
    exif[0x0112] = 6                                      # shown turned 90 degrees: 64 x 96
    rotated.save(root / 'sub' / 'phone.jpg', exif=exif, quality=95)
    scene(90, 130, 4).convert('L').save(root / 'sub' / 'grey.png')
    scene(150, 60, 5).convert('P', palette=Image.ADAPTIVE).save(root / 'palette.png')
    scene(101, 55, 6).convert('RGBA').save(root / 'alpha.png')
    (root / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not an image')
    return root


def test_own_images_label_maps_pictures_and_a_broken_file(own_images, initial_checkpoint,
                                                         tmp_path):
    checkpoint = initial_checkpoint
    result = run('eval.py', '--ckpt', checkpoint, '--images', own_images, '--device', 'cpu',
                 '--workers', 1, '--out-dir', tmp_path / 'labels', '--show-dir', tmp_path / 'show',
                 check=False, threads=2)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and 'broken.png' in errors[0] and errors[1].startswith('error: 1 of')
    sizes = {'street.png': (200, 100), 'street.jpg.png': (123, 77), 'sub/phone.jpg.png': (64, 96),
             'sub/grey.png': (90, 130), 'palette.png': (150, 60), 'alpha.png': (101, 55)}
    written = {p.relative_to(tmp_path / 'labels').as_posix(): Image.open(p).size
               for p in (tmp_path / 'labels').rglob('*.png')}
    assert written == sizes
    for name, (width, height) in sizes.items():          # the picture, with caption and legend
        shown = Image.open(tmp_path / 'show' / name).size
        assert shown[0] >= width and shown[1] > height, name
    # The label map is the plain model's on the image rescaled to fit 2048 x 1024, its scores
    # resized back: for street.png, 200 x 100 -> 2048 x 1024.
    model = bisenet.model_from_checkpoint(checkpoint).eval()
    image = Image.open(own_images / 'street.png')
    big = torch.from_numpy(np.array(image.resize((2048, 1024), Image.BILINEAR))).permute(2, 0, 1)
    with torch.no_grad():
        scores = model(datalib.normalize(big[None]))
    expected = F.interpolate(scores, size=(100, 200), mode='bilinear').argmax(1)[0].numpy()
    written = datalib.TRAIN_IDS[np.array(Image.open(tmp_path / 'labels' / 'street.png'))]
    assert (written == expected).mean() > 0.99 and len(np.unique(expected)) > 1


def test_own_images_default_to_pictures_in_a_named_folder(own_images, checkpoint, tmp_path):
    result = subprocess.run([sys.executable, str(HERE / 'eval.py'), '--ckpt', str(checkpoint),
                             '--images', str(own_images / 'street.png'), '--device', 'cpu',
                             '--workers', '0'], env=dict(ENV, OMP_NUM_THREADS='2'),
                            capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'pictures to output/segmented' in result.stdout
    assert (tmp_path / 'output' / 'segmented' / 'street.png').is_file()
    missing = run('eval.py', '--ckpt', checkpoint, '--images', tmp_path / 'nothing*.jpg', check=False)
    assert_one_line_error(missing, 'no PNG or JPEG file there')


def test_cpu_autocast_is_bf16_only():
    with pytest.raises(runtime.SetupError, match='bf16 only'):
        runtime.Runtime('cpu', amp=True, amp_dtype='fp16')
    if not runtime.cpu_has_bf16():
        with pytest.raises(runtime.SetupError, match='no bfloat16 units'):
            runtime.Runtime('cpu', amp=True, amp_dtype='bf16')
        pytest.skip('this CPU has no bfloat16 units')
    rt, lines = runtime.Runtime('cpu', amp=True, amp_dtype='bf16'), []
    model = bisenet.BiSeNetV1().eval()
    evaluation.benchmark(model, rt, size=(64, 128), warmup=1, rounds=2, log=lines.append)
    assert 'cpu, bf16' in lines[2] and lines[-1].startswith('FPS: ')
    fast = evaluation.prepare_for_inference(model, rt)
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad(), rt.autocast():
        assert fast(x.contiguous(memory_format=torch.channels_last)).dtype == torch.bfloat16


def test_onnx_export_matches_eval_label_maps(initial_checkpoint, tmp_path):
    """One exported file, run by onnxruntime at two sizes, gives eval.py --images' label maps
    (sizes that fit 2048 x 1024 already, so eval.py does not rescale them)."""
    checkpoint = initial_checkpoint
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnx')
    lines = []         # tools/export_onnx.py checks at 1024 x 2048 and 600 x 800; here smaller
    export_onnx.export_onnx(bisenet.model_from_checkpoint(checkpoint).eval(), tmp_path / 'm.onnx',
                           check_sizes=((320, 640), (200, 300)), log=lines.append)
    checks = [line for line in lines if 'onnxruntime check' in line]
    assert len(checks) == 2 and all('agree on 100.000%' in line for line in checks), lines
    assert any('CPU time per 320 x 640 image: onnxruntime' in line for line in lines)
    session = ort.InferenceSession(str(tmp_path / 'm.onnx'), providers=['CPUExecutionProvider'])
    assert [o.name for o in session.get_outputs()] == ['labels']
    sizes = ((2048, 320), (1024, 1280))
    images = {width: datalib.synthetic_scene(np.random.default_rng(width), (width, height))[0]
              for width, height in sizes}
    (tmp_path / 'images').mkdir()
    for width, image in images.items():
        Image.fromarray(image).save(tmp_path / 'images' / f'{width}.png')
    run('eval.py', '--ckpt', checkpoint, '--images', tmp_path / 'images', '--device', 'cpu',
        '--workers', 0, '--out-dir', tmp_path / 'labels', threads=2)
    for width, height in sizes:
        image = images[width]
        written = datalib.TRAIN_IDS[np.array(Image.open(tmp_path / 'labels' / f'{width}.png'))]
        labels = session.run(None, {'image': image[None]})[0][0]
        assert labels.dtype == np.uint8 and labels.shape == (height, width)
        assert (labels == written).mean() >= 0.9999 and len(np.unique(labels)) > 1
    # tools/README.md's onnxruntime example runs as written, next to the exported file.
    example = (HERE / 'tools' / 'README.md').read_text().split('```python\n')[1].split('```')[0]
    shutil.copy(tmp_path / 'm.onnx', tmp_path / 'bisenet.onnx')
    Image.fromarray(datalib.synthetic_scene(np.random.default_rng(0), (300, 200))[0]).save(
        tmp_path / 'street.jpg')
    subprocess.run([sys.executable, '-c', example], cwd=tmp_path, check=True, timeout=120)
    result_image = Image.open(tmp_path / 'street_labels.png')
    assert result_image.size == (300, 200) and result_image.mode == 'P'


def evaluate_model(flag, source, *args, check=False):
    """eval.py with a checkpoint (flag --ckpt), or tools/run_onnx.py with an exported file
    (--onnx), on the CPU."""
    if flag == '--onnx':
        return run_here(run_onnx, source, *args, check=check)
    return run_here(evaluation, '--ckpt', source, '--device', 'cpu', *args, check=check)


def test_onnx_file_evaluates_as_its_checkpoint_and_int8_stays_close(data, initial_checkpoint,
                                                                    tmp_path, monkeypatch):
    """eval.py --onnx runs the deployed file through the same evaluation: an fp32 export gives
    the checkpoint's metric and label maps, its class names from the file; an int8 export
    calibrated on the train split stays within 2 mIoU of it (label agreement >= 97%)."""
    pytest.importorskip('onnxruntime')
    onnx = pytest.importorskip('onnx')
    model = bisenet.model_from_checkpoint(initial_checkpoint).eval()
    model.classes = tuple(f'class {i}' for i in range(19))         # names the file must carry
    export_onnx.export_onnx(model, tmp_path / 'fp32.onnx', check_sizes=((64, 128),),
                           log=lambda line: None)
    torch.save({'model': model.state_dict(), 'meta': {'dataset_meta': {
        'classes': model.classes, 'palette': model.palette}}}, tmp_path / 'named.pth')
    evaluated = {}
    for flag, source in (('--ckpt', 'named.pth'), ('--onnx', 'fp32.onnx')):
        result = evaluate_model(flag, tmp_path / source, '--data-path', data, '--workers', 0,
                                '--json', tmp_path / f'{source}.json', '--out-dir',
                                tmp_path / flag, check=True)
        evaluated[flag] = json.loads((tmp_path / f'{source}.json').read_text())
    assert evaluated['--onnx'] == evaluated['--ckpt'] and 'ONNX fp32' in result.stdout
    deployed = run_onnx.OnnxModel(tmp_path / 'fp32.onnx')
    assert (deployed.classes, deployed.palette) == (model.classes, model.palette)
    nameless = onnx.load(str(tmp_path / 'fp32.onnx'))
    del nameless.metadata_props[:]
    onnx.save(nameless, str(tmp_path / 'nameless.onnx'))
    assert_one_line_error(run_here(run_onnx, tmp_path / 'nameless.onnx', '--data-path', data),
                          'no BiSeNetV1 export with its classes')
    for label in (tmp_path / '--ckpt').rglob('*.png'):
        other = tmp_path / '--onnx' / label.relative_to(tmp_path / '--ckpt')
        assert np.array_equal(np.array(Image.open(label)), np.array(Image.open(other)))
    train = datalib.SegmentationDataset(data, 'train')
    images = [np.array(train[i][0])[None] for i in range(len(train))]
    lines = []
    agreement = export_onnx.export_int8(model, tmp_path / 'int8.onnx', images[:6], images[6:],
                                       log=lines.append)
    assert agreement >= 0.97 and 'held-out' in lines[-2] and 'x the fast path' in lines[-1]
    nodes = onnx.load(str(tmp_path / 'int8.onnx')).graph.node
    dequantized = {output for node in nodes if node.op_type == 'DequantizeLinear'
                   for output in node.output}
    convs = [node for node in nodes if node.op_type == 'Conv']
    assert convs and all(set(conv.input[:2]) <= dequantized for conv in convs)   # int8 in, int8 w
    run_here(run_onnx, tmp_path / 'int8.onnx', '--data-path', data, '--workers', 0,
             '--json', tmp_path / 'int8.json', check=True)
    int8 = json.loads((tmp_path / 'int8.json').read_text())
    assert abs(int8['mIoU'] - evaluated['--ckpt']['mIoU']) <= 2.0, (int8, evaluated)
    lines = []
    run_onnx.benchmark_onnx(run_onnx.OnnxModel(tmp_path / 'int8.onnx'), size=(64, 128),
                              warmup=1, rounds=2, log=lines.append)
    assert 'ONNX int8' in lines[0] and lines[-1].startswith('FPS: ')
    monkeypatch.setattr(export_onnx, 'cpu_has_int8_dot', lambda: False)
    export_onnx.export_int8(model, tmp_path / 'again.onnx', images[:1], log=lines.append)
    assert lines[-1].startswith('this CPU has no int8 dot-product instructions')


def test_onnx_file_with_logits_segments_images_as_its_checkpoint(own_images, initial_checkpoint,
                                                                 tmp_path):
    """A file with logits takes the --images path's rescale, scores resized before the argmax,
    and the int8 export's command line calibrates on a folder, rescaled as --images does."""
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnx')
    model = bisenet.model_from_checkpoint(initial_checkpoint).eval()
    export_onnx.export_onnx(model, tmp_path / 'm.onnx', logits=True, check_sizes=((64, 128),),
                           log=lambda line: None)
    for flag, source in (('--ckpt', initial_checkpoint), ('--onnx', tmp_path / 'm.onnx')):
        evaluate_model(flag, source, '--images', own_images / 'street.png', own_images / 'sub',
                       '--scale', 256, 128, '--workers', 0, '--out-dir', tmp_path / flag,
                       check=True)
    for label in (tmp_path / '--ckpt').rglob('*.png'):
        other = np.array(Image.open(tmp_path / '--onnx' / label.relative_to(tmp_path / '--ckpt')))
        assert (np.array(Image.open(label)) == other).mean() > 0.999, label
    result = run_here(export_onnx, '--ckpt', initial_checkpoint, tmp_path / 'i8.onnx', '--int8',
                      '--calibrate', own_images, '--calibrate-count', 3, '--scale', 128, 64,
                      check=True)
    # Seven files: the first, fourth and last to calibrate on, the other four held out, of
    # which broken.png is named and skipped.
    skipped = result.stderr.strip().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(f'skipped {own_images / "broken.png"}')
    assert 'calibrating the int8 model on 3 images' in result.stdout
    assert 'of 3 held-out images' in result.stdout and (tmp_path / 'i8.onnx').is_file()


def test_openvino_evaluates_an_exported_file_as_onnxruntime_does(data, initial_checkpoint,
                                                                  tmp_path, monkeypatch):
    """The same file, run by OpenVINO in the precision it picks (bf16 on CPUs that have it)
    and by onnxruntime: the same mIoU within 0.1, labels equal on >= 99.5% of the pixels; the
    benchmark times both side by side."""
    for package in ('onnx', 'onnxruntime', 'openvino'):
        pytest.importorskip(package)
    model = bisenet.model_from_checkpoint(initial_checkpoint).eval()
    export_onnx.export_onnx(model, tmp_path / 'm.onnx', check_sizes=((64, 128),),
                            log=lambda line: None)
    metrics, equal, total = {}, 0, 0
    for name in run_onnx.RUNTIMES:
        run_here(run_onnx, tmp_path / 'm.onnx', '--runtime', name, '--data-path', data,
                 '--workers', 0, '--json', tmp_path / f'{name}.json', '--out-dir', tmp_path / name,
                 check=True)
        metrics[name] = json.loads((tmp_path / f'{name}.json').read_text())['mIoU']
    assert abs(metrics['openvino'] - metrics['onnxruntime']) <= 0.1, metrics
    for label in (tmp_path / 'onnxruntime').rglob('*.png'):
        other = np.array(Image.open(tmp_path / 'openvino' / label.relative_to(tmp_path /
                                                                              'onnxruntime')))
        equal, total = equal + int((np.array(Image.open(label)) == other).sum()), total + other.size
    assert total and equal / total >= 0.995, equal / total
    lines = []
    run_onnx.benchmark_onnx(run_onnx.OnnxModel(tmp_path / 'm.onnx', runtime='openvino'),
                            size=(64, 128), warmup=1, rounds=2, log=lines.append)
    assert 'OpenVINO on the CPU in' in lines[0] and 'x the time of openvino' in lines[1]
    assert 'in OpenVINO\'s own call' in lines[2] and lines[-1].startswith('FPS: ')
    monkeypatch.setitem(sys.modules, 'openvino', None)                   # as if not installed
    assert_one_line_error(run_here(run_onnx, tmp_path / 'm.onnx', '--runtime', 'openvino',
                                   '--benchmark'), 'pip install openvino')


def test_onnx_flags_that_cannot_work_are_one_line(checkpoint, tmp_path, monkeypatch):
    (tmp_path / 'not.onnx').write_bytes(b'not an onnx file')
    cases = [(run_onnx, (tmp_path / 'not.onnx',), 'cannot load'),
             (video_tool, ('--onnx', tmp_path / 'not.onnx', '--ckpt', checkpoint, 'clip.mp4'),
              'exclude each other'),
             (export_onnx, ('--ckpt', checkpoint, tmp_path / 'm.onnx', '--calibrate', tmp_path),
              'go with --int8'),
             (video_tool, ('--onnx', tmp_path / 'not.onnx', '--amp', 'clip.mp4'), 'drop --amp'),
             (export_onnx, ('--ckpt', checkpoint, tmp_path / 'i8.onnx', '--int8', '--data-path',
                            tmp_path / 'nothing'), 'calibrates on --calibrate DIR')]
    if importlib.util.find_spec('onnxruntime') is None:
        cases = cases[1:-1]
    for tool, args, words in cases:
        assert_one_line_error(run_here(tool, *args), words)
    assert_one_line_error(run_here(evaluation, '--ckpt', checkpoint, '--onnx', 'm.onnx'),
                          '--onnx is now python tools/run_onnx.py')
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)
    assert_one_line_error(run_here(run_onnx, tmp_path / 'not.onnx'),
                          'pip install onnx onnxruntime')


def test_onnx_export_without_onnx_names_the_package(checkpoint, tmp_path):
    (tmp_path / 'onnx.py').write_text('raise ImportError("no onnx here")\n')
    env = dict(ENV, PYTHONPATH=f'{tmp_path}{os.pathsep}{HERE}')
    result = subprocess.run([sys.executable, str(HERE / 'tools' / 'export_onnx.py'), '--ckpt',
                             str(checkpoint), str(tmp_path / 'm.onnx')], env=env,
                            capture_output=True, text=True, timeout=240)
    assert_one_line_error(result, 'pip install onnx')
    assert not (tmp_path / 'm.onnx').exists()


# ---- Video -----------------------------------------------------------------------------------


def make_video(path, size, count, rate, audio=True, seed=0, video=True):
    """A video of `count` synthetic street scenes of `size` (w, h) at `rate` frames/s, H.264 (4:4:4
    where the size is odd), with a second of 440 Hz AAC per second of video if `audio`; the
    sound alone without `video`."""
    av = pytest.importorskip('av')
    import fractions
    rng = np.random.default_rng(seed)
    with av.open(str(path), 'w') as container:
        sound = container.add_stream('aac', rate=22050) if audio else None
        if not video:
            count = 0
        video = container.add_stream('libx264', rate=fractions.Fraction(rate)) if video else None
        if video is not None:
            video.width, video.height = size
            video.pix_fmt = 'yuv420p' if size[0] % 2 == 0 and size[1] % 2 == 0 else 'yuv444p'
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(datalib.synthetic_scene(rng, size)[0], 'rgb24')
            frame.pts = i
            container.mux(video.encode(frame))
        if video is not None:
            container.mux(video.encode())
        if sound is not None:
            t = np.arange(int(22050 * max(count, 10) / float(fractions.Fraction(rate))))
            samples = (0.2 * np.sin(2 * np.pi * 440 * t / 22050)).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(samples, format='fltp', layout='mono')
            frame.sample_rate, frame.pts = 22050, 0
            container.mux(sound.encode(frame))
            container.mux(sound.encode())
    return path


def video_facts(path):
    """(frames as RGB arrays, width, height, average rate, duration in s, audio codecs)."""
    import av
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = [frame.to_ndarray(format='rgb24') for frame in container.decode(video)]
        return (frames, video.codec_context.width, video.codec_context.height,
                video.average_rate, container.duration / 1e6,
                [stream.codec_context.name for stream in container.streams.audio])


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
    """An odd-sized Matroska clip with sound at NTSC's 29.97 frames/s, and an MP4 without."""
    root = tmp_path_factory.mktemp('videos')
    make_video(root / 'odd.mkv', (97, 61), 18, '30000/1001')
    make_video(root / 'street.mp4', (160, 90), 8, 10, audio=False, seed=1)
    return root


def test_video_frames_are_the_images_label_maps_at_the_inputs_size_rate_and_sound(
        videos, initial_checkpoint, tmp_path):
    """Two processes share the files; each frame's label map is what --images gives for that
    frame as a PNG, and the overlay video has the input's frames, size, rate, length and sound."""
    result = torchrun('tools/video.py', '--ckpt', initial_checkpoint, videos, '--device', 'cpu',
                      '--scale', 256, 128, '--out-dir', tmp_path / 'labels', '--show-dir',
                      tmp_path / 'show')
    assert 'the model alone at' in result.stdout.strip().splitlines()[-1]
    for name, video in (('odd.mkv', 'odd.mkv.mp4'), ('street', 'street.mp4')):
        source, shown = video_facts(videos / (name if '.' in name else f'{name}.mp4')), \
            video_facts(tmp_path / 'show' / video)
        frames, width, height, rate, length, audio = source
        assert shown[1:4] == (width, height, rate) and len(shown[0]) == len(frames)
        assert abs(shown[4] - length) < 0.05 and shown[5] == audio, (shown[1:], source[1:])
        (tmp_path / 'frames' / name).mkdir(parents=True)
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp_path / 'frames' / name / f'{i:06d}.png')
        labels = sorted((tmp_path / 'labels' / name).glob('*.png'))
        assert [p.name for p in labels] == [f'{i:06d}.png' for i in range(len(frames))]
        # The overlay shows the prediction: it differs from the plain frames.
        assert np.abs(shown[0][0].astype(int) - frames[0]).mean() > 10
    run_here(evaluation, '--ckpt', initial_checkpoint, '--images', tmp_path / 'frames',
             '--device', 'cpu', '--workers', 0, '--scale', 256, 128, '--out-dir',
             tmp_path / 'images', check=True)
    for label in (tmp_path / 'labels').rglob('*.png'):
        expected = Image.open(tmp_path / 'images' / label.relative_to(tmp_path / 'labels'))
        assert np.array_equal(np.array(Image.open(label)), np.array(expected)), label
    assert len(np.unique(np.array(Image.open(label)))) > 1


def test_video_broken_and_cut_off_files_are_named_and_the_rest_written(
        videos, initial_checkpoint, tmp_path):
    make_video(tmp_path / 'long.mkv', (64, 48), 30, 10, audio=False)
    whole = (tmp_path / 'long.mkv').read_bytes()
    (tmp_path / 'cut.mkv').write_bytes(whole[:len(whole) // 2])
    (tmp_path / 'broken.mp4').write_bytes(b'\x00\x00\x00\x18ftypmp42 but nothing after it')
    (tmp_path / 'long.mkv').unlink()
    make_video(tmp_path / 'sound.mkv', (64, 48), 10, 10, video=False)
    shutil.copy(videos / 'street.mp4', tmp_path / 'street.mp4')
    result = run_here(video_tool, '--ckpt', initial_checkpoint, tmp_path / '*.m*', '--device',
                      'cpu', '--scale', 128, 64, '--out-dir', tmp_path / 'labels')
    errors = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(errors) == 4, result.stderr
    assert errors[0].startswith(f'skipped {tmp_path / "broken.mp4"}: FFmpeg cannot open it')
    assert errors[1].startswith(f'cut short {tmp_path / "cut.mkv"}: it breaks off after')
    assert errors[2] == f'skipped {tmp_path / "sound.mkv"}: it holds no video stream'
    assert errors[3] == 'error: 3 of the videos could not be read in full (named above); the ' \
                        'others were written'
    kept = len(list((tmp_path / 'labels' / 'cut.mkv').glob('*.png')))
    assert 0 < kept < 30 and f'after {kept} frames' in errors[1]
    assert len(list((tmp_path / 'labels' / 'street').glob('*.png'))) == 8
    assert not list(tmp_path.rglob('*.tmp'))


def test_video_without_pyav_names_the_package_before_any_work(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'av', None)            # import av fails, as where absent
    (tmp_path / 'clip.mp4').write_bytes(b'')
    result = run_here(video_tool, '--ckpt', checkpoint, tmp_path / 'clip.mp4', '--show-dir',
                      tmp_path / 'show')
    assert_one_line_error(result, 'pip install av')
    assert not (tmp_path / 'show').exists()
    moved = run_here(evaluation, '--ckpt', checkpoint, '--video', tmp_path / 'clip.mp4')
    assert_one_line_error(moved, '--video is now python tools/video.py')
    scale = run_here(evaluation, '--ckpt', checkpoint, '--scale', 512, 256)
    assert_one_line_error(scale, '--scale applies to --images only')


# ---- Training --------------------------------------------------------------------------------

TINY = ['--device', 'cpu', '--crop-size', 64, 64, '--batch-size', 2, '--log-interval', 2,
        '--no-validate']


def test_lr_schedule_phase_boundaries():
    lr = lambda it: train.get_lr(it, 0.025, 160000, 1000)           # noqa: E731
    assert lr(0) == pytest.approx(0.0025)                            # warmup starts at 0.1 x
    assert lr(999) == pytest.approx(0.025)                           # and reaches lr
    assert lr(1000) == pytest.approx(0.025)                          # poly starts there
    assert lr(500) == pytest.approx(0.0025 + 0.0225 * 500 / 999)
    assert lr(80000) == pytest.approx(1e-4 + (0.025 - 1e-4) * (1 - 79000 / 158999) ** 0.9)
    assert lr(159999) == pytest.approx(1e-4)                         # floor at the last iter
    assert all(lr(t) >= lr(t + 1) for t in range(1000, 160000, 997))


def test_loss_averages_over_all_pixels_ignored_ones_included():
    logits = torch.randn(2, 19, 4, 4)
    label = torch.randint(0, 19, (2, 8, 8))
    label[:, :4] = 255
    losses = train.criterion([logits] * 3, label)
    up = F.interpolate(logits, size=(8, 8), mode='bilinear', align_corners=False)
    per_pixel = F.cross_entropy(up, label, ignore_index=255, reduction='none')
    assert losses[0] == pytest.approx(per_pixel.sum().item() / 128)
    assert losses[0] == pytest.approx(F.cross_entropy(up, label, ignore_index=255).item() / 2)


def test_exact_resume_is_bit_identical(data, tmp_path):
    common = [*TINY, '--data-path', data, '--iters', 6, '--ckpt-interval', 2, '--seed', 5]
    train_here(*common, '--work-dir', tmp_path / 'full', '--workers', 0)
    train_here(*common, '--work-dir', tmp_path / 'resumed', '--workers', 2,
        '--resume-from', tmp_path / 'full' / 'iter_4.pth')
    full, resumed = (torch.load(tmp_path / d / 'latest.pth', weights_only=True)
                     for d in ('full', 'resumed'))
    assert full['iteration'] == resumed['iteration'] == 6
    for key, value in full['model'].items():
        assert torch.equal(value, resumed['model'][key]), key
    early = torch.load(tmp_path / 'full' / 'iter_4.pth', weights_only=True)['model']
    assert not all(torch.equal(v, full['model'][k]) for k, v in early.items())
    log = [json.loads(line) for line in (tmp_path / 'full' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['iter'] for r in log] == [2, 4, 6] and all(r['loss'] > 0 for r in log)


def test_sigterm_saves_at_the_announced_sync_point_and_a_second_ctrl_c_quits_at_once(data,
                                                                                     tmp_path):
    common = [*TINY, '--data-path', data, '--workers', 2, '--work-dir', tmp_path]
    command = [sys.executable, str(HERE / 'train.py'), *map(str, common), '--iters', '100000',
               '--ckpt-interval', '1000']
    log = tmp_path / 'train.log'
    # SIGTERM, a scheduler's preemption: announced, then latest.pth at the next sync point, which
    # only logs (no checkpoint is due for 1000 iterations): the signal's own save.
    job = subprocess.Popen(command, env=ENV, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    wait_for_line(log, 'iter 4/')
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    [announced] = [int(line.split()[4].rstrip(',')) for line in out.splitlines()
                   if line.startswith('SIGTERM: stopping at iteration')]
    assert f'stopped by SIGTERM at iteration {announced}: saved latest.pth' in out
    assert bisenet.read_resumable(tmp_path / 'latest.pth')['iteration'] == announced
    assert not list(tmp_path.glob('iter_*.pth'))
    # Ctrl-C: one line at once naming where it will stop; a second Ctrl-C quits at once, and
    # latest.pth is the one written before, untouched.
    saved = (tmp_path / 'latest.pth').read_bytes()
    job = subprocess.Popen(command + ['--log-interval', '1000', '--resume-from', 'auto'],
                           env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(log, 'crop 64x64, 100000 iterations', count=2)     # its handler is in place
    job.send_signal(signal.SIGINT)
    sent = time.time()
    wait_for_line(log, 'SIGINT: stopping at iteration 1000, the next sync point', timeout=10)
    assert time.time() - sent < 1.0
    job.send_signal(signal.SIGINT)
    # Within seconds the output ends too: the data workers went with the trainer, rather than
    # holding the pipes open until they noticed it had gone (5 s).
    out, err = job.communicate(timeout=4)
    assert job.returncode == 130
    assert 'Ctrl-C again quits at once' in out
    assert_one_line_error(subprocess.CompletedProcess(command, job.returncode, out, err),
                          'interrupted (Ctrl-C)', f'last: {tmp_path / "latest.pth"}')
    assert (tmp_path / 'latest.pth').read_bytes() == saved and not list(tmp_path.glob('*.tmp'))
    result = train_here(*common, '--iters', announced + 2, '--resume-from', 'auto')
    assert f'resumed from {tmp_path / "latest.pth"} at iteration {announced}' in result.stdout
    assert bisenet.read_resumable(tmp_path / 'latest.pth')['iteration'] == announced + 2


def test_main_runs_twice_in_one_process_closing_what_it_opened(data, tmp_path):
    handlers = [signal.getsignal(sig) for sig in train.STOP_SIGNALS]
    for again in ([], ['--start-over']):
        train.main([*map(str, TINY), '--data-path', str(data), '--iters', '2', '--workers', '0',
                    '--work-dir', str(tmp_path), *again])
    assert [signal.getsignal(sig) for sig in train.STOP_SIGNALS] == handlers
    still_open = [os.readlink(fd) for fd in Path('/proc/self/fd').iterdir() if fd.is_symlink()]
    assert not [path for path in still_open if str(tmp_path) in path]
    # On CPU the log shows the process's peak resident memory, named as such.
    [record] = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert 0.1 < record['peak_rss_gb'] < 64 and 'memory_gb' not in record
    assert f'peak RSS {record["peak_rss_gb"]:.2f} GB' in (tmp_path / 'train.log').read_text()


def read_events(folder):
    """Every scalar's and picture's steps, in the order the event files hold them, read with
    TensorBoard's own event file reader (no purging of orphaned steps: what is on disk)."""
    loader = pytest.importorskip('tensorboard.backend.event_processing.event_file_loader')
    scalars, pictures = {}, {}
    for path in sorted(Path(folder).glob('events.out.tfevents.*')):
        for event in loader.EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                kind = pictures if value.metadata.plugin_data.plugin_name == 'images' else scalars
                kind.setdefault(value.tag, []).append(event.step)
    return scalars, pictures


def test_tensorboard_curves_and_pictures_continue_after_a_kill_and_resume(own_data, tmp_path):
    pytest.importorskip('tensorboard')
    args = [sys.executable, str(HERE / 'train.py'), '--data-path', str(own_data), '--device',
            'cpu', '--crop-size', '64', '--batch-size', '2', '--workers', '2', '--iters', '24',
            '--val-interval', '12', '--ckpt-interval', '12', '--log-interval', '4',
            '--work-dir', str(tmp_path), '--tensorboard']
    process = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(tmp_path / 'train.log', 'iter 16/24', job=process)
    deadline = time.time() + 60             # until step 16, past the checkpoint, is on disk
    while time.time() < deadline and 16 not in read_events(tmp_path / 'tensorboard')[0].get(
            'train/loss', []):
        time.sleep(0.05)
    process.kill()                                     # kill -9 between the two validations
    process.wait()
    orphaned, _ = read_events(tmp_path / 'tensorboard')
    assert orphaned['train/loss'][-2:] == [12, 16] and orphaned['val/mIoU'] == [12]
    result = train_here(*args[2:], '--resume-from', 'auto')
    assert f'tensorboard --logdir {tmp_path / "tensorboard"}' in result.stdout
    scalars, pictures = read_events(tmp_path / 'tensorboard')
    for tag in ('train/loss', 'train/loss_decode', 'train/lr', 'train/images_per_s'):
        assert scalars[tag] == list(range(4, 25, 4)), tag       # each step once, in order
    for tag in ('val/mIoU', 'val/aAcc', 'val/IoU/side_walk', 'val/Acc/road'):
        assert scalars[tag] == [12, 24], tag
    assert len(pictures) == 4 and all(steps == [12, 24] for steps in pictures.values())
    records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [r['iter'] for r in records if 'loss' in r] == scalars['train/loss']    # no doubles
    assert [r['iter'] for r in records if 'per_class' in r] == [12, 24]
    assert 'side walk' in records[-1]['per_class']


def test_tensorboard_without_the_package_is_one_line(data, tmp_path):
    (tmp_path / 'tensorboard.py').write_text('raise ImportError("no tensorboard here")\n')
    env = dict(ENV, PYTHONPATH=f'{tmp_path}{os.pathsep}{HERE}')
    result = subprocess.run([sys.executable, str(HERE / 'train.py'), *map(str, TINY),
                             '--data-path', str(data), '--iters', '2', '--tensorboard',
                             '--work-dir', str(tmp_path / 'work')], env=env,
                            capture_output=True, text=True, timeout=240)
    assert_one_line_error(result, 'pip install tensorboard')
    assert not (tmp_path / 'work').exists()


def test_train_with_a_cache_says_where_and_how_large(data, tmp_path):
    # An entry is a 4 KiB header, then 4 bytes a pixel (RGB and the label): 8 images of 128 x 64.
    entry = 4096 + 128 * 64 * 4
    result = train_here(*TINY, '--data-path', data, '--iters', 2, '--workers', 1,
                        '--work-dir', tmp_path / 'run', '--cache-dir', tmp_path / 'cache')
    assert (f'decoded-data cache {tmp_path / "cache" / "train"}: 8 images, '
            f'{8 * entry / 1e6:.2f} MB ({8 * entry / 1e6:.2f} MB still to write') in result.stdout
    written = len(list((tmp_path / 'cache' / 'train').rglob('*.rgbl')))
    assert written >= 2 and sum(p.stat().st_size for p in (tmp_path / 'cache').rglob('*.rgbl')) \
        == written * entry
    note = datalib.Cityscapes(data, 'train', cache_dir=tmp_path / 'cache').cache_note
    assert f'8 images, {8 * entry / 1e6:.2f} MB ({(8 - written) * entry / 1e6:.2f} MB still' in note
    assert datalib.size_text(25.1e9) == '25.1 GB'



def test_torchrun_two_processes(two_process_run):
    work, result = two_process_run
    assert 'x 2 process(es) (gloo)' in result.stdout and 'global batch 4' in result.stdout
    assert torch.load(work / 'latest.pth', weights_only=True)['iteration'] == 12


# ---- Faults: a full disk, a second run, a bad checkpoint, a dead worker or rank --------------

FAULT_RUN = [*TINY, '--iters', 12, '--ckpt-interval', 4, '--workers', 0]


def processes(*words, rank=None, parent=None):
    """The pids of the processes whose command line holds every word (with rank: whose RANK is
    that; with parent: whose parent is that pid): how a test finds a DataLoader worker or one
    torchrun rank (not its workers, which share its command line and environment) to kill."""
    found = []
    for entry in Path('/proc').iterdir():
        try:
            cmdline = (entry / 'cmdline').read_bytes().replace(b'\0', b' ').decode()
            environ = (entry / 'environ').read_bytes().split(b'\0')
            ppid = int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if all(str(w) in cmdline for w in words) and \
                (rank is None or f'RANK={rank}'.encode() in environ) and \
                (parent is None or ppid == parent):
            found.append(int(entry.name))
    return found


def wait_for_line(path, text, timeout=120, count=1, job=None):
    """Wait until `text` stands `count` times in the file at `path`; with a job, fail at once
    if it ends first."""
    deadline = time.time() + timeout

    def found():
        return path.exists() and path.read_text().count(text) >= count
    while time.time() < deadline and not found():
        if job is not None and job.poll() is not None:
            raise AssertionError(f'the job ended before {text!r} appeared: '
                                 f'{job.communicate()[1][-2000:]}')
        time.sleep(0.02)
    assert found(), f'{text!r} never appeared {count} time(s) in {path}'


@pytest.fixture(scope='module')
def two_process_run(data, tmp_path_factory):
    """FAULT_RUN on one node with two processes: its work dir and what it printed."""
    work = tmp_path_factory.mktemp('two_processes')
    return work, torchrun('train.py', *FAULT_RUN, '--data-path', data, '--work-dir', work)


@pytest.fixture(scope='module')
def one_process_weights(data, tmp_path_factory):
    """The final weights of FAULT_RUN in one process, uninterrupted."""
    work = tmp_path_factory.mktemp('one_process')
    run('train.py', *FAULT_RUN, '--data-path', data, '--work-dir', work)
    return torch.load(work / 'latest.pth', weights_only=True)['model']


@pytest.fixture(scope='module')
def two_process_weights(two_process_run):
    return torch.load(two_process_run[0] / 'latest.pth', weights_only=True)['model']


def assert_same_weights(path, weights):
    final = torch.load(path, weights_only=True)['model']
    assert all(torch.equal(final[k], weights[k]) for k in weights)


def test_kill_9_with_busy_workers_and_an_immediate_resume_ten_times_ends_as_one_run(
        data, tmp_path, one_process_weights):
    """What the out-of-memory killer does, ten times, each restart at once (no sleep): the work
    dir's lock died with the trainer, so no restart is refused while its orphaned data workers
    live on, and the resumed runs end with the weights of one uninterrupted run."""
    command = [sys.executable, str(HERE / 'train.py'), *map(str, FAULT_RUN), '--data-path',
               str(data), '--work-dir', str(tmp_path), '--workers', '2', '--log-interval', '1',
               '--resume-from', 'auto']
    log = tmp_path / 'train.log'
    for attempt in range(10):
        logged = log.read_text().count('\niter ') if log.exists() else 0
        saved = max([int(p.stem[5:]) for p in tmp_path.glob('iter_*.pth')] or [0])
        job = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        # killed 1 to 5 iterations in (mid-interval, at a checkpoint, or while one is written),
        # before the last one
        steps = min(1 + attempt * 3 % 5, 11 - saved)
        wait_for_line(log, '\niter ', count=logged + steps, job=job)
        job.kill()
        job.wait()
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert log.read_text().count('resumed from') >= 3
    assert_same_weights(tmp_path / 'latest.pth', one_process_weights)


def test_torchrun_restarts_a_job_whose_rank_0_was_killed_and_ends_with_the_same_weights(
        data, tmp_path, two_process_weights):
    """Rank 0 holds the work dir's lock and has data workers: the restart right after its kill
    -9 takes the lock at once, and the job ends with the uninterrupted job's weights."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
               '--nproc_per_node=2', '--max-restarts=1', str(HERE / 'train.py'),
               *map(str, FAULT_RUN), '--data-path', str(data), '--work-dir', str(tmp_path),
               '--workers', '2', '--resume-from', 'auto']
    job = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    wait_for_line(tmp_path / 'train.log', 'iter 6/12', job=job)
    [rank0] = processes('train.py', tmp_path, rank=0, parent=job.pid)
    os.kill(rank0, signal.SIGKILL)
    out, err = job.communicate(timeout=240)
    assert job.returncode == 0, err[-3000:]
    assert 'resumed from' in out and 'Traceback' not in err and 'in use by' not in err
    # the survivor's last words: one line, not gloo's traceback
    assert 'error: another process of this job died' in err and 'Connection reset' not in err
    assert_same_weights(tmp_path / 'latest.pth', two_process_weights)


def test_two_nodes_on_one_host_end_with_the_weights_of_one_node(data, tmp_path,
                                                                two_process_weights):
    for attempt in range(3):
        # A port free now may be taken before node 0 binds it: then the nodes start again on
        # another one, in a work dir of their own.
        with socket.socket() as probe:
            probe.bind(('127.0.0.1', 0))
            port = probe.getsockname()[1]
        work = tmp_path / f'attempt{attempt}'
        nodes = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes=2',
                                   f'--node_rank={node}', '--nproc_per_node=1',
                                   '--master_addr=127.0.0.1', f'--master_port={port}',
                                   str(HERE / 'train.py'), *map(str, FAULT_RUN), '--data-path',
                                   str(data), '--work-dir', str(work)], env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for node in (0, 1)]
        errors = [node.communicate(timeout=240)[1] for node in nodes]
        if not any('ddress already in use' in err for err in errors):
            break
    for node, err in zip(nodes, errors):
        assert node.returncode == 0, err[-3000:]
    assert_same_weights(work / 'latest.pth', two_process_weights)


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_last_checkpoint_resumes(data, tmp_path):
    disk = tmp_path / 'disk'
    disk.mkdir()
    # A real full disk: a 300 MB tmpfs holds two checkpoints (107 MB each) but not a third.
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=300m', 'tmpfs',
                                            str(disk)], capture_output=True).returncode != 0:
        pytest.skip('mounting a small disk needs root')
    try:
        result = run('train.py', *TINY, '--data-path', data, '--iters', 6, '--ckpt-interval', 2,
                     '--workers', 2, '--work-dir', disk, check=False)
        assert_one_line_error(result, f'cannot write the checkpoint {disk / "iter_4.pth"}',
                              'MB are free there')
        assert not list(disk.glob('*.tmp'))
        assert bisenet.read_resumable(disk / 'latest.pth')['iteration'] == 2
        assert bisenet.read_resumable(disk / 'iter_2.pth')['iteration'] == 2
    finally:
        subprocess.run(['umount', '-l', str(disk)])


def test_a_checkpoint_write_that_fails_midway_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / 'latest.pth'
    target.write_bytes(b'the previous checkpoint')

    def full_disk(state, path):
        Path(path).write_bytes(b'half a checkpoint')
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 9 vs 8')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(bisenet.CheckpointError, match='latest.pth .the write failed.: it needs'):
        train.save_checkpoint({'w': torch.zeros(1000)}, target)
    assert target.read_bytes() == b'the previous checkpoint'
    assert list(tmp_path.iterdir()) == [target]


def test_a_second_run_in_a_live_work_dir_is_refused_in_one_line(data, tmp_path):
    first = subprocess.Popen([sys.executable, str(HERE / 'train.py'), *map(str, TINY),
                              '--data-path', str(data), '--iters', '100000', '--workers', '2',
                              '--work-dir', str(tmp_path)], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    wait_for_line(tmp_path / 'train.log', 'iter 2/', job=first)
    second = run_here(train, *TINY, '--data-path', data, '--iters', 2, '--workers', 0,
                      '--work-dir', tmp_path)
    assert_one_line_error(second, f'{tmp_path} is in use by another training run',
                          f'pid {first.pid} on {socket.gethostname()}', '--work-dir')
    wait_for_line(tmp_path / 'train.log', 'iter 6/', job=first)    # the first goes on, unharmed
    assert (tmp_path / 'train.log').read_text().count('BiSeNetV1') == 1
    first.kill()
    first.wait()


@contextlib.contextmanager
def small_disk(path, size='1m', read_only=False):
    """A tmpfs of `size` at `path` (made), for a full or a read-only disk; skips where mounting
    needs the root this test does not have."""
    path.mkdir(parents=True, exist_ok=True)
    options = f'size={size}' + (',ro' if read_only else '')
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs',
                                            str(path)], capture_output=True).returncode != 0:
        pytest.skip('mounting a small disk needs root')
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)])


def fill(disk, leave=0):
    """Fill `disk` but for about `leave` bytes."""
    (disk / 'filler').write_bytes(bytes(max(shutil.disk_usage(disk).free - leave, 0)))


def copy_of(data, tmp_path):
    shutil.copytree(data, tmp_path / 'copy')
    return tmp_path / 'copy'


def test_a_truncated_val_image_is_found_by_the_check_and_skipped_after_the_checkpoint(
        data, tmp_path, capsys):
    """The check decodes images, so it finds a truncated one; a run whose validation meets it
    has saved its checkpoint first, names the image and trains on; eval.py writes its table
    and ends with status 1."""
    root = copy_of(data, tmp_path)
    broken = sorted((root / 'leftImg8bit' / 'val').rglob('*.png'))[1]
    broken.write_bytes(broken.read_bytes()[:600])
    assert check_data.check_data(root, processes=1) == 1
    assert f'cannot read {broken}' in capsys.readouterr().out
    validating = [arg for arg in TINY if arg != '--no-validate']
    result = train_here(*validating, '--data-path', root, '--iters', 2, '--workers', 0,
                        '--work-dir', tmp_path / 'run', '--val-interval', 2, '--ckpt-interval', 2)
    assert f'validation left out 1 image(s) it could not read: cannot read {broken}' \
        in result.stdout
    assert bisenet.read_resumable(tmp_path / 'run' / 'iter_2.pth')['iteration'] == 2
    assert json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()[-1])[
        'skipped_images'] == 1
    evaluated = run_here(evaluation, '--ckpt', tmp_path / 'run' / 'latest.pth', '--data-path',
                         root, '--device', 'cpu', '--workers', 0, '--json', tmp_path / 'm.json')
    assert evaluated.returncode == 1 and 'mIoU' in evaluated.stdout
    assert evaluated.stderr.startswith(f'skipped cannot read {broken}')
    assert evaluated.stderr.strip().splitlines()[-1].startswith('error: 1 of the images could '
                                                               'not be read')
    assert json.loads((tmp_path / 'm.json').read_text())['mIoU'] >= 0


def test_a_fresh_run_over_an_earlier_runs_checkpoints_is_refused_and_start_over_keeps_them(
        data, tmp_path):
    run = [*TINY, '--data-path', data, '--iters', 2, '--workers', 0, '--work-dir', tmp_path]
    train_here(*run)
    saved = {p.name: p.read_bytes() for p in tmp_path.glob('*.pth')}
    assert set(saved) == {'latest.pth', 'iter_2.pth'}
    again = run_here(train, *run)
    assert_one_line_error(again, f'{tmp_path} holds an earlier run\'s checkpoints (latest.pth, '
                                 f'iter_2.pth)', '--resume-from auto', '--start-over')
    assert {p.name: p.read_bytes() for p in tmp_path.glob('*.pth')} == saved
    over = train_here(*run, '--start-over')
    assert f'the earlier run\'s checkpoints and records are now in {tmp_path / "earlier-1"}' \
        in over.stdout
    assert {p.name: p.read_bytes() for p in (tmp_path / 'earlier-1').glob('*.pth')} == saved
    assert bisenet.read_resumable(tmp_path / 'latest.pth')['iteration'] == 2
    assert (tmp_path / 'earlier-1' / 'metrics.jsonl').is_file()


def test_outputs_on_a_full_disk_are_one_line_and_the_earlier_files_stay_whole(
        own_images, initial_checkpoint, tmp_path):
    """--images over an earlier run's outputs on a disk too full for them: one line naming the
    file, what it needs and what is free; every earlier file as it was, no temporary file."""
    with small_disk(tmp_path / 'disk', '2m') as disk:
        segment = ['--ckpt', initial_checkpoint, '--images', own_images / 'street.png',
                   own_images / 'palette.png', '--device', 'cpu', '--workers', 0, '--scale',
                   256, 128, '--out-dir', disk / 'labels', '--show-dir', disk / 'pictures']
        run_here(evaluation, *segment, check=True)
        earlier = {p: p.read_bytes() for p in disk.rglob('*.png')}
        assert len(earlier) == 4
        fill(disk, leave=1024)
        result = run_here(evaluation, *segment)
        assert_one_line_error(result, f'cannot write {disk / "labels"}', 'No space left',
                              'it needs', 'free there')
        assert {p: p.read_bytes() for p in disk.rglob('*.png')} == earlier
        assert not list(disk.rglob('*.tmp'))
        (disk / 'filler').unlink()
        fill(disk, leave=40 * 1024)               # --json: checked before, written whole
        result = run_here(evaluation, '--ckpt', initial_checkpoint, '--data-path', own_images,
                          '--json', disk / 'deep' / 'folder' / 'm.json')
        assert result.returncode == 1 and 'Traceback' not in result.stderr


@pytest.mark.skipif(importlib.util.find_spec('onnx') is None, reason='needs onnx')
def test_an_onnx_export_to_a_read_only_or_full_disk_is_one_line_and_leaves_nothing(
        initial_checkpoint, tmp_path):
    with small_disk(tmp_path / 'ro', read_only=True) as read_only:
        result = run_here(export_onnx, '--ckpt', initial_checkpoint, read_only / 'm.onnx')
        assert_one_line_error(result, f'the ONNX file\'s folder {read_only}: cannot write in this folder '
                                      f'(Read-only file system)')
    with small_disk(tmp_path / 'full', '1m') as full:
        (full / 'm.onnx').write_bytes(b'the earlier export')
        result = run_here(export_onnx, '--ckpt', initial_checkpoint, full / 'm.onnx')
        assert_one_line_error(result, f'cannot write {full / "m.onnx"}', 'it needs 40.')
        assert [p.name for p in full.iterdir()] == ['m.onnx']
        assert (full / 'm.onnx').read_bytes() == b'the earlier export'


def test_json_naming_a_folder_or_a_read_only_place_is_refused_before_the_evaluation(
        data, checkpoint, tmp_path):
    evaluate = ['--ckpt', checkpoint, '--data-path', data, '--device', 'cpu', '--workers', 0]
    result = run_here(evaluation, *evaluate, '--json', tmp_path)
    assert_one_line_error(result, f'--json {tmp_path} is a folder')
    assert 'mIoU' not in result.stdout
    with small_disk(tmp_path / 'ro', read_only=True) as read_only:
        result = run_here(evaluation, *evaluate, '--json', read_only / 'm.json')
        assert_one_line_error(result, f'--json {read_only}: cannot write in this folder')
        assert 'mIoU' not in result.stdout


def interrupt(command, ready, env=ENV):
    """Run `command`, send Ctrl-C once the path `ready` exists, return the CompletedProcess."""
    job = subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not ready.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=60)
    return subprocess.CompletedProcess(command, job.returncode, out, err)


# Sends one Ctrl-C at a chosen moment of a script's run: as torch starts to load, or in fork's
# handlers as the first data worker starts, where Python ignores the KeyboardInterrupt raised.
CTRL_C_AT = """
import os, runpy, signal, sys
moment, script, sent = sys.argv[1], sys.argv[2], []
def ctrl_c(*_):
    if not sent:
        sent.append(os.kill(os.getpid(), signal.SIGINT))
class AtTorch:
    def find_spec(self, name, *_):
        if name == 'torch':
            ctrl_c()
if moment == 'import':
    sys.meta_path.insert(0, AtTorch())
else:
    os.register_at_fork(after_in_parent=ctrl_c)
sys.argv, sys.path[0] = sys.argv[2:], os.path.dirname(script)
runpy.run_path(script, run_name='__main__')
"""


def test_ctrl_c_while_torch_loads_or_a_data_worker_forks_is_one_line(
        data, own_images, initial_checkpoint, tmp_path):
    segment = ['eval.py', '--ckpt', initial_checkpoint, '--images', own_images, '--device', 'cpu',
               '--workers', '1', '--out-dir', tmp_path / 'labels']
    evaluate = ['eval.py', '--ckpt', initial_checkpoint, '--data-path', data, '--device', 'cpu',
                '--workers', '1']
    train = ['train.py', '--demo', '--work-dir', tmp_path / 'run', '--device', 'cpu']
    for moment, command in (('import', train), ('import', ['tools/check_data.py', tmp_path]),
                            ('import', segment), ('fork', segment), ('fork', evaluate),
                            ('fork', train)):          # its first: the look at the labels
        result = subprocess.run([sys.executable, '-c', CTRL_C_AT, moment, HERE / command[0]]
                                + [str(a) for a in command[1:]],
                                env=ENV, text=True, capture_output=True, timeout=300)
        assert result.returncode == 130, (command[0], moment, result.stderr[-600:])
        assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
        assert result.stderr.startswith('error: interrupted (Ctrl-C)')
    assert not list(tmp_path.glob('labels/*')) and not list(tmp_path.glob('run/*.pth'))


def test_ctrl_c_in_eval_is_one_line_saying_how_far_it_got(own_images, initial_checkpoint, tmp_path):
    photos = tmp_path / 'photos'
    photos.mkdir()
    for i in range(12):
        shutil.copy(own_images / 'street.png', photos / f'{i:02d}.png')
    command = [sys.executable, str(HERE / 'eval.py'), '--ckpt', str(initial_checkpoint),
               '--device', 'cpu', '--workers', '1']
    result = interrupt(command + ['--images', str(photos), '--out-dir', str(tmp_path / 'out')],
                       tmp_path / 'out' / '00.png')
    assert result.returncode == 130
    assert_one_line_error(subprocess.CompletedProcess([], 1, result.stdout, result.stderr),
                          'interrupted (Ctrl-C) after', 'of 12 images (images)')
    assert not list((tmp_path / 'out').glob('*.tmp'))
    for label in (tmp_path / 'out').glob('*.png'):
        Image.open(label).load()                            # every file written is whole
    # Ctrl-C after the first of 40 pictures: while eval.py works, well before the end.
    many = datalib.make_synthetic_cityscapes(tmp_path / 'many', num_train=1, num_val=40)
    result = interrupt(command + ['--data-path', str(many), '--show-dir', str(tmp_path / 'show')],
                       tmp_path / 'show' / 'city0' / 'city0_000000_000019.png')
    assert result.returncode == 130 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('error: interrupted (Ctrl-C)')


def test_a_disk_that_fills_while_training_logs_is_one_line(data, tmp_path):
    with small_disk(tmp_path / 'disk', '4m') as disk:
        job = subprocess.Popen([sys.executable, str(HERE / 'train.py'), *map(str, TINY),
                                '--data-path', str(data), '--iters', '100000', '--workers', '0',
                                '--log-interval', '1', '--work-dir', str(disk)], env=ENV,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for_line(disk / 'train.log', 'iter 2/', job=job)
        fill(disk)
        out, err = job.communicate(timeout=120)
        result = subprocess.CompletedProcess([], job.returncode, out, err)
        assert_one_line_error(result, f'cannot write {disk}', 'No space left on device',
                              '--resume-from auto')


def test_flags_and_places_that_cannot_work_are_one_line_before_any_work(data, tmp_path):
    result = run_here(train, *TINY, '--data-path', data, '--crop-size', 100000)
    assert_one_line_error(result, '--crop-size 100000 100000', 'give a smaller --crop-size')
    assert_one_line_error(run_here(evaluation, '--benchmark', '--threads', -1),
                          '--threads must be at least 1')
    assert_one_line_error(run_here(train, *TINY, '--data-path', data, '--lr', 'nan'),
                          '--lr must be positive, not nan')
    result = run_here(train, *TINY, '--data-path', data, '--workers', -1)
    assert_one_line_error(result, '--workers cannot be negative, not -1')
    assert 'warmup' not in result.stderr
    with small_disk(tmp_path / 'ro', read_only=True) as read_only:
        assert_one_line_error(run_here(train, *TINY, '--data-path', data, '--work-dir',
                                       read_only), f'--work-dir {read_only}: cannot write in '
                                                   f'this folder (Read-only file system)')


def test_a_16_bit_greyscale_image_is_read_as_the_reference_reads_it(initial_checkpoint, tmp_path):
    """cv2 keeps a 16-bit PNG's high byte; convert('RGB') would clip it at 255 (a white
    picture)."""
    grey = datalib.synthetic_scene(np.random.default_rng(3), (160, 96))[0].mean(2)
    deep = (grey.astype(np.uint16) << 8) | np.uint16(0x5A)
    (tmp_path / 'in').mkdir()
    Image.fromarray(deep).save(tmp_path / 'in' / 'deep.png')
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / 'in' / 'flat.png')
    assert Image.open(tmp_path / 'in' / 'deep.png').mode.startswith('I')
    run_here(evaluation, '--ckpt', initial_checkpoint, '--images', tmp_path / 'in', '--device',
             'cpu', '--workers', 0, '--scale', 160, 96, '--out-dir', tmp_path / 'out', check=True)
    assert np.array_equal(np.array(Image.open(tmp_path / 'out' / 'deep.png')),
                          np.array(Image.open(tmp_path / 'out' / 'flat.png')))


def test_the_answers_a_user_needs_for_the_wrong_file_in_the_wrong_place(data, tmp_path):
    model = bisenet.BiSeNetV1()
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'bisenet.pth')
    resnet = {k: v for k, v in model.backbone.context_path.backbone.state_dict().items()}
    torch.save(dict(resnet, **{'fc.weight': torch.zeros(1000, 512)}), tmp_path / 'resnet18.pth')
    torch.save(model, tmp_path / 'whole.pth')                    # a pickled model
    common = [*TINY, '--data-path', data, '--iters', 2, '--workers', 0]
    cases = [
        (train, ['--load-from', tmp_path / 'resnet18.pth'], 'give it with --pretrained'),
        (train, ['--pretrained', tmp_path / 'bisenet.pth'], 'give it with --load-from'),
        (train, ['--data-path', tmp_path / 'bisenet.pth'], 'is a file, not a folder'),
        (evaluation, ['--ckpt', tmp_path, '--data-path', data], f'{tmp_path} is a folder'),
        (run_onnx, [tmp_path / 'bisenet.pth'], 'give it with --ckpt'),
        (evaluation, ['--ckpt', tmp_path / 'bisenet.pth'], 'give --data-path ROOT'),
        (evaluation, ['--ckpt', tmp_path / 'resnet18.pth', '--data-path', data],
         'train one from them with train.py --pretrained')]
    for module, args, words in cases:
        extra = [*common, '--work-dir', tmp_path / 'never'] if module is train else []
        assert_one_line_error(run_here(module, *extra, *args), words)
    assert not (tmp_path / 'never').exists()                   # a failed start leaves nothing
    whole = run_here(evaluation, '--ckpt', tmp_path / 'whole.pth', '--data-path', data,
                     '--trust-pickle', '--device', 'cpu', '--workers', 0)
    assert whole.returncode == 0 and 'mIoU' in whole.stdout
    train_here(*common, '--work-dir', tmp_path / 'run')
    resumed = train_here(*common, '--work-dir', tmp_path / 'run', '--iters', 4,
                         '--resume-from', 'auto', '--batch-size', 4)
    assert 'continues with --batch-size 4 (it trained with 2)' in resumed.stdout


def test_auto_resume_skips_checkpoints_that_cannot_be_read(data, tmp_path):
    common = [*TINY, '--data-path', data, '--ckpt-interval', 2, '--workers', 2,
              '--work-dir', tmp_path]
    train_here(*common, '--iters', 4)
    (tmp_path / 'latest.pth').write_bytes((tmp_path / 'latest.pth').read_bytes()[:1000])
    result = train_here(*common, '--iters', 6, '--resume-from', 'auto')
    assert f'skipped {tmp_path / "latest.pth"}: cannot read checkpoint' in result.stdout
    assert f'resumed from {tmp_path / "iter_4.pth"} at iteration 4' in result.stdout
    for path in tmp_path.glob('*.pth'):
        path.write_bytes(b'junk')
    assert_one_line_error(run_here(train, *common, '--iters', 8, '--resume-from', 'auto'),
                          'none of the 4 checkpoints', 'can be read')


def test_a_killed_data_worker_ends_the_run_in_one_line(data, tmp_path):
    job = subprocess.Popen([sys.executable, str(HERE / 'train.py'), *map(str, TINY),
                            '--data-path', str(data), '--iters', '100000', '--workers', '1',
                            '--ckpt-interval', '2', '--work-dir', str(tmp_path)], env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(tmp_path / 'train.log', 'iter 4/')
    [worker] = [pid for pid in processes('train.py', tmp_path) if pid != job.pid]
    os.kill(worker, signal.SIGKILL)                          # as the out-of-memory killer does
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0 and 'Traceback' not in err
    [line] = err.strip().splitlines()
    assert line.startswith('error: a data-loading worker died') and 'fewer --workers' in line
    assert f'last checkpoint: {tmp_path / "latest.pth"}' in line


def test_demo_on_a_tiny_budget_then_its_resume_says_it_is_complete(tmp_path):
    demo = ['--demo', '--iters', 4, '--crop-size', 64, 64, '--batch-size', 2, '--work-dir',
            tmp_path, '--val-interval', 4, '--workers', 0]
    result = train_here(*demo)
    done = result.stdout.strip().splitlines()[-1]
    assert done.startswith('demo done: mIoU')
    assert list((tmp_path / 'demo_predictions').rglob('*.png'))
    assert (tmp_path / 'best.pth').is_file()
    assert f'python eval.py --ckpt {tmp_path / "best.pth"} --data-path ' \
           f'{tmp_path / "demo_data"}' in done
    again = train_here(*demo)                   # run again, the demo repeats its result
    assert 'Traceback' not in again.stderr
    assert f'{tmp_path / "latest.pth"} is at iteration 4: the run is complete' in again.stdout
    assert again.stdout.strip().splitlines()[-1] == done


def test_perf_mode_prints_fps(data, tmp_path):
    result = train_here(*TINY, '--data-path', data, '--iters', 6, '--perf', '--workers', 0,
                        '--work-dir', tmp_path)
    assert result.stdout.strip().splitlines()[-1].startswith('FPS: ')
    assert not list(tmp_path.glob('*.pth'))


def test_train_bad_input(data, tmp_path):
    (tmp_path / 'latest.pth').write_bytes(b'keep me')
    base = ['--work-dir', tmp_path / 'run', '--device', 'cpu']
    cases = [
        (['--data-path', tmp_path / 'none'], 'does not exist'),
        (['--data-path', tmp_path], 'gtFine'),
        (['--data-path', data, '--resume-from', tmp_path / 'gone.pth'], 'gone.pth does not exist'),
        (['--data-path', data, '--load-from', tmp_path / 'latest.pth'], 'not a PyTorch checkpoint'),
        (['--data-path', data, '--batch-size', 0], '--batch-size must be positive'),
        (['--data-path', data, '--batch-size', 1], 'give 2 or more images per device'),
        (['--data-path', data, '--iters', -1], '--iters must be positive'),
        (['--data-path', data, '--crop-size', 0, 64], '--crop-size takes one positive size or H W'),
        (['--data-path', data, '--device', 'npu'], 'torch_npu'),
    ]
    (tmp_path / 'leftImg8bit' / 'train').mkdir(parents=True)
    for i, (args, words) in enumerate(cases):
        result = run('train.py', *base, *args, check=False) if i == 0 else \
            run_here(train, *base, *args)
        assert_one_line_error(result, words)
    assert (tmp_path / 'latest.pth').read_bytes() == b'keep me'


def test_one_size_crop_is_square_and_two_are_h_w(data, tmp_path):
    assert datalib.parse_crop_size([96]) == (96, 96)
    assert datalib.parse_crop_size([64, 128]) == (64, 128)
    with pytest.raises(runtime.SetupError, match='one positive size or H W'):
        datalib.parse_crop_size([1, 2, 3])
    result = train_here(*TINY, '--data-path', data, '--iters', 2, '--workers', 0,
                        '--crop-size', 96, '--work-dir', tmp_path)
    assert 'crop 96x96' in result.stdout


def test_resuming_with_the_other_backbone_says_which_backbone(data, tmp_path):
    train_here(*TINY, '--data-path', data, '--iters', 2, '--workers', 0, '--work-dir', tmp_path)
    result = run_here(train, *TINY, '--data-path', data, '--iters', 4, '--workers', 0,
                      '--work-dir', tmp_path, '--resume-from', 'auto', '--backbone', 'resnet50')
    assert_one_line_error(result, 'is a resnet18 BiSeNetV1', 'run with --backbone resnet18')


def test_a_diverging_run_stops_in_one_line_before_saving_it(data, tmp_path):
    train_here(*TINY, '--data-path', data, '--iters', 2, '--workers', 0, '--work-dir', tmp_path)
    saved = (tmp_path / 'latest.pth').read_bytes()
    result = train_here(*TINY, '--data-path', data, '--iters', 6, '--workers', 0,
                        '--work-dir', tmp_path, '--resume-from', 'auto', '--lr', 1e30, check=False)
    assert_one_line_error(result, 'training diverged between iterations 3 and 4', 'lower --lr')
    assert (tmp_path / 'latest.pth').read_bytes() == saved        # nothing diverged was saved
    assert not (tmp_path / 'iter_4.pth').exists()


def test_divergence_rules():
    assert train.divergence(0, True, 'off', None) is None
    assert 'not finite in 2' in train.divergence(2, True, 'off', None)
    assert 'not finite in 1' in train.divergence(1, True, 'static', None)
    assert 'weights' in train.divergence(0, False, 'static', None)
    assert train.divergence(3, True, 'dynamic', 2.0 ** 10) is None    # skipped steps: normal
    assert 'loss scale fell to 0.5' in train.divergence(3, True, 'dynamic', 0.5)


class RecordingScaler:
    def __init__(self):
        self.loaded = []

    def load_state_dict(self, state):
        self.loaded.append(state)


def test_resume_in_another_precision_starts_a_fresh_loss_scale():
    rt = runtime.Runtime('cpu')
    fp32_state, cuda_fp16_state = {}, {'scale': 1024.0, 'growth_factor': 2.0, 'backoff_factor': 0.5,
                                       'growth_interval': 2000, '_growth_tracker': 7}
    npu_static_state = dict(cuda_fp16_state, dynamic=False)
    scaler = RecordingScaler()
    assert rt.load_grad_scaler(scaler, fp32_state) is None              # fp32 -> fp32
    assert 'was dynamic' in rt.load_grad_scaler(scaler, cuda_fp16_state)   # fp16 -> fp32
    rt.amp_dtype, rt.precision = torch.float16, 'fp16'             # as on an accelerator
    assert 'was off' in rt.load_grad_scaler(scaler, fp32_state)         # fp32 -> fp16
    assert 'was static' in rt.load_grad_scaler(scaler, npu_static_state)
    assert not scaler.loaded
    assert rt.load_grad_scaler(scaler, cuda_fp16_state) is None         # CUDA -> NPU: the
    assert scaler.loaded == [dict(cuda_fp16_state, dynamic=True)]            # key torch_npu needs


class StandInAccelerator:
    """A torch.npu that records its calls (every one answers `answers` or None)."""

    def __init__(self, **answers):
        self.calls, self.answers = [], answers

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
            return self.answers.get(name)
        return call


def npu_runtime(monkeypatch, npu, **kwargs):
    """A Runtime on the stand-in NPU `npu` (torch.device cannot name an NPU without
    torch_npu: it is stood in for while the Runtime is made)."""
    monkeypatch.setattr(runtime, 'import_torch_npu', lambda: npu)
    monkeypatch.setattr(torch, 'npu', npu, raising=False)
    with monkeypatch.context() as patch:
        patch.setattr(torch, 'device', lambda kind, index=None: f'{kind}:{index}')
        return runtime.Runtime('npu', **kwargs)


def test_the_runtime_asks_the_npu_nothing_before_set_device(monkeypatch):
    """Every torch_npu question that initialises its runtime makes a context on device 0 when
    no device is set yet: with 8 processes, 8 contexts on NPU 0."""
    npu = StandInAccelerator(device_count=8, is_bf16_supported=True)
    monkeypatch.setenv('LOCAL_RANK', '3')
    rt = npu_runtime(monkeypatch, npu, amp=True, amp_dtype='bf16')
    assert rt.device == 'npu:3' and rt.precision == 'bf16'
    first = npu.calls.index('set_device')
    assert set(npu.calls[:first]) <= {'device_count', 'is_available'}, npu.calls
    assert 'is_bf16_supported' in npu.calls[first:]


def test_more_processes_than_devices_is_one_line_naming_both(monkeypatch):
    npu = StandInAccelerator(device_count=1)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    with pytest.raises(runtime.SetupError, match='2 processes on this host need 2 npu devices, '
                                                 'but it shows 1: start at most 1'):
        npu_runtime(monkeypatch, npu)
    assert 'set_device' not in npu.calls
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '1')
    with pytest.raises(runtime.SetupError, match='--device_list 4 names npu device 4, but this '
                                                 'host shows 1'):
        npu_runtime(monkeypatch, npu, device_list='4')


def test_what_waits_and_910a_saturation_mode_are_said_at_the_start(monkeypatch):
    npu = StandInAccelerator(device_count=1)
    npu.utils = types.SimpleNamespace(is_support_inf_nan=lambda: False)     # a 910A
    rt = npu_runtime(monkeypatch, npu, amp=True)
    assert 'saturation mode' in ' '.join(rt.training_notes(128))
    assert "three times a step in torch_npu's fp16 GradScaler" in rt.training_notes(-1)[0]
    npu.utils.is_support_inf_nan = lambda: True                            # a 910B
    assert not rt.training_notes(128)                                 # static: no wait
    if hasattr(torch.amp, 'GradScaler'):                                   # torch.amp's scaler
        assert 'once a step in the fp16 GradScaler' in rt.training_notes(-1)[0]


def test_the_log_counts_the_steps_an_overflow_skipped():
    window, losses = train.Window(1, 'cpu'), torch.ones(3)
    for before, after in ((2.0 ** 16, 2.0 ** 15), (2.0 ** 15, 2.0 ** 15), (2.0 ** 15, 2.0 ** 16),
                          (2.0 ** 16, 2.0 ** 15)):
        window.add(losses, torch.tensor(before), torch.tensor(after))
    window.add(torch.full((3,), float('inf')))
    assert int(window.skipped) == 2 and int(window.nonfinite) == 1 and window.count == 5


def test_one_process_on_an_accelerator_keeps_batchnorm_several_sync_it():
    """torch_npu 2.1.0.post6-post11's SyncBatchNorm fails without a process group."""
    rt = runtime.Runtime('cpu')
    rt.type = 'npu'                                  # as a one-NPU run has it
    head = bisenet.FCNHead(8, 4, 3)
    assert isinstance(rt.sync_batchnorm(head).convs[0].bn, torch.nn.BatchNorm2d)
    assert not isinstance(rt.sync_batchnorm(head).convs[0].bn, torch.nn.SyncBatchNorm)
    rt.distributed = True
    assert isinstance(rt.sync_batchnorm(head).convs[0].bn, torch.nn.SyncBatchNorm)


def test_batches_are_pinned_for_the_npu_on_every_torch(monkeypatch):
    """Before torch 2.9 the DataLoader pins for CUDA unless told the device (2.6 and 2.7 too);
    from 2.9 on it pins for the current accelerator and warns when told."""
    rt = runtime.Runtime('cpu')
    assert not rt.loader_options()['pin_memory']
    rt.type = 'npu'
    for version, told in (('2.1.0', True), ('2.6.0', True), ('2.8.0', True), ('2.9.0', False),
                          ('2.13.0+cpu', False)):
        monkeypatch.setattr(torch, '__version__', version)
        options = rt.loader_options()
        assert options['pin_memory'] and (options.get('pin_memory_device') == 'npu') == told


@pytest.mark.skipif(not (hasattr(torch.amp, 'GradScaler') and runtime.FUSED_SGD),
                    reason='needs torch.amp.GradScaler and a fused SGD (torch >= 2.3)')
def test_a_first_step_skipped_for_an_overflow_leaves_fused_sgd_as_unfused(monkeypatch):
    """Fused SGD (on CUDA, and on CPU in torch >= 2.4) under a GradScaler: a first step whose
    gradients overflow is skipped, and the next step gives the unfused step's weights. torch
    makes the momentum buffers with empty_like at the first step and its fused kernel returns
    early on an overflow: the next step would read uninitialised memory (NaN here)."""
    def two_steps(fused):
        rt = runtime.Runtime('cpu')
        rt.type = 'cuda' if fused else 'cpu'           # fused SGD is the CUDA runtime's
        weight = torch.nn.Parameter(torch.ones(4096))
        optimizer = rt.sgd([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
        scaler = torch.amp.GradScaler('cpu')
        for loss_factor in (float('inf'), 1.0):
            optimizer.zero_grad(set_to_none=True)
            scaler.scale((weight * loss_factor).sum()).backward()
            scaler.step(optimizer)
            scaler.update()
        assert bool(optimizer.param_groups[0].get('fused')) == fused
        return weight.detach(), scaler.get_scale()
    try:
        (fused, fused_scale), (unfused, scale) = two_steps(True), two_steps(False)
    except RuntimeError as e:             # torch 2.3: a fused SGD for CUDA only
        pytest.skip(f'no fused SGD on CPU here ({runtime.one_line(e)[:60]})')
    assert fused_scale == scale == 2.0 ** 15                # one skipped step: halved once
    assert torch.isfinite(fused).all() and torch.equal(fused, unfused)
    assert torch.allclose(unfused, torch.full((4096,), 1 - 0.1 * (1 + 5e-4)))


def test_the_confusion_matrix_never_reads_the_device_and_equals_bincount():
    """On the meta device nothing can be read on the host, so a confusion() that runs there
    never makes the host wait for an accelerator (bincount would, twice per image)."""
    assert evaluation.confusion(torch.zeros(1, 32, 48, dtype=torch.long, device='meta'),
                                torch.zeros(1, 32, 48, dtype=torch.long, device='meta'),
                                19).shape == (19, 19)
    rng = np.random.default_rng(7)
    for num_classes in (2, 19, 150):
        label = rng.integers(0, num_classes, (2, 37, 53))
        label[rng.random(label.shape) < 0.3] = 255
        pred = rng.integers(0, num_classes, label.shape)
        valid = label != 255
        want = np.bincount(label[valid] * num_classes + pred[valid],
                           minlength=num_classes ** 2).reshape(num_classes, num_classes)
        got = evaluation.confusion(torch.from_numpy(pred), torch.from_numpy(label), num_classes)
        assert got.dtype == torch.int64 and np.array_equal(got.numpy(), want)


def test_torch_before_2_3_with_numpy_2_is_named_in_one_line():
    assert 'pip install "numpy<2"' in runtime.numpy_problem('2.1.0+cpu', '2.0.1')
    assert 'torch 2.2.2 needs NumPy 1' in runtime.numpy_problem('2.2.2', '2.1.0')
    for torch_version, numpy_version in (('2.1.0', '1.26.4'), ('2.3.0', '2.0.0'), ('2.13.0', '2.4.6')):
        assert runtime.numpy_problem(torch_version, numpy_version) is None


def test_prof_names_the_iterations_it_records(data, tmp_path):
    result = train_here(*TINY, '--data-path', data, '--iters', 20, '--workers', 0,
                        '--work-dir', tmp_path, '--prof')
    assert 'profile of iterations 3-7 written' in result.stdout
    traces = list((tmp_path / 'prof').glob('*.json'))
    assert len(traces) == 1
    steps = {int(event['name'].split('#')[1]) for event in json.loads(traces[0].read_text())
             ['traceEvents'] if event.get('name', '').startswith('ProfilerStep#')}
    # five consecutive steps (torch 2.1 numbers them from 1, later versions from 2)
    assert len(steps) == 5 and max(steps) - min(steps) == 4


def test_compile_failure_is_one_line(tmp_path):
    env = dict(ENV, CXX='/bin/false', OMP_NUM_THREADS='2')   # a compiler that never works
    result = subprocess.run([sys.executable, str(HERE / 'eval.py'), '--benchmark', '--device',
                             'cpu', '--compile'], env=env, capture_output=True, text=True,
                            timeout=240, cwd=tmp_path)
    # torch 2.1's inductor logs warnings of its own before it fails: ours is the last line
    assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: --compile failed') and last.endswith('drop --compile'), last


# ----------------------------------------------------------------------------------------------
# Parity with the reference, mmsegmentation 1.2.2: run where it is installed, skipped elsewhere.
#     pip install mmsegmentation==1.2.2 mmengine mmcv-lite==2.1.0 ftfy regex
#     python -m pytest -q test_bisenet.py -k mmsegmentation
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def mmseg():
    """mmsegmentation's model registry, or a skip. mmcv-lite is mmcv without its compiled ops:
    BiSeNetV1 needs none, but mmseg imports mmcv.ops, whose modules look their kernels up in
    mmcv._ext as they load. A stand-in module answers each lookup with a function that raises
    if it is ever called."""
    import importlib.util
    import types
    if importlib.util.find_spec('mmseg') is None:
        pytest.skip('mmsegmentation is not installed')
    if importlib.util.find_spec('mmcv._ext') is None:
        ext = types.ModuleType('mmcv._ext')

        def kernel(name):
            if name.startswith('__'):
                raise AttributeError(name)

            def missing(*args, **kwargs):
                raise NotImplementedError(f'mmcv-lite has no compiled op {name}')
            return missing
        ext.__getattr__ = kernel
        sys.modules['mmcv._ext'] = ext
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules()
    return MODELS


def reference_model(registry, backbone='resnet18'):
    """mmsegmentation's bisenetv1_r18-d32 (or r50-d32) model as its configs build it, with BN
    where the configs have SyncBN (one process)."""
    wide, depth = (1, 18) if backbone == 'resnet18' else (4, 50)
    norm = dict(type='BN', requires_grad=True)

    def head(index, in_channels, channels):
        return dict(type='FCNHead', in_channels=in_channels, in_index=index, channels=channels,
                    num_convs=1, concat_input=False, dropout_ratio=0.1, num_classes=19,
                    norm_cfg=norm, align_corners=False,
                    loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0))
    return registry.build(dict(
        type='EncoderDecoder',
        backbone=dict(type='BiSeNetV1', in_channels=3, out_indices=(0, 1, 2),
                      context_channels=(128 * wide, 256 * wide, 512 * wide),
                      spatial_channels=(64 * wide, 64 * wide, 64 * wide, 128 * wide),
                      out_channels=256 * wide, norm_cfg=norm, align_corners=False, init_cfg=None,
                      backbone_cfg=dict(type='ResNet', in_channels=3, depth=depth, num_stages=4,
                                        out_indices=(0, 1, 2, 3), dilations=(1, 1, 1, 1),
                                        strides=(1, 2, 2, 2), norm_cfg=norm, norm_eval=False,
                                        style='pytorch', contract_dilation=True)),
        decode_head=head(0, 256 * wide, 256 * wide),
        auxiliary_head=[head(1, 128 * wide, 64 * wide), head(2, 128 * wide, 64 * wide)],
        train_cfg=dict(), test_cfg=dict(mode='whole')))


@pytest.mark.parametrize('backbone', ['resnet18', 'resnet50'])
def test_the_model_equals_mmsegmentation_to_the_last_bit_and_loads_its_checkpoints(
        mmseg, backbone, tmp_path):
    """The same state dict (names, shapes), and on random weights and BN statistics the same
    logits, bit for bit; an mmsegmentation checkpoint file loads into both alike."""
    from mmengine.runner import load_checkpoint
    theirs = random_state(reference_model(mmseg, backbone), seed=1).eval()
    assert {k: tuple(v.shape) for k, v in theirs.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in bisenet.BiSeNetV1(19, backbone).state_dict().items()}
    path = tmp_path / 'mmseg.pth'
    torch.save({'meta': {'dataset_meta': {'classes': list(bisenet.CLASSES)}},
                'state_dict': theirs.state_dict()}, path)
    ours = bisenet.model_from_checkpoint(path).eval()
    loaded = reference_model(mmseg, backbone).eval()
    load_checkpoint(loaded, str(path), map_location='cpu')
    x = torch.randn(1, 3, 215, 333, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = theirs.encode_decode(x, [dict(img_shape=(215, 333))])
        assert torch.equal(ours(x), want)
        assert torch.equal(loaded.encode_decode(x, [dict(img_shape=(215, 333))]), want)
        assert want.std() > 0.1                                   # random weights, not zeros


def test_one_training_step_has_mmsegmentations_losses_and_gradients(mmseg):
    """Each head's loss (upsampled logits, cross entropy averaged over all pixels, ignored ones
    counting zero) and every parameter's gradient, as mmsegmentation's loss() gives them; the
    same dropout masks, drawn in the same order."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    theirs = random_state(reference_model(mmseg), seed=3).train()
    ours = bisenet.BiSeNetV1().train()
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 64, 96, generator=g)
    label = torch.randint(0, 19, (2, 64, 96), generator=g)
    label[:, :8] = 255
    samples = []
    for one in label:
        sample = SegDataSample(metainfo=dict(img_shape=(64, 96), pad_shape=(64, 96)))
        sample.gt_sem_seg = PixelData(data=one[None])
        samples.append(sample)
    torch.manual_seed(5)
    reference = theirs.loss(x, samples)
    torch.manual_seed(5)
    losses = train.criterion(ours(x), label)
    reference = [reference[k] for k in ('decode.loss_ce', 'aux_0.loss_ce', 'aux_1.loss_ce')]
    for mine, want in zip(losses, reference):
        assert mine.item() == pytest.approx(want.item(), rel=1e-6)
    sum(losses).backward()
    sum(reference).backward()
    their_parameters = dict(theirs.named_parameters())
    for name, parameter in ours.named_parameters():
        want = their_parameters[name].grad
        assert torch.allclose(parameter.grad, want, rtol=1e-4, atol=1e-7), name
    assert sum(int(p.grad.abs().sum() > 0) for p in ours.parameters()) == len(their_parameters)


def test_the_metric_equals_mmsegmentations_iou_metric(mmseg):
    from mmseg.evaluation.metrics import IoUMetric
    rng = np.random.default_rng(6)
    total = torch.zeros(19, 19, dtype=torch.int64)
    areas = [0, 0, 0, 0]
    for _ in range(5):
        label = rng.integers(0, 19, (37, 53))
        pred = np.where(rng.random((37, 53)) < 0.6, label, rng.integers(0, 19, (37, 53)))
        label[rng.random((37, 53)) < 0.2] = 255
        label[label == 4], pred[pred == 4] = 3, 3               # a class never seen
        label[label == 7] = 8                                   # one only predicted
        pred, label = torch.from_numpy(pred), torch.from_numpy(label)
        total += evaluation.confusion(pred, label, 19)
        areas = [a + b for a, b in zip(areas, IoUMetric.intersect_and_union(pred, label, 19, 255))]
    reference = {k: np.asarray(v, np.float64) for k, v in
                 IoUMetric.total_area_to_metrics(*areas, metrics=['mIoU']).items()}
    ours = evaluation.summarize(total)
    np.testing.assert_allclose(ours['IoU'], 100 * reference['IoU'], rtol=1e-6)
    np.testing.assert_allclose(ours['Acc'], 100 * reference['Acc'], rtol=1e-6)
    assert np.isnan(ours['IoU'][4]) and ours['IoU'][7] == 0
    assert ours['mIoU'] == pytest.approx(100 * np.nanmean(reference['IoU']), rel=1e-6)
    assert ours['mAcc'] == pytest.approx(100 * np.nanmean(reference['Acc']), rel=1e-6)
    assert ours['aAcc'] == pytest.approx(100 * float(reference['aAcc']), rel=1e-6)


def test_the_test_pipelines_rescale_is_mmsegmentations(mmseg, tmp_path):
    """eval.py --images' rescale to fit 2048 x 1024: mmcv's Resize(keep_ratio) in the
    reference's test pipeline (cv2 bilinear), to the pixel in size and within a grey level."""
    from mmcv.transforms import Resize
    resize = Resize(scale=(2048, 1024), keep_ratio=True)
    sizes = ((97, 61), (640, 480), (3001, 999), (2048, 1024), (600, 1400))
    for width, height in sizes:
        image = datalib.synthetic_scene(np.random.default_rng(width), (width, height))[0]
        Image.fromarray(image).save(tmp_path / f'{width}.png')
    files = evaluation.ImageFiles(sorted(tmp_path.glob('*.png')))
    for index, path in enumerate(files.paths):
        image = np.array(Image.open(path))
        want = resize(dict(img=image))['img']
        _, rescaled, error = files[index]
        assert error is None
        got = rescaled.permute(1, 2, 0).numpy()
        assert got.shape == want.shape, path.name
        assert np.abs(got.astype(int) - want).max() <= 1, path.name


# ----------------------------------------------------------------------------------------------
# CUDA acceptance: run where a GPU is visible, reported as skipped elsewhere.
#     python -m pytest -q test_bisenet.py -k cuda
# ----------------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@requires_cuda
@pytest.mark.parametrize('dtype', ['fp16', 'bf16'])
def test_cuda_training_amp_channels_last_syncbn_no_host_sync_then_resume(data, tmp_path, dtype):
    """20 iterations under torchrun on CUDA: SyncBatchNorm, channels_last, autocast, fused SGD;
    --sync-debug turns any host-device sync between two log intervals into an error. Then a
    resume from iteration 10 reaches iteration 20 with finite weights."""
    nproc = min(torch.cuda.device_count(), 2)
    common = ['--device', 'cuda', '--amp', '--amp-dtype', dtype, '--data-path', data,
              '--crop-size', 128, '--batch-size', 4, '--workers', 2, '--iters', 20,
              '--log-interval', 5, '--ckpt-interval', 10, '--val-interval', 20]
    # torch's own SyncBatchNorm syncs once per layer across processes (pytorch#78656), so the
    # no-sync check runs where one process is all there is.
    sync_debug = ['--sync-debug'] if nproc == 1 else []
    full = torchrun('train.py', *common, *sync_debug, '--work-dir', tmp_path / 'full', nproc=nproc)
    assert f'cuda:0 x {nproc} process(es)' in full.stdout and dtype in full.stdout
    log = [json.loads(line) for line in (tmp_path / 'full' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['iter'] for r in log if 'loss' in r] == [5, 10, 15, 20]
    assert all(np.isfinite(r['loss']) and r['images_per_s'] > 0 for r in log if 'loss' in r)
    resumed = torchrun('train.py', *common, *sync_debug, '--work-dir', tmp_path / 'resumed',
                       '--resume-from', tmp_path / 'full' / 'iter_10.pth', nproc=nproc)
    assert 'at iteration 10' in resumed.stdout and 'fresh loss scale' not in resumed.stdout
    state = torch.load(tmp_path / 'resumed' / 'latest.pth', weights_only=True)
    assert state['iteration'] == 20
    assert all(torch.isfinite(v).all() for v in state['model'].values() if v.is_floating_point())


@requires_cuda
def test_cuda_fp16_training_goes_on_after_first_steps_that_overflow(data, tmp_path):
    """fp16 with fused SGD, from a loss scale of 2^40, at which the first steps' gradients
    overflow: those steps are skipped and counted in the log, the weights stay finite, and the
    steps after them train (fused SGD's momentum buffers start at zero, never uninitialised).
    One process, with --sync-debug: a skipped step makes the host wait for nothing."""
    run('train.py', '--device', 'cuda', '--amp', '--loss-scale', 2 ** 40, '--sync-debug',
        '--data-path', data, '--crop-size', 128, '--batch-size', 4, '--workers', 2,
        '--iters', 60, '--log-interval', 5, '--no-validate', '--work-dir', tmp_path, timeout=600)
    log = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    skipped = [r['skipped_steps'] for r in log]
    print(skipped, [r['loss_scale'] for r in log])    # the figures, for the record (-s)
    assert skipped[0] == 5 and 5 < sum(skipped) < 60 and log[-1]['loss_scale'] < 2 ** 40
    state = torch.load(tmp_path / 'latest.pth', weights_only=True)
    assert all(torch.isfinite(v).all() for v in state['model'].values() if v.is_floating_point())
    buffers = [s['momentum_buffer'] for s in state['optimizer']['state'].values()]
    assert all(torch.isfinite(b).all() for b in buffers) and any(b.abs().sum() > 0 for b in buffers)


@requires_cuda
def test_cuda_fast_path_equals_the_plain_model():
    """fp32 (TF32 off), random weights and BN statistics: relative error <= 1e-4. fp16 and bf16
    autocast, the reference's initial weights (seeded): the fast path's argmax equals the fp32
    plain model's on >= 99.9% of the pixels whose top-two logits differ by over 1% of the logit
    range. Closer ties of an untrained network are below bf16's resolution; they are 17% of
    the pixels with seed 0 (on a CPU; 8-22% with seeds 1-5), so over half are compared."""
    rt = runtime.Runtime('cuda')
    image, _ = datalib.synthetic_scene(np.random.default_rng(0), size=(1024, 512))
    torch.manual_seed(0)                      # the reference's initial weights, always the same
    x = datalib.normalize(torch.from_numpy(image).permute(2, 0, 1)[None].to(rt.device))
    fast_x = x.contiguous(memory_format=torch.channels_last)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for model in (random_state(bisenet.BiSeNetV1().eval()), bisenet.BiSeNetV1().eval()):
            model = model.to(rt.device)
            fast = evaluation.prepare_for_inference(model, rt)
            with torch.no_grad():
                plain, out = model(x), fast(fast_x)
            assert (out - plain).abs().max() <= 1e-4 * plain.abs().max()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    top2 = plain.topk(2, 1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 0.01 * (plain.amax() - plain.amin())
    assert decisive.float().mean() >= 0.5 and len(plain.argmax(1).unique()) > 1
    for dtype in (torch.float16, torch.bfloat16):
        with torch.no_grad(), torch.autocast('cuda', dtype=dtype):
            same = fast(fast_x).argmax(1) == plain.argmax(1)
        assert same[decisive].float().mean() >= 0.999, (dtype, same.float().mean())


@requires_cuda
@pytest.mark.parametrize('extra', [[], ['--amp'], ['--amp', '--amp-dtype', 'bf16']])
def test_cuda_benchmark_with_compile(extra, tmp_path):
    """The plain model, the fast path and the compiled fast path, timed side by side."""
    result = run('eval.py', '--benchmark', '--device', 'cuda', '--compile', *extra, timeout=600)
    print(result.stdout)                             # the figures, for the record (-s)
    lines = result.stdout.strip().splitlines()
    assert lines[-4].startswith('fast path, compiled') and '; compiled: ' in lines[-2]
    assert lines[-1].startswith('FPS: ') and float(lines[-1].split()[1]) > 0


@requires_cuda
def test_cuda_video_runs_at_the_pace_of_its_slowest_stage(initial_checkpoint, tmp_path):
    """A 1280 x 720 clip through --video: decoding, the model and drawing and encoding overlap,
    so the run takes at most 1.1 x the time of the slowest of them (on a CPU, the model; on a
    GPU, the host's drawing and encoding), and its label maps are --images' on the decoded
    frames (>= 99.9%)."""
    make_video(tmp_path / 'drive.mp4', (1280, 720), 120, 30)
    result = run('tools/video.py', '--ckpt', initial_checkpoint, tmp_path / 'drive.mp4',
                 '--device', 'cuda', '--out-dir', tmp_path / 'labels', '--show-dir',
                 tmp_path / 'show', timeout=600)
    last = result.stdout.strip().splitlines()[-1]
    print(last)                                      # the figures, for the record (-s)
    assert float(last.split('the run took ')[1].split(' x')[0]) <= 1.1, last
    frames = video_facts(tmp_path / 'drive.mp4')[0]
    (tmp_path / 'frames').mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / 'frames' / f'{i:06d}.png')
    run('eval.py', '--ckpt', initial_checkpoint, '--images', tmp_path / 'frames', '--device',
        'cuda', '--out-dir', tmp_path / 'images', timeout=600)
    same = [(np.array(Image.open(p)) == np.array(Image.open(tmp_path / 'images' / p.name))).mean()
            for p in sorted((tmp_path / 'labels' / 'drive').glob('*.png'))]
    assert len(same) == len(frames) and np.mean(same) >= 0.999
