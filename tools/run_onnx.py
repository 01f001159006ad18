"""Run an exported ONNX file (tools/export_onnx.py) in a checkpoint's place, as eval.py runs a
checkpoint: the reference's metric on a data set, your own images, or its time per image; its
class names and colours come from the file. onnxruntime or OpenVINO runs it on the CPU.

    python tools/run_onnx.py bisenet.onnx --data-path data/cityscapes           # the metric
    python tools/run_onnx.py bisenet.onnx --images photos/ --out-dir labels
    python tools/run_onnx.py bisenet.onnx --runtime openvino --benchmark        # ms per image
    python tools/video.py --onnx bisenet.onnx --runtime openvino drive.mp4      # videos

OpenVINO (pip install openvino) picks its precision for the CPU: bf16 where it has AMX or
AVX512-BF16, f32 elsewhere; --benchmark times every installed runtime on the file side by side.
"""
import argparse
import contextlib
import functools
import importlib.util
import json
import statistics
import sys
from pathlib import Path
import zipfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the project, from anywhere
from runtime import SetupError, one_line  # noqa: E402  first: NumPy against torch
import numpy as np  # noqa: E402
import torch  # noqa: E402

import bisenet  # noqa: E402
import data  # noqa: E402
from data import all_cores  # noqa: E402
import eval as evaluation  # noqa: E402


RUNTIMES = ('onnxruntime', 'openvino')


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


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise SetupError('--runtime openvino needs the openvino package: pip install openvino') \
            from None
    return openvino


@functools.lru_cache(maxsize=None)
def openvino_core():
    """The process's one OpenVINO Core, alive to its end: the CPU plugin is never unloaded
    while its threads may still run (which crashes the process)."""
    return import_openvino().Core()


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


def load_onnx(path, runtime='onnxruntime', threads=None):
    """An ONNX file on the CPU: (run(output names, uint8 image) -> arrays, its metadata, its
    input and output names, how it runs). OpenVINO without `threads` takes its own count."""
    if runtime == 'openvino':
        core = openvino_core()
        onnx_reader = import_openvino().frontend.FrontEndManager().load_by_framework('onnx')
        model = onnx_reader.convert(onnx_reader.load(str(path)))     # no other format tried
        meta = {key: model.get_rt_info(['framework', key]).astype(str)   # ONNX's metadata
                for key in ('classes', 'palette', 'precision')
                if model.has_rt_info(['framework', key])}
        compiled = core.compile_model(model, 'CPU', dict(
            PERFORMANCE_HINT='LATENCY', **({'INFERENCE_NUM_THREADS': threads} if threads else {})))
        request = compiled.create_infer_request()

        def run(names, image):
            results = request.infer({'image': image}, share_inputs=True)
            return [results[name] for name in names]
        precision = compiled.get_property('INFERENCE_PRECISION_HINT').to_string()
        how = (f'OpenVINO on the CPU in {precision}, '
               f'{compiled.get_property("INFERENCE_NUM_THREADS")} threads')
        return (run, meta, [i.get_any_name() for i in model.inputs],
                [o.get_any_name() for o in model.outputs], how)
    _, onnxruntime = import_onnx('running an ONNX file')
    session = onnx_session(onnxruntime, path, threads)

    def run(names, image):
        return session.run(names, {'image': image})
    return (run, session.get_modelmeta().custom_metadata_map,
            [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()],
            f'onnxruntime on the CPU, {threads or all_cores()} threads')


