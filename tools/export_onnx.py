"""Export a BiSeNetV1 checkpoint for deployment: the inference fast path as ONNX (uint8 RGB image
in, label map out, any size), fp32 or static int8 calibrated on images, checked against
PyTorch with onnxruntime. tools/run_onnx.py and tools/video.py run the file.

    python tools/export_onnx.py --ckpt CKPT bisenet.onnx [--logits]
    python tools/export_onnx.py --ckpt CKPT bisenet_int8.onnx --int8 --data-path data/cityscapes
    python tools/export_onnx.py --ckpt CKPT bisenet_int8.onnx --int8 --calibrate photos/
"""
import argparse
import copy
import importlib.util
import inspect
import json
import sys
import statistics
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the project, from anywhere
from runtime import Runtime, SetupError, one_line  # noqa: E402  first: NumPy against torch
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import bisenet  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402
from data import output_file, save_bytes  # noqa: E402
from run_onnx import import_onnx, load_onnx, onnx_session  # noqa: E402

CALIBRATION_IMAGES = 32                             # --int8's default: a few dozen suffice


class Deployable(nn.Module):
    """The exported interface: 'image' uint8 RGB (N, H, W, 3), any size, as images come from a
    decoder -> 'labels' uint8 (N, H, W) train ids (0 to C-1 for C classes), and with
    logits=True also 'logits' float32 (N, C, H, W). Normalisation is inside; resizing to fit
    2048 x 1024 is the caller's, as it is eval.py's."""

    def __init__(self, model, logits=False):
        super().__init__()
        self.model, self.logits = model, logits

    def forward(self, image):
        logits = self.model(data.normalize(image.permute(0, 3, 1, 2)))
        labels = logits.argmax(1).to(torch.uint8)
        return (labels, logits) if self.logits else labels


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


def export_onnx(model, path, logits=False, check_sizes=((1024, 2048), (600, 800)), log=print):
    """Write the fast path (BN folded) as ONNX (onnx_graph), atomically; then run it with
    onnxruntime next to PyTorch on random images of `check_sizes`: label agreement, largest
    logit difference, CPU time per image. Returns the lowest agreement."""
    onnx, onnxruntime = import_onnx('the export', need_onnxruntime=False)
    deployable = Deployable(evaluation.prepare_for_inference(model, Runtime('cpu')), True).eval()
    graph = onnx_graph(onnx, deployable, model.classes, model.palette)
    save_bytes(path, (graph if logits else labels_only(graph)).SerializeToString())
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
    """Median seconds per random uint8 image of `size` (h, w) of each onnxruntime session,
    Deployable or load_onnx() runner in `runs` (of label maps alone, as users run them), in
    alternating rounds, the first a warm-up."""
    image = torch.randint(0, 256, (1, *size, 3), dtype=torch.uint8)

    def call(run):
        if isinstance(run, nn.Module):
            return lambda: run(image)
        if callable(run):
            return lambda: run(['labels'], image.numpy())
        return lambda: run.run(None, {'image': image.numpy()})
    with torch.no_grad():
        times = evaluation.time_alternately({n: call(r) for n, r in runs.items()}, rounds)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def label_agreement(first, second, images):
    """The share of pixels where two sessions' label maps agree, over `images` (uint8 (1, H, W,
    3) arrays)."""
    equal = total = 0
    for image in images:
        a, b = (s.run(['labels'], {'image': image})[0] for s in (first, second))
        equal, total = equal + int((a == b).sum()), total + a.size
    return equal / max(total, 1)


def cpu_has_int8_dot():
    """Whether this CPU has int8 dot-product instructions (x86 VNNI or AMX, Arm dotprod), which
    make int8 models faster than fp32; None where the CPU's flags cannot be read."""
    try:
        flags = set(Path('/proc/cpuinfo').read_text().split())
    except OSError:
        return None
    return bool(flags & {'avx512_vnni', 'avx_vnni', 'amx_int8', 'asimddp'})


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
    deployable = Deployable(evaluation.prepare_for_inference(model, Runtime('cpu')), True).eval()
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
    save_bytes(path, (int8 if logits else labels_only(int8)).SerializeToString())
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
    runs = dict(sessions, **{'PyTorch fast path': Deployable(deployable.model)})
    if importlib.util.find_spec('openvino') is not None:      # where installed, beside them
        with tempfile.TemporaryDirectory() as folder:
            for name, graph in (('int8', int8), ('fp32', fp32)):
                onnx.save(labels_only(graph), f'{folder}/{name}.onnx')
                runs[f'{name} OpenVINO'] = load_onnx(f'{folder}/{name}.onnx', 'openvino')[0]
    times = time_per_image(runs, time_size)
    int8_time = times['int8 onnxruntime']
    log(f'CPU time per {time_size[0]} x {time_size[1]} image: ' + ', '.join(
        f'{name} {t * 1e3:.0f} ms' for name, t in times.items())
        + f' (int8: {int8_time / times["fp32 onnxruntime"]:.2f} x fp32 onnxruntime, '
        f'{int8_time / times["PyTorch fast path"]:.2f} x the fast path; one run, '
        f'{torch.get_num_threads()} threads)')
    if cpu_has_int8_dot() is False:
        log('this CPU has no int8 dot-product instructions (x86 VNNI or AMX, Arm dotprod): '
            'int8 runs no faster than fp32 here, but will on a CPU that has them')
    return agreement


