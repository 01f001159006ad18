"""Segment videos frame by frame with a BiSeNetV1 checkpoint (or an exported ONNX file): each
frame through eval.py's --images pipeline, decoded ahead of the model and drawn and encoded
behind it in threads of their own. Needs PyAV (pip install av).

    python tools/video.py --ckpt CKPT drive.mp4 clips/            # overlay videos, H.264
    python tools/video.py --ckpt CKPT drive.mp4 --out-dir labels  # label maps, one PNG a frame
    python tools/video.py --onnx bisenet.onnx drive.mp4           # an exported file
    python tools/video.py --onnx bisenet.onnx --runtime openvino drive.mp4

--show-dir writes DIR/NAME.mp4 at the input's size, frame rate and length, its audio copied;
--out-dir writes DIR/NAME/000000.png, ..., the PNGs eval.py --images writes.
"""
import argparse
import collections
import concurrent.futures
import contextlib
import fractions
import os
import queue
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the project, from anywhere
from runtime import SetupError, fail  # noqa: E402  first: NumPy against torch
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import bisenet  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402
from data import OutputError, write_failure  # noqa: E402

VIDEO_SUFFIXES = ('.mp4', '.mkv', '.mov', '.avi', '.webm', '.m4v', '.mpg', '.mpeg', '.ts',
                  '.flv', '.wmv', '.3gp')
MP4_AUDIO = ('aac', 'mp3', 'ac3', 'eac3', 'opus', 'alac', 'flac')    # what MP4 holds as it is
STAGES = ('decoding', 'the model', 'drawing and encoding')        # each in a thread of its own


def import_av():
    """PyAV, FFmpeg's libraries in a wheel: an optional extra, which only this tool needs."""
    try:
        import av
    except ImportError:
        raise SetupError('tools/video.py needs PyAV (FFmpeg for Python): pip install av') \
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
            yield (frame.pts,) + evaluation.rescaled(frame.to_image(), scale)