class OnnxModel:
    """An exported file in a model's place, run by onnxruntime or OpenVINO on the CPU: called
    on a normalised batch (N, 3, H, W) as the model is, it gives the file's logits, or where
    the file has none the one-hot of its labels (whose argmax is the labels), so that
    evaluate(), predict() and segment() run the deployed file as they run a checkpoint. The
    class names and colours come from the file's metadata."""
    training = False

    def __init__(self, path, threads=None, runtime='onnxruntime'):
        if not Path(path).is_file():
            raise bisenet.CheckpointError(f'--onnx {path} does not exist' + (
                ' as a file' if Path(path).exists() else ''))
        if zipfile.is_zipfile(path):                # what torch.save writes
            raise bisenet.CheckpointError(f'{path} is a PyTorch checkpoint, not an ONNX file: '
                                          f'give it with --ckpt')
        try:
            self.run, meta, inputs, outputs, self.how = load_onnx(path, runtime, threads)
        except SetupError:
            raise
        except Exception as e:      # the runtime's own error types: not a model, unreadable
            why = str(e).strip().splitlines()[-1] if runtime == 'openvino' else one_line(e)
            raise bisenet.CheckpointError(f'cannot load {path} with {runtime}: '
                                          f'{why[:200]}') from None
        try:
            names, palette = json.loads(meta['classes']), json.loads(meta.get('palette', 'null'))
        except (KeyError, ValueError):
            names = palette = None
        if not isinstance(names, list) or inputs != ['image'] or 'labels' not in outputs:
            raise bisenet.CheckpointError(f'{path} is no BiSeNetV1 export with its classes '
                                          f'(image -> labels, metadata "classes"): export it '
                                          f'with tools/export_onnx.py')
        self.classes, self.palette = bisenet.class_meta(len(names), names, palette)
        self.num_classes, self.logits = len(self.classes), 'logits' in outputs
        self.threads, self.runtime = threads, runtime
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
            return torch.from_numpy(self.run(['logits'], image)[0])
        labels = torch.from_numpy(self.run(['labels'], image)[0]).long()
        # The labels' one-hot, channels last: the argmax over channels reads it 4 x faster.
        scores = torch.zeros(labels.shape + (self.num_classes,))
        return scores.scatter_(3, labels[..., None], 1.0).permute(0, 3, 1, 2)


def benchmark_onnx(model, size=(1024, 2048), warmup=2, rounds=6, log=print):
    """Time per image of an exported file (OnnxModel) at batch 1, from a uint8 image to the
    label map, as its users run it, beside the file in every other installed runtime (and
    OpenVINO's own call of it, with its defaults), in alternating rounds; medians. The last
    line is 'FPS: <the file in model's runtime>'."""
    image = np.random.default_rng(0).integers(0, 256, (1, *size, 3), dtype=np.uint8)
    models = {model.runtime: model}
    for other in RUNTIMES:
        if other not in models and importlib.util.find_spec(other) is not None:
            with contextlib.suppress(SetupError):       # a package it needs is missing
                models[other] = OnnxModel(model.path, model.threads, other)
    runs = {name: functools.partial(m.run, ['labels'], image) for name, m in models.items()}
    how = {name: f'{m.backbone_name}, {m.how}' for name, m in models.items()}
    if 'openvino' in models:        # what the tool's OpenVINO time is measured against
        own = openvino_core().compile_model(str(model.path), 'CPU')
        runs['OpenVINO\'s own call'] = functools.partial(own, {'image': image})
        how['OpenVINO\'s own call'] = 'compile_model(FILE, "CPU"), its defaults'
    for run in runs.values():
        for _ in range(warmup):
            run()
    times = evaluation.time_alternately(runs, rounds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in medians.items():
        log(f'{model.path} in {name}: {seconds * 1e3:.1f} ms per image (median of '
            f'{", ".join(f"{s * 1e3:.0f}" for s in times[name])}; {size[0]} x {size[1]}, batch 1, '
            f'{how[name]})' + (f': {seconds / medians[model.runtime]:.2f} x the time of '
                               f'{model.runtime}' if name != model.runtime else ''))
    log(f'FPS: {1 / medians[model.runtime]:.2f}')


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
    parser.add_argument('--runtime', choices=RUNTIMES, default='onnxruntime',
                        help='what runs the file (openvino: pip install openvino)')
    parser.add_argument('--threads', type=int, help='CPU threads (default: onnxruntime all '
                        'cores, OpenVINO its own choice)')
    parser.add_argument('--workers', type=int, default=4, help='data loading processes')
    parser.add_argument('--cache-dir', help='read images through train.py\'s decoded cache')
    parser.set_defaults(prof_test=False, prof_dir=None, amp=False, amp_dtype='fp16',
                        device_list=None)
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)

    def work(runtime):
        model = OnnxModel(args.onnx, args.threads, args.runtime)
        if args.benchmark:
            return benchmark_onnx(model)
        run = evaluation.run_images if args.images else evaluation.run_evaluation
        run(args, runtime, model, args.onnx)
    evaluation.guarded(args, work, 'cpu')


if __name__ == '__main__':
    main()