def calibration_images(args):
    """--int8's images as inference sees them (uint8 (1, h, w, 3)): calibration
    (--calibrate-count of them, spread over --calibrate DIR or over the train split of
    --data-path) and up to 8 held out (others of DIR; the val split). Images of a folder are
    rescaled to fit --scale as --images does, a data set's kept at their size as evaluation
    does (unless --scale is given)."""
    scale = tuple(args.scale or evaluation.TEST_SCALE) if args.calibrate or args.scale else None
    count = args.calibrate_count or CALIBRATION_IMAGES
    if args.calibrate:
        paths = evaluation.find_images([args.calibrate], '--calibrate')
        chosen = data.spread(len(paths), count)
        rest = [path for i, path in enumerate(paths) if i not in chosen]
        calibration = [paths[i] for i in chosen]
        held_out = [rest[i] for i in data.spread(len(rest), 8)]
    else:
        try:
            train = data.SegmentationDataset(args.data_path or evaluation.DEFAULT_DATA_PATH,
                                             'train')
        except data.DatasetError as e:
            raise SetupError(f'--int8 calibrates on --calibrate DIR, or on the train '
                             f'split of --data-path, which cannot be read: {e}') from None
        calibration = [train.samples[i].image for i in data.spread(len(train), count)]
        try:
            val = data.SegmentationDataset(args.data_path or evaluation.DEFAULT_DATA_PATH, 'val')
            held_out = [val.samples[i].image for i in data.spread(len(val), 8)]
        except data.DatasetError:
            held_out = []

    def load(paths):                    # an unreadable file is named and skipped
        images = []
        for path in paths:
            try:
                image, _ = data.open_image(path)
            except data.IMAGE_ERRORS as e:
                print(f'skipped {path}: cannot read it ({one_line(e)})', file=sys.stderr)
                continue
            pixels = evaluation.rescaled(image, scale)[1] if scale \
                else data.pixels(image).permute(2, 0, 1)
            images.append(pixels.permute(1, 2, 0)[None].numpy())
        return images
    calibration, held_out = load(calibration), load(held_out)
    if not calibration:
        raise SetupError('no calibration image could be read (named above)')
    return calibration, held_out


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('output', metavar='FILE', help='the ONNX file to write')
    parser.add_argument('--ckpt', required=True, help='checkpoint: ours or mmsegmentation\'s')
    parser.add_argument('--logits', action='store_true', help='also output the logits')
    parser.add_argument('--int8', action='store_true', help='static int8 (QDQ, per-channel '
                        'weights), calibrated on images')
    parser.add_argument('--calibrate', metavar='DIR', help='with --int8: calibrate on images '
                        'here (a folder or glob); default the train split of --data-path')
    parser.add_argument('--calibrate-count', type=int, metavar='N', help='with --int8: how many '
                        f'images to calibrate on (default {CALIBRATION_IMAGES})')
    parser.add_argument('--data-path', '--data_path', help='with --int8: calibrate on its '
                        f'train split (default {evaluation.DEFAULT_DATA_PATH})')
    parser.add_argument('--scale', type=int, nargs=2, metavar=('W', 'H'), help='with --int8: '
                        'rescale the calibration images to fit W x H')
    parser.add_argument('--threads', type=int, help='CPU threads (default all cores)')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='load a checkpoint that holds pickled objects (runs its code)')
    parser.set_defaults(amp=False, amp_dtype='fp16', device_list=None)
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)

    def work(_):
        if (args.calibrate or args.calibrate_count is not None or args.scale) and not args.int8:
            raise SetupError('--calibrate, --calibrate-count and --scale go with --int8')
        if args.calibrate_count is not None and args.calibrate_count < 1:
            raise SetupError(f'--calibrate-count must be at least 1, not '
                             f'{args.calibrate_count}')
        output_file(args.output, 'the ONNX file\'s folder')
        model = bisenet.model_from_checkpoint(args.ckpt, args.trust_pickle).eval()
        if args.int8:
            import_onnx('--int8')               # a missing package: before reading any image
            return export_int8(model, args.output, *calibration_images(args), args.logits)
        agreement = export_onnx(model, args.output, args.logits)
        if agreement is not None and agreement < 0.9999:
            raise SetupError(f'the ONNX label maps agree with PyTorch on only '
                             f'{100 * agreement:.3f}% of the pixels')
    evaluation.guarded(args, work)


if __name__ == '__main__':
    main()
