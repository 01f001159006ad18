"""Run an exported ONNX file (tools/export_onnx.py) in a checkpoint's place, as eval.py runs a
checkpoint: the reference's metric on a data set, your own images, or its time per image; its
class names and colours come from the file. onnxruntime runs it on the CPU.

    python tools/run_onnx.py bisenet_int8.onnx --data-path data/cityscapes      # the metric
    python tools/run_onnx.py bisenet_int8.onnx --images photos/ --out-dir labels
    python tools/run_onnx.py bisenet_int8.onnx --benchmark                      # ms per image
    python tools/video.py --onnx bisenet_int8.onnx drive.mp4                    # videos
"""
import argparse
import json
import statistics
import sys
from pathlib import Path
import zipfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the project, from anywhere
from runtime import SetupError, one_line  # noqa: E402  first: NumPy against torch
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bisenet  # noqa: E402
import data  # noqa: E402
from data import all_cores  # noqa: E402
import eval as evaluation  # noqa: E402


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
        raise SetupError(f'{flag} needs the onnx and onnxruntime packages: pip install '
                         f'onnx onnxruntime') from None
    return onnx, onnxruntime


def onnx_session(onnxruntime, graph, threads=None):
    """An onnxruntime CPU session of a model (a path, or a ModelProto), on `threads` threads
    (None: all cores)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or all_cores()
    # No spinning between runs: onnxruntime's idle threads would take the cores from the
    # decoding, the drawing and PyTorch that run between and beside its runs.
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    source = graph.SerializeToString() if hasattr(graph, 'SerializeToString') else str(graph)
    return onnxruntime.InferenceSession(source, options, providers=['CPUExecutionProvider'])


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
        onnx, onnxruntime = import_onnx('running an ONNX file')
        try:
            self.session = onnx_session(onnxruntime, path, threads)
        except Exception as e:      # onnxruntime's own error types: not a model, unreadable
            raise bisenet.CheckpointError(f'cannot load {path} with onnxruntime: '
                                          f'{one_line(e)[:200]}') from None
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
                                          f'with tools/export_onnx.py')
        self.classes, self.palette = bisenet.class_meta(len(names), names, palette)
        self.num_classes, self.logits = len(self.classes), 'logits' in outputs
        self.threads = threads or all_cores()
        self.path, self.backbone_name = path, f'ONNX {meta.get("precision", "")}'.strip()

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, x):
        constants = data.device_constants(x.device)         # normalize(), undone
        image = (x.float() * constants['std'] + constants['mean']).round_().clamp_(0, 255)
        image = np.ascontiguousarray(image.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        if self.logits:
            return torch.from_numpy(self.session.run(['logits'], {'image': image})[0])
        labels = torch.from_numpy(self.session.run(['labels'], {'image': image})[0]).long()
        return F.one_hot(labels, self.num_classes).permute(0, 3, 1, 2).float()


def benchmark_onnx(model, size=(1024, 2048), warmup=2, rounds=6, log=print):
    """Time per image of an exported file (OnnxModel) at batch 1, from a uint8 image to the
    label map, as its users run it; the median. The last line is 'FPS: <the file>'."""
    image = np.random.default_rng(0).integers(0, 256, (1, *size, 3), dtype=np.uint8)

    def run():
        model.session.run(['labels'], {'image': image})
    for _ in range(warmup):
        run()
    times = evaluation.time_alternately({'file': run}, rounds)['file']
    median = statistics.median(times)
    log(f'{model.path} ({model.backbone_name}): {median * 1e3:.1f} ms per image (median of '
        f'{", ".join(f"{s * 1e3:.0f}" for s in times)}; {size[0]} x {size[1]}, batch 1, '
        f'onnxruntime on the CPU, {model.threads} threads)')
    log(f'FPS: {1 / median:.2f}')


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('onnx', metavar='FILE', help='an ONNX file of tools/export_onnx.py')
    parser.add_argument('--data-path', '--data_path', help='a data set to evaluate on (default '
                        f'{evaluation.DEFAULT_DATA_PATH})')
    parser.add_argument('--split', default='val')
    parser.add_argument('--images', nargs='+', metavar='PATH', help='segment these PNG/JPEG '
                        'files, folders (recursively) or globs instead')
    parser.add_argument('--scale', type=int, nargs=2, metavar=('W', 'H'), help='with --images: '
                        'rescale to fit W x H (default 2048 1024)')
    parser.add_argument('--benchmark', action='store_true', help='time per image at 1024 x 2048')
    parser.add_argument('--mode', choices=('whole', 'slide'), default='whole')
    parser.add_argument('--aug-test', action='store_true', help='multi-scale + flip test')
    parser.add_argument('--out-dir', help='write label PNGs here')
    parser.add_argument('--show-dir', help='write colour pictures of the predictions here')
    parser.add_argument('--json', help='write the metrics here')
    parser.add_argument('--threads', type=int, help='CPU threads (default all cores)')
    parser.add_argument('--workers', type=int, default=4, help='data loading processes')
    parser.add_argument('--cache-dir', help='read images through train.py\'s decoded cache')
    parser.set_defaults(prof_test=False, prof_dir=None, amp=False, amp_dtype='fp16',
                        device_list=None)
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)

    def work(runtime):
        model = OnnxModel(args.onnx, args.threads)
        if args.benchmark:
            return benchmark_onnx(model)
        run = evaluation.run_images if args.images else evaluation.run_evaluation
        run(args, runtime, model, args.onnx)
    evaluation.guarded(args, work, 'cpu')


if __name__ == '__main__':
    main()