def overlay(pred, image, classes, palette, legends=None):
    """A video frame: the prediction over the image (uint8 (3, H, W)), and over its bottom the
    legend of the classes present, where that takes at most a third of the frame. `legends`
    keeps the legends drawn, by the classes they show (frames mostly show the same ones)."""
    frame = Image.fromarray(evaluation.blend(image.permute(1, 2, 0).numpy(), pred, palette))
    present = tuple(np.flatnonzero(np.bincount(pred.ravel(), minlength=256)))
    legends = {} if legends is None else legends
    if present not in legends:
        legends[present] = evaluation.legend(present, classes, palette, frame.width,
                                             max(11, frame.height // 40))
    key = legends[present]
    if key.height <= frame.height // 3:
        frame.paste(key.crop((0, 0, frame.width, key.height)), (0, frame.height - key.height))
    return frame


class VideoOutputs:
    """What --video writes of one file: the prediction over each frame as DIR/NAME.mp4 (H.264
    at the input's size and frame timing, the legend at its bottom, the audio copied), written
    to a temporary file and renamed at the end; and/or each frame's label map as
    OUT_DIR/NAME/FRAME.png, the PNGs --images writes."""

    def __init__(self, av, video, audio, name, out_dir, show_dir, classes, palette, log):
        self.av, self.name, self.out_dir = av, name, out_dir
        self.classes, self.palette = classes, palette
        self.label_ids = data.cityscapes_label_ids(classes)
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
            evaluation.save_prediction(pred, image, f'{self.name}/{index:06d}.png', None,
                                       self.out_dir, None, self.classes, self.palette,
                                       label_ids=self.label_ids)
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
            raise OutputError(write_failure(self.path, e)) from None

    def close(self):
        """Finish the video (the encoder's last frames) and put it in place."""
        if self.container is not None:
            self.mux(self.stream.encode())
            try:
                self.container.close()
            except OSError as e:
                raise OutputError(write_failure(self.path, e)) from None
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
                  show_dir=None, scale=evaluation.TEST_SCALE, log=print):
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
        progress = evaluation.Progress(f'[video] {name}', total, 1, log, unit='frames')
        try:
            try:
                for item in read_ahead(decoded_frames(av, container, video, audio, scale),
                                       clock=decoding):
                    if not isinstance(item, tuple):                       # audio, copied
                        pending.append(writer.submit(outputs.copy_audio, item))
                        continue
                    pts, image, small = item
                    pred = timed(modelling, evaluation.segment, model, image, small, runtime, mode,
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
                   show_dir=None, scale=evaluation.TEST_SCALE, log=print):
    """Segment the video files of this process's shard (segment_video); returns the files
    that could not be read, or not to their end."""
    names = [name[:-len('.mp4')] for name in evaluation.output_names(paths, '.mp4')]
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


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('videos', nargs='+', metavar='PATH', help='video files (mp4, mkv, mov, '
                        'avi, webm, ...), folders (searched recursively) or globs')
    parser.add_argument('--ckpt', help='checkpoint: ours (train.py) or mmsegmentation\'s')
    parser.add_argument('--onnx', metavar='FILE', help='an exported file in --ckpt\'s place, '
                        'run on the CPU (tools/export_onnx.py)')
    parser.add_argument('--runtime', choices=('onnxruntime', 'openvino'), help='with --onnx: '
                        'what runs the file (default onnxruntime)')
    parser.add_argument('--out-dir', help='write each frame\'s label map here')
    parser.add_argument('--show-dir', help='write the overlay videos here (default '
                        'output/segmented, unless --out-dir)')
    parser.add_argument('--scale', type=int, nargs=2, metavar=('W', 'H'), help='rescale the '
                        'frames to fit W x H (default the reference\'s 2048 1024)')
    parser.add_argument('--mode', choices=('whole', 'slide'), default='whole')
    parser.add_argument('--aug-test', action='store_true', help='multi-scale + flip test')
    parser.add_argument('--device', choices=('auto', 'npu', 'cuda', 'cpu'), default='auto')
    parser.add_argument('--device_list', help='Ascend scripts\' device ids, e.g. 0,1,2,3')
    parser.add_argument('--amp', action='store_true', help='autocast')
    parser.add_argument('--amp-dtype', choices=('fp16', 'bf16'), default='fp16')
    parser.add_argument('--compile', action='store_true', help='torch.compile the fast path')
    parser.add_argument('--threads', type=int, help='CPU threads (default all cores; OpenVINO: '
                        'its own choice)')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='load a checkpoint that holds pickled objects (runs its code)')
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)

    def work(runtime):
        if args.ckpt and args.onnx:
            raise SetupError('--ckpt and --onnx exclude each other: give the model once')
        if not (args.ckpt or args.onnx):
            raise SetupError('give the model: --ckpt CKPT, or --onnx FILE')
        if args.onnx and (args.amp or args.compile):
            raise SetupError('--onnx runs the file on the CPU in the precision its runtime '
                             'picks: drop --amp and --compile')
        if args.runtime and not args.onnx:
            raise SetupError('--runtime goes with --onnx FILE: drop it, or give the file')
        if args.scale and min(args.scale) <= 0:
            raise SetupError(f'--scale takes a positive width and height, not '
                             f'{args.scale[0]} {args.scale[1]}')
        paths = evaluation.find_images(args.videos, '', VIDEO_SUFFIXES, 'video')
        av = import_av()                                # a missing PyAV: before any work
        out_dir, show_dir = evaluation.output_folders(args)
        if args.onnx:
            from run_onnx import OnnxModel
            model = OnnxModel(args.onnx, args.threads, args.runtime or 'onnxruntime')
        else:
            model = evaluation.prepare_for_inference(
                bisenet.model_from_checkpoint(args.ckpt, args.trust_pickle), runtime,
                args.compile)
        scale = tuple(args.scale or evaluation.TEST_SCALE)
        runtime.print0(f'segmenting {len(paths)} videos with {args.ckpt or args.onnx} '
                       f'({model.num_classes} classes), fit to {scale[0]} x {scale[1]}, '
                       f'{runtime.device}, {runtime.precision}; writing ' + ' and '.join(
                           f'{what} to {folder}' for what, folder in (
                               ('label maps', out_dir), ('overlay videos', show_dir)) if folder))
        failed = segment_videos(av, model, paths, runtime, args.mode, args.aug_test, out_dir,
                                show_dir, scale, log=runtime.print0)
        if failed:
            fail(f'error: {len(failed)} of the videos could not be read in full (named '
                 f'above); the others were written')
    evaluation.guarded(args, work, 'cpu' if args.onnx else args.device)


if __name__ == '__main__':
    main()
