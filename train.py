"""Train BiSeNetV1 with mmsegmentation's recipe (bisenetv1_r18-d32, 160k iterations) on
Cityscapes or a data set of your own (ROOT/classes.txt, ROOT/images/, ROOT/labels/).

    python train.py --demo                                    # a synthetic set, 3 min on a CPU
    python train.py --data-path data/cityscapes               # one device: NPU, GPU or CPU
    torchrun --nproc_per_node=4 train.py --data-path data/cityscapes     # the recipe's 4 x 4
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$MASTER_ADDR \
        --master_port=29500 train.py --data-path data/cityscapes         # two hosts
    torchrun ... train.py --data-path data/cityscapes --resume-from auto  # after a stop
    python train.py --data-path data/mine --load-from bisenetv1_..._cityscapes.pth  # fine-tune

WORK_DIR (--work-dir) receives train.log, metrics.jsonl (a JSON line per log and validation),
iter_N.pth, latest.pth and best.pth, and with --tensorboard the curves and pictures. The
checkpoints hold plain data and load with torch.load(weights_only=True); eval.py reads them.
"""
import argparse
import contextlib
import errno
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from runtime import Runtime, SetupError, fail, one_line  # first: NumPy against torch
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import fcntl                                 # the work dir's lock; POSIX only
except ImportError:
    fcntl = None

import bisenet  # noqa: E402
import data  # noqa: E402
from data import OutputError, make_dir, save_bytes, size_text, write_failure  # noqa: E402
from eval import evaluate, format_table, metrics_record  # noqa: E402


# ---- The recipe, top-down: data, model, resume, then the loop with its step in view ----------
def train(args, runtime, opened, note=None):
    """Data, model and resume, then the loop. What it opens goes on `opened`, which main()
    closes however the run ends; `note` is hold_work_dir's line for the log."""
    work_dir = Path(args.work_dir)                # made and locked by hold_work_dir
    log, announce = open_log(work_dir, runtime, opened)
    if note:
        log(note)
    validate = not (args.no_validate or args.perf or args.prof)
    train_set, val_set = make_data_sets(args, runtime, validate, log)
    model, optimizer, scaler = make_model(args, runtime, train_set, log)
    start_iter, best_miou = resume(args, runtime, model, optimizer, scaler, log)
    if start_iter >= args.iters:                  # a finished run: resume() said so
        if args.demo and validate:
            log(demo_result(best_miou, len(val_set), work_dir, args.data_path))
        return
    ddp_model = runtime.data_parallel(model)
    loader = make_loader(args, runtime, train_set, start_iter)
    # From here on SIGTERM and SIGINT stop the run at a sync point.
    stop = opened.enter_context(StopRequest(start_iter, args, validate, announce))
    log_setup(args, runtime, len(train_set), model.num_classes, log)
    run = Run(args, runtime, model, optimizer, scaler, val_set, validate, stop, best_miou, log)
    run.open_records(start_iter, opened)
    profiler = opened.enter_context(runtime.profiler(work_dir / 'prof')) if args.prof else None
    perf_warmup, perf_start = min(10, max(args.iters - start_iter - 1, 0) // 5), None

    # Nothing here makes an iteration wait for the device, so the host can queue the next one:
    # the losses add up on the device (Window), and the host reads them, checks the run's
    # health and looks for a stop signal only at sync points (due(), the same on every rank).
    model.train()
    iteration, batches = start_iter, iter(loader)
    window = Window(iteration + 1, runtime.device)
    while iteration < args.iters:
        data_start = time.time()
        images, labels, params = next(batches)
        window.data_time += time.time() - data_start
        images = images.to(runtime.device, non_blocking=True)
        labels = labels.to(runtime.device, non_blocking=True).long()
        images = data.distort_and_normalize(images, params)
        images = images.contiguous(memory_format=runtime.train_format)

        lr = get_lr(iteration, args.lr, args.iters, args.warmup_iters)
        for group in optimizer.param_groups:
            group['lr'] = lr
        # Dropout's randomness is a function of (seed, iteration, rank): exact resume for free.
        torch.manual_seed(int(np.random.SeedSequence([args.seed, iteration, runtime.rank])
                              .generate_state(1)[0]))
        with runtime.autocast():
            outputs = ddp_model(images)
        losses = torch.stack(criterion(outputs, labels))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses.sum()).backward()
        scale = runtime.scale_of(scaler)      # a step after which the scale is lower was skipped
        scaler.step(optimizer)
        scaler.update()
        window.add(losses, scale, runtime.scale_of(scaler))
        iteration += 1
        stop.done = iteration

        if profiler is not None:
            profiler.step()
            if iteration - start_iter >= 7:     # the schedule skips one step and warms up one
                log(f'profile of iterations {start_iter + 3}-{iteration} written to '
                    f'{work_dir / "prof"}')
                return
        if iteration - start_iter == perf_warmup:
            runtime.synchronize()
            perf_start = time.time()
        if any(due(iteration, args, validate)):
            window = sync_point(run, iteration, lr, window)
            if window is None:                  # stopped by a signal, latest.pth saved
                return

    if args.perf and perf_start is not None:
        runtime.synchronize()
        images = (iteration - start_iter - perf_warmup) * args.batch_size * runtime.world_size
        log(f'FPS: {images / (time.time() - perf_start):.2f}')
    if args.demo and validate:
        log(demo_result(run.last_miou, len(val_set), work_dir, args.data_path))


def make_data_sets(args, runtime, validate, log):
    """The training and validation sets (None without validation; --demo: made first), after a
    look at up to 200 labels of each: a wrong label costs one line now, not a crash hours in."""
    if args.demo and args.data_path is None:
        args.data_path = str(Path(args.work_dir) / 'demo_data')
        if runtime.rank == 0 and not (Path(args.data_path) / 'gtFine').is_dir():
            data.make_synthetic_cityscapes(args.data_path, seed=args.seed)
        if runtime.distributed:
            torch.distributed.barrier()
    # The photometric distortion and normalisation run batched on the device, in the loop.
    train_set = data.SegmentationDataset(args.data_path, 'train', data.TrainTransform(
        args.crop_size, on_device=True), cache_dir=args.cache_dir)
    val_set = data.SegmentationDataset(args.data_path, 'val', data.EvalTransform(
        on_device=True), cache_dir=args.cache_dir) if validate else None
    for dataset in [train_set] + [val_set] * validate:
        found = data.survey(dataset.layout, dataset.split, dataset.samples, limit=200,
                            processes=args.workers)
        if found['problems']:
            raise data.DatasetError(found['problems'][0]
                                    + data.more(found['problems'], args.data_path))
        if dataset is train_set:
            for warning in found['warnings']:
                log(f'warning: {warning}')
            smaller = np.mean([w < args.crop_size[1] or h < args.crop_size[0]
                               for w, h in found['sizes']])
            if smaller > 0.5:
                padding = 100 * data.padding_share(found['sizes'], args.crop_size)
                log(f'note: the crop {args.crop_size[0]}x{args.crop_size[1]} is larger than '
                    f'{100 * smaller:.0f}% of the training images: on average {padding:.0f}% '
                    f'of each crop will be padding (ignored pixels); a smaller --crop-size '
                    f'wastes less')
        if dataset.cache_note:
            log(dataset.cache_note)
    return train_set, val_set


def make_model(args, runtime, train_set, log):
    """The model for the data's classes (the same initial weights on every process, then
    --pretrained or --load-from) on the device, its SGD and its fp16 loss scaler."""
    torch.manual_seed(args.seed)
    model = bisenet.BiSeNetV1(len(train_set.classes), args.backbone, train_set.classes,
                              train_set.palette)
    if args.pretrained:
        bisenet.load_imagenet_backbone(model, args.pretrained)
    if args.load_from:           # of another class count: all but the classifiers
        bisenet.load_checkpoint(model, args.load_from, args.trust_pickle, new_classes=True,
                                log=lambda line: log(f'--load-from {line}'))
    # SyncBN where the reference has it: the ResNet and the heads; the BiSeNet layers keep BN.
    model.decode_head = runtime.sync_batchnorm(model.decode_head)
    model.auxiliary_head = runtime.sync_batchnorm(model.auxiliary_head)
    model.backbone.context_path.backbone = runtime.sync_batchnorm(
        model.backbone.context_path.backbone)
    model = model.to(runtime.device, memory_format=runtime.train_format)
    optimizer = runtime.sgd(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    return model, optimizer, runtime.grad_scaler(args.loss_scale)


def resume(args, runtime, model, optimizer, scaler, log):
    """(iteration, best mIoU) of --resume-from's checkpoint ('auto': the work dir's newest that
    loads), loaded into model, optimizer and scaler; (0, -1.0) for a new run."""
    path, ckpt, work_dir = args.resume_from, None, Path(args.work_dir)
    if path == 'auto':                  # the newest that loads; each one skipped is logged
        candidates, path = checkpoints_newest_first(work_dir), None
        for candidate in candidates:
            try:
                ckpt, path = bisenet.read_resumable(candidate), candidate
                log(f'--resume-from auto: resuming from {path}')
                break
            except bisenet.CheckpointError as e:
                log(f'--resume-from auto: skipped {candidate}: {one_line(e)}')
        if candidates and ckpt is None:
            raise bisenet.CheckpointError(
                f'--resume-from auto: none of the {len(candidates)} checkpoints in '
                f'{work_dir} can be read (named above): resume from a copy, or start afresh '
                f'in another --work-dir')
        if not candidates:
            log(f'--resume-from auto: no checkpoint in {work_dir}, starting fresh')
    elif path:
        ckpt = bisenet.read_resumable(path)
    if ckpt is None:
        return 0, -1.0
    bisenet.load_state_dict(model, ckpt['model'], source=str(path))
    kernels = [{k: g[k] for k in ('foreach', 'fused') if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt['optimizer'])
    for group, own in zip(optimizer.param_groups, kernels):
        group.update(own)               # this device's SGD kernel, not the one that saved it
    fresh_scaler = runtime.load_grad_scaler(scaler, ckpt.get('scaler'), args.loss_scale)
    if fresh_scaler:
        log(fresh_scaler)
    if ckpt['iteration'] < args.iters:
        log(f'resumed from {path} at iteration {ckpt["iteration"]}')
    else:
        log(f'{path} is at iteration {ckpt["iteration"]}: the run is complete (--iters '
            f'{args.iters}), nothing to train; give a larger --iters to train on')

    def flag(given, name):
        return ' '.join(map(str, np.atleast_1d(given.get(name, getattr(args, name)))))
    before = ckpt.get('args') or {}
    changed = [f'--{n.replace("_", "-")} {flag(vars(args), n)} (it trained with {flag(before, n)})'
               for n in ('batch_size', 'crop_size') if flag(vars(args), n) != flag(before, n)]
    if changed:
        log(f'note: {path} continues with {" and ".join(changed)}: the schedule goes on, the '
            f'images per iteration change')
    # A checkpoint is written before its iteration's validation, whose mIoU is in the records.
    validated = [record['mIoU'] for record in read_records(work_dir / 'metrics.jsonl')
                 if 'mIoU' in record and record['iter'] <= ckpt['iteration']]
    return ckpt['iteration'], max([ckpt.get('best_miou', -1.0)] + validated)


def make_loader(args, runtime, train_set, start_iter):
    """This rank's endless stream of training batches, from sample start_iter x batch on."""
    sampler = data.InfiniteSampler(len(train_set), args.seed, runtime.rank, runtime.world_size,
                                   start=start_iter * args.batch_size)
    return torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        drop_last=True, persistent_workers=args.workers > 0,   # drop_last: static shapes (NPU)
        **runtime.loader_options())


def log_setup(args, runtime, images, num_classes, log):
    global_batch = args.batch_size * runtime.world_size
    log(f'BiSeNetV1 {args.backbone} on {runtime.device} x {runtime.world_size} process(es) '
        f'({runtime.backend}), {runtime.precision}; global batch {global_batch} '
        f'({args.batch_size} per device), crop {args.crop_size[0]}x{args.crop_size[1]}, '
        f'{args.iters} iterations, SGD lr {args.lr} (warmup {args.warmup_iters}, poly 0.9 to '
        f'1e-4), {images} training images from {args.data_path}, {num_classes} classes')
    if global_batch != 16 and not args.demo:
        log('note: the reference recipe uses a global batch of 16 with lr 0.025')
    for note in runtime.training_notes(args.loss_scale):
        log(note)
    if args.sync_debug and runtime.type != 'cuda':
        log('note: --sync-debug checks CUDA devices only')


def get_lr(it, base_lr, iters, warmup_iters, warmup_ratio=0.1, min_lr=1e-4, power=0.9):
    """Learning rate of iteration `it` (0-based), as mmengine's LinearLR + PolyLR give it."""
    # 1) linear warmup from warmup_ratio x base_lr, reaching base_lr at it = warmup_iters - 1
    if it < warmup_iters:
        return base_lr * (warmup_ratio + (1 - warmup_ratio) * it / max(warmup_iters - 1, 1))
    # 2) poly decay from base_lr to min_lr, reached at the last iteration
    progress = (it - warmup_iters) / max(iters - warmup_iters - 1, 1)
    return min_lr + (base_lr - min_lr) * (1 - min(progress, 1.0)) ** power


def criterion(outputs, label):
    """Each head's cross entropy of its logits upsampled (bilinear) to the label, averaged over
    all pixels, ignored ones counting zero, as the reference (not PyTorch's default mean)."""
    losses = []
    for logits in outputs:
        logits = F.interpolate(logits, size=label.shape[1:], mode='bilinear', align_corners=False)
        loss = F.cross_entropy(logits.float(), label, ignore_index=data.IGNORE_INDEX,
                               reduction='sum')
        losses.append(loss / label.numel())
    return losses


# ---- The sync point: what an iteration does besides its step ---------------------------------
def due(iteration, args, validate):
    """(log, validate, save): what iteration `iteration` (1-based) does besides its step. One
    that does any is a sync point, where alone the host waits for the device."""
    last = iteration == args.iters
    return (iteration % args.log_interval == 0 or last,
            validate and (iteration % args.val_interval == 0 or last),
            not args.perf and (iteration % args.ckpt_interval == 0 or last))


class Window:
    """The iterations since the last log, on the device: each head's loss added up (non-finite
    ones counted instead), the steps the fp16 loss scale skipped, the seconds waited for data."""

    def __init__(self, first, device):
        self.first, self.start, self.data_time, self.count = first, time.time(), 0.0, 0
        self.losses = torch.zeros(3, device=device)
        self.nonfinite, self.skipped = (torch.zeros((), dtype=torch.int64, device=device)
                                        for _ in range(2))

    def add(self, losses, scale_before=None, scale_after=None):
        losses = losses.detach()
        finite = losses.isfinite().all()
        self.losses += torch.where(finite, losses, torch.zeros_like(losses))
        self.nonfinite += ~finite
        if scale_before is not None:            # an overflow skips the step and lowers the scale
            self.skipped += scale_after < scale_before
        self.count += 1


def sync_point(run, iteration, lr, window):
    """The health check (no checkpoint holds a diverged run), the log, the checkpoints (before
    anything else can fail), validation, the stop signal. The next window, or None: stopped."""
    args, runtime, model = run.args, run.runtime, run.model
    log_due, val_due, save_due = due(iteration, args, run.validate)
    runtime.forbid_syncs(False)
    weights_finite = torch.stack([p.isfinite().all() for p in model.parameters()]).all()
    signalled = torch.tensor(int(run.stop.due(iteration)), device=runtime.device)
    status = torch.stack([window.nonfinite, (~weights_finite).long(), signalled])
    nonfinite, broken_weights, stopping = runtime.all_reduce(status).tolist()
    scale = run.scaler.get_scale() if run.loss_scaling == 'dynamic' else None
    why = divergence(nonfinite, not broken_weights, run.loss_scaling, scale)
    if why:
        raise SetupError(f'training diverged between iterations {window.first} and {iteration}: '
                         f'{why}; lower --lr' + ' or --loss-scale' * (run.loss_scaling == 'static')
                         + ' and resume from the last checkpoint')
    if log_due:
        record = log_window(window, iteration, lr, scale, args, runtime, run.log)
        run.write(record, {f'train/{key}': value for key, value in record.items()
                           if key not in ('iter', 'eta_s')}, iteration)
        window = Window(iteration + 1, runtime.device)
    if save_due:
        run.checkpoint(iteration, [f'iter_{iteration}.pth', 'latest.pth'])
    if val_due:
        validate(run, iteration)
    if stopping and iteration < args.iters:
        run.checkpoint(iteration, ['latest.pth'])
        run.log(f'stopped by {run.stop.signal or "signal"} at iteration {iteration}: saved '
                f'latest.pth; continue with --resume-from auto')
        return None
    runtime.forbid_syncs(args.sync_debug)
    return window


def divergence(nonfinite_steps, weights_finite, loss_scaling, scale):
    """Why training cannot go on, or None; loss_scaling is Runtime.loss_scaling's answer."""
    if not weights_finite:
        return 'the weights are no longer finite'
    if loss_scaling == 'dynamic':
        # An overflow skips its step and halves the scale: below 1, nearly every step overflows.
        return f'the fp16 loss scale fell to {scale:g}: gradients overflow at every step' \
            if scale < 1 else None
    if nonfinite_steps:
        return f'the loss was not finite in {nonfinite_steps} iteration(s)'
    return None


def log_window(window, iteration, lr, scale, args, runtime, log):
    """A window's line in the log; returns its record (metrics.jsonl, TensorBoard's train/)."""
    step_time = (time.time() - window.start) / window.count
    head_losses = (window.losses / max(window.count - int(window.nonfinite), 1)).tolist()
    record = {'iter': iteration, 'lr': lr, 'loss': sum(head_losses),
              'loss_decode': head_losses[0], 'loss_aux8': head_losses[1],
              'loss_aux16': head_losses[2], 'data_time': window.data_time / window.count,
              'step_time': step_time,
              'images_per_s': args.batch_size * runtime.world_size / step_time,
              'eta_s': step_time * (args.iters - iteration), **dict([runtime.peak_memory()])}
    memory = f'mem {record["memory_gb"]:.2f} GB' if 'memory_gb' in record \
        else f'peak RSS {record["peak_rss_gb"]:.2f} GB'          # the device's, or the process's
    left, scaling = int(record['eta_s']), ''
    eta = (f'{left // 86400}d ' if left >= 86400 else '') + \
        f'{left % 86400 // 3600:02d}:{left % 3600 // 60:02d}:{left % 60:02d}'
    if scale is not None:
        skipped = int(window.skipped)
        record.update(loss_scale=scale, skipped_steps=skipped)
        scaling = f'  scale {scale:g}' + (f' ({skipped} skipped)' if skipped else '')
    log(f'iter {iteration}/{args.iters}  lr {lr:.3e}  loss {record["loss"]:.4f} (decode '
        f'{head_losses[0]:.4f} aux8 {head_losses[1]:.4f} aux16 {head_losses[2]:.4f})  data '
        f'{record["data_time"]:.3f}s  step {step_time:.3f}s  {record["images_per_s"]:.1f} img/s  '
        f'ETA {eta}  {memory}{scaling}')
    return record


def validate(run, iteration):
    """Validation: the table in the log, the record, best.pth on a new best mIoU."""
    args, model = run.args, run.model
    last_demo = args.demo and iteration == args.iters    # the demo's pictures, at its end
    show_dir = Path(args.work_dir) / 'demo_predictions' if last_demo else None
    metrics = evaluate(model, run.val_set, run.runtime, show_dir=show_dir,
                       workers=min(args.workers, 2), log=run.log, keep_pictures=run.shown)
    run.log(format_table(metrics, model.classes))
    record = dict({'iter': iteration}, **metrics_record(metrics, model.classes))
    if metrics['skipped']:
        run.log(f'note: validation left out {len(metrics["skipped"])} image(s) it could not '
                f'read: {"; ".join(metrics["skipped"][:3])}')
        record['skipped_images'] = len(metrics['skipped'])
    scalars = {f'val/{key}': record[key] for key in ('mIoU', 'mAcc', 'aAcc')}
    for key, tag in (('per_class', 'IoU'), ('per_class_acc', 'Acc')):       # None: absent
        # each class name as a tag takes it (TensorBoard would rename it with a warning)
        scalars.update((f'val/{tag}/' + re.sub(r'[^\w./-]', '_', name), value)
                       for name, value in record[key].items() if value is not None)
    run.write(record, scalars, iteration, metrics['pictures'])
    run.last_miou = metrics['mIoU']
    if metrics['mIoU'] > run.best_miou:
        run.best_miou = metrics['mIoU']
        run.checkpoint(iteration, ['best.pth'])
        run.log(f'best mIoU {run.best_miou:.2f} at iteration {iteration}: saved best.pth')


def demo_result(miou, val_images, work_dir, data_path):
    return (f'demo done: mIoU {miou:.2f} on {val_images} synthetic val images; pictures in '
            f'{work_dir / "demo_predictions"}, checkpoints in {work_dir}; evaluate it with: '
            f'python eval.py --ckpt {work_dir / "best.pth"} --data-path {data_path} (or '
            f'--images FILES in place of --data-path)')


class Run:
    """What the sync point reads and writes: the run's parts and, on rank 0, its records, which
    continue at start_iter + 1 (what a killed run wrote after its checkpoint is dropped)."""

    def __init__(self, args, runtime, model, optimizer, scaler, val_set, validate, stop,
                 best_miou, log):
        self.args, self.runtime, self.model, self.optimizer = args, runtime, model, optimizer
        self.scaler, self.loss_scaling = scaler, runtime.loss_scaling(args.loss_scale)
        self.val_set, self.validate, self.stop, self.log = val_set, validate, stop, log
        self.best_miou, self.last_miou = best_miou, None
        self.metrics_file, self.board, self.shown = None, None, ()

    def open_records(self, start_iter, opened):
        if self.runtime.rank != 0:
            return
        work_dir = Path(self.args.work_dir)
        if (work_dir / 'metrics.jsonl').is_file():          # without the records after it
            save_bytes(work_dir / 'metrics.jsonl', ''.join(
                json.dumps(record) + '\n' for record in read_records(work_dir / 'metrics.jsonl')
                if record['iter'] <= start_iter).encode())
        self.metrics_file = opened.enter_context(open(work_dir / 'metrics.jsonl', 'a'))
        if self.args.tensorboard:
            self.board = open_tensorboard(work_dir / 'tensorboard', start_iter)
            opened.callback(self.board.close)
            self.log(f'TensorBoard events in {work_dir / "tensorboard"}; to watch: tensorboard '
                     f'--logdir {work_dir / "tensorboard"}')
            if self.val_set is not None:
                own = self.runtime.shard(len(self.val_set))
                self.shown = {own[i] for i in data.spread(len(own), 4)}

    def write(self, record, scalars, iteration, pictures=None):
        """A record into metrics.jsonl; `scalars` and `pictures` (name -> PIL) into TensorBoard."""
        if self.metrics_file:
            append_line(self.metrics_file, json.dumps(record))
        if self.board:
            for tag, value in scalars.items():
                self.board.add_scalar(tag, value, iteration)
            for name, picture in (pictures or {}).items():
                self.board.add_image(f'val/pictures/{name}', np.asarray(picture), iteration,
                                     dataformats='HWC')
            self.board.flush()

    def checkpoint(self, iteration, names):
        """Rank 0 saves the run as it is after `iteration` under each of `names`."""
        if self.runtime.rank != 0:
            return
        model = self.model
        state = {'model': model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                 'scaler': self.scaler.state_dict(), 'iteration': iteration,
                 'best_miou': self.best_miou, 'args': vars(self.args),
                 'meta': {'dataset_meta': {                    # as mmsegmentation writes it
                     'classes': list(model.classes),
                     'palette': [list(colour) for colour in model.palette]}}}
        self.stop.saving = True         # a second Ctrl-C now drops the file being written
        try:
            for name in names:
                save_checkpoint(state, Path(self.args.work_dir) / name)
        finally:
            self.stop.saving = False


# ---- Flags -----------------------------------------------------------------------------------
# What --demo changes, unless given: a CPU-sized schedule that, run again, continues or repeats.
DEMO_DEFAULTS = dict(iters=300, batch_size=8, crop_size=[128], workers=2, log_interval=25,
                     val_interval=300, ckpt_interval=300, work_dir='output/demo',
                     resume_from='auto')


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add = parser.add_argument
    # data
    add('--data-path', '--data_path', help='Cityscapes root (leftImg8bit/, gtFine/ with raw '
        '*_labelIds.png) or your own (classes.txt, images/, labels/); --demo: a generated set')
    add('--work-dir', default='output', help='logs and checkpoints go here')
    add('--workers', type=int, default=4, help='data loading processes per device')
    add('--cache-dir', help='decode each image once into this folder and memory-map it after '
        '(about 25 GB for Cityscapes train + val)')
    # recipe
    add('--iters', type=int, default=160000, help='training iterations')
    add('--batch-size', type=int, default=4, help='images per device (reference: 4 x 4)')
    add('--crop-size', type=int, nargs='+', default=[1024], metavar='S',
        help='training crop: S (S x S) or H W')
    add('--lr', type=float, default=0.025, help='peak learning rate (SGD)')
    add('--warmup-iters', '--warm_up_epochs', type=int, default=None,
        help='linear warmup from 0.1 x lr; default 1000 scaled by --iters/160000')
    add('--backbone', choices=('resnet18', 'resnet50'), default='resnet18')
    add('--seed', type=int, default=0)
    # device and precision
    add('--device', choices=('auto', 'npu', 'cuda', 'cpu'), default='auto')
    add('--device_list', help='device ids by local rank, e.g. 0,1,2,3 (Ascend)')
    add('--amp', action='store_true', help='autocast mixed precision')
    add('--amp-dtype', choices=('fp16', 'bf16'), default='fp16')
    add('--loss-scale', type=float, default=-1,
        help='fp16 loss scale: -1 = dynamic, a number = fixed start scale')
    add('--opt-level', help='the Ascend scripts\': O1/O2 mean --amp (native autocast is apex '
        'O1; O2\'s fp16 master weights have no equivalent), O0 none')
    # weights
    add('--pretrained', help='ImageNet ResNet weights (torchvision file format)')
    add('--load-from', help='start from these weights (ours or mmsegmentation\'s; of another '
        'class count: all but the classifiers)')
    add('--resume-from', help='checkpoint to continue exactly, or "auto": the newest of '
        'WORK_DIR that loads (latest.pth, else iter_N.pth)')
    add('--start-over', action='store_true', help='start afresh in a WORK_DIR that holds an '
        'earlier run\'s checkpoints, moving its files to WORK_DIR/earlier-N/ first')
    add('--trust-pickle', action='store_true',
        help='load weight files that hold pickled objects (runs their code)')
    # side jobs
    add('--no-validate', action='store_true', help='skip validation')
    for flag, default in (('--val-interval', 16000), ('--ckpt-interval', 16000),
                          ('--log-interval', 50)):
        add(flag, type=int, default=default)
    add('--tensorboard', action='store_true', help='TensorBoard curves and validation pictures '
        'in WORK_DIR/tensorboard (pip install tensorboard)')
    # modes
    add('--perf', action='store_true', help='performance test: a short run (100 iters), no '
        'validation or checkpoints; ends "FPS: N"')
    add('--prof', action='store_true', help='profile a few iterations into WORK_DIR/prof')
    add('--sync-debug', action='store_true', help='CUDA: fail at any host-device sync inside '
        'the training step (between sync points)')
    add('--demo', action='store_true', help='CPU-sized run on a synthetic set')
    return parser


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    given = ' '.join(argv if argv is not None else sys.argv)
    if args.demo:
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
        if (args.start_over or args.load_from) and '--resume-from' not in given:
            args.resume_from = None
    if args.perf and '--iters' not in given:
        args.iters = 100
    if args.warmup_iters is None:
        args.warmup_iters = max(1, round(1000 * args.iters / 160000))
    if args.opt_level in ('O1', 'O2', 'O3'):
        args.amp = True
    return args


def check_args(args):
    """Flag combinations that cannot work: one line before anything is touched."""
    for name in ('iters', 'batch_size', 'lr', 'val_interval', 'ckpt_interval', 'log_interval',
                 'warmup_iters', 'workers'):
        value, zero_too = getattr(args, name), name in ('warmup_iters', 'workers')
        if not (value >= 0 if zero_too else value > 0):             # NaN fails both
            what = 'cannot be negative' if zero_too else 'must be positive'
            raise SetupError(f'--{name.replace("_", "-")} {what}, not {value}')
    if not np.isfinite(args.lr) or not np.isfinite(args.loss_scale):
        raise SetupError(f'--lr and --loss-scale must be finite numbers, not {args.lr} and '
                         f'{args.loss_scale}')
    if args.batch_size == 1:
        raise SetupError('--batch-size 1 cannot train BiSeNetV1: the BatchNorms of its attention '
                         '(ARM, FFM, global context) would see one value per channel; give 2 or '
                         'more images per device')
    args.crop_size = data.parse_crop_size(args.crop_size)
    batch_bytes = 4 * args.batch_size * args.crop_size[0] * args.crop_size[1]   # RGB + label
    memory = None                                   # this machine's, where it can be read
    with contextlib.suppress(AttributeError, ValueError, OSError):
        memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    if memory and batch_bytes > memory / 2:
        raise SetupError(f'--crop-size {args.crop_size[0]} {args.crop_size[1]}: a batch of '
                         f'{args.batch_size} such crops is {size_text(batch_bytes)} of pixels '
                         f'before the model sees it, over half of this machine\'s memory '
                         f'({size_text(memory)}); give a smaller --crop-size')
    if args.data_path is None and not args.demo:
        raise SetupError('--data-path is required (a Cityscapes root or a data set of your '
                         'own), or --demo')
    if args.resume_from and args.resume_from != 'auto' and not Path(args.resume_from).is_file():
        what = 'is a folder' if Path(args.resume_from).is_dir() else 'does not exist'
        raise SetupError(f'--resume-from {args.resume_from} {what}; give a checkpoint file or '
                         f'"auto"')
    timed = 'their timer and profiler sync with the device'
    for first, second, why in (('start_over', 'resume_from', 'start over, or continue'),
                               ('sync_debug', 'perf', timed), ('sync_debug', 'prof', timed),
                               ('resume_from', 'load_from', 'resume continues a run, '
                                'load-from starts one from weights')):
        if getattr(args, first) and getattr(args, second):
            flags = [f'--{name.replace("_", "-")}' for name in (first, second)]
            raise SetupError(f'{flags[0]} and {flags[1]} exclude each other: {why}')
    if args.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise SetupError('--tensorboard needs the tensorboard package: pip install '
                             'tensorboard') from None


# ---- Checkpoints and records -----------------------------------------------------------------
def save_checkpoint(state, path):
    """Write to a temporary name, renamed into place; one that cannot be written (a full disk, a
    quota) is CheckpointError naming its size and the space free, and leaves nothing behind."""
    tmp = path.with_name(path.name + '.tmp')
    needed = data.tensor_bytes(state) + 2 ** 20     # the tensors, and a MiB for the rest
    try:
        if shutil.disk_usage(path.parent).free < needed:
            raise OSError(errno.ENOSPC, 'not enough free space')
        torch.save(state, tmp)
        os.replace(tmp, path)
        return
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # torch reports a short write (a full disk) as a RuntimeError of its own; anything else
        # (a DataLoader worker's death, raised from a signal) is not ours
        if not (isinstance(e, OSError) or isinstance(e, RuntimeError) and any(
                where in str(e) for where in ('inline_container', 'PytorchStreamWriter'))):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else 'the write failed'
    raise bisenet.CheckpointError(
        f'cannot write the checkpoint {path} ({reason}): it needs {needed / 1e6:.1f} MB and '
        f'{shutil.disk_usage(path.parent).free / 1e6:.1f} MB are free there; the checkpoints '
        f'written before are intact: free some space (or give another --work-dir) and continue '
        f'with --resume-from auto')


def checkpoints_newest_first(work_dir):
    """latest.pth, then iter_N.pth from the highest N down: the order to resume in."""
    numbered = [(int(p.stem[5:]), p) for p in work_dir.glob('iter_*.pth') if p.stem[5:].isdigit()]
    paths = [work_dir / 'latest.pth'] + [p for _, p in sorted(numbered, reverse=True)]
    return [p for p in paths if p.is_file()]


def read_records(path):
    """metrics.jsonl's records, without a last line that a kill cut short."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return [r for r in records if isinstance(r, dict) and isinstance(r.get('iter'), int)]


def open_log(work_dir, runtime, opened):
    """(log, announce): print a line and append it to train.log, on rank 0; announce does it
    from a signal handler, which may run inside a print, so unbuffered."""
    log_file = opened.enter_context(open(work_dir / 'train.log', 'a')) if runtime.rank == 0 \
        else None

    def log(message):
        if runtime.rank == 0:
            print(message, flush=True)
            append_line(log_file, message)

    def announce(message):
        with contextlib.suppress(OSError):      # a full disk: the stop goes on regardless
            for stream in (sys.stdout, log_file) if runtime.rank == 0 else ():
                stream.flush()
                os.write(stream.fileno(), (message + '\n').encode())
    return log, announce


def append_line(file, line):
    """Append a line to train.log or metrics.jsonl, flushed; a full disk is OutputError."""
    try:
        file.write(line + '\n')
        file.flush()
    except OSError as e:
        raise OutputError(write_failure(file.name, e, then='continue with --resume-from auto')) \
            from None


def open_tensorboard(folder, start_iter):
    """A SummaryWriter whose curves continue at start_iter + 1: events a killed run wrote after
    it are dropped first (each file rewritten), so that no step is there twice."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    from torch.utils.tensorboard import SummaryWriter
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.glob('events.out.tfevents.*')):
        kept = [event for event in EventFileLoader(str(path)).Load()
                if not event.HasField('file_version') and event.step <= start_iter]
        if not kept:
            path.unlink()
        else:                                 # written beside, then renamed over the original
            staging = folder / 'rewrite'
            shutil.rmtree(staging, ignore_errors=True)
            writer = EventFileWriter(str(staging))
            for event in kept:
                writer.add_event(event)
            writer.close()
            os.replace(next(staging.glob('events.out.tfevents.*')), path)
            staging.rmdir()
    return SummaryWriter(str(folder))


# ---- Faults: the work dir's runs, a stop signal, a dead worker or peer -----------------------
def hold_work_dir(args, runtime):
    """One run per work dir: rank 0 makes it, locks it and refuses a fresh start over an earlier
    run; every rank learns the verdict. (The lock or None, what it made, earlier_run's line)."""
    work_dir, verdict, lock, made, note = Path(args.work_dir), [None], None, [], None
    if runtime.rank == 0:
        made = [path for path in (work_dir, work_dir / 'train.lock', work_dir / 'train.log',
                                  work_dir / 'metrics.jsonl') if not path.exists()]
        try:
            make_dir(work_dir, '--work-dir')
            lock = lock_work_dir(work_dir)
            note = earlier_run(args, work_dir)
        except SetupError as e:
            verdict = [str(e)]
    if runtime.distributed:
        torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        if lock is not None:
            lock.close()
        raise SetupError(verdict[0])
    return lock, made, note


def lock_work_dir(work_dir):
    """WORK_DIR/train.lock, locked and naming this process (None without record locks). A POSIX
    record lock, not flock: forked workers do not inherit it, and it ends with this process."""
    if fcntl is None:
        return None
    lock = open(work_dir / 'train.lock', 'a+')
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        host, pid = (lock.read().split() + ['?', '?'])[:2]
        lock.close()
        raise SetupError(f'{work_dir} is in use by another training run (pid {pid} on {host}): '
                         f'stop that run, or give this one another --work-dir')
    with contextlib.suppress(OSError):      # who holds it, for the line above; a full disk
        lock.seek(0)                        # is said by the log's first line instead
        lock.truncate()
        lock.write(f'{socket.gethostname()} {os.getpid()}\n')
        lock.flush()
    return lock


def earlier_run(args, work_dir):
    """A fresh start over an earlier run's checkpoints: refused in one line, or with --start-over
    its files moved to WORK_DIR/earlier-N/ (the line to log). None where there is none."""
    checkpoints = checkpoints_newest_first(work_dir) + [
        path for path in [work_dir / 'best.pth'] if path.is_file()]
    if args.resume_from or not checkpoints:
        return None
    names = ', '.join(path.name for path in checkpoints[:3]) + (
        f' and {len(checkpoints) - 3} more' if len(checkpoints) > 3 else '')
    if not args.start_over:
        raise SetupError(f'{work_dir} holds an earlier run\'s checkpoints ({names}): continue it '
                         f'with --resume-from auto, start afresh in another --work-dir, or add '
                         f'--start-over to move its files to {work_dir}/earlier-N/ first')
    folder = next(work_dir / f'earlier-{n}' for n in range(1, 10 ** 6)
                  if not (work_dir / f'earlier-{n}').exists())
    folder.mkdir()
    for path in checkpoints + [work_dir / name for name in (
            'latest.pth', 'best.pth', 'metrics.jsonl', 'train.log', 'tensorboard', 'prof',
            'demo_predictions')]:
        if path.exists():
            path.replace(folder / path.name)
    return f'--start-over: the earlier run\'s checkpoints and records are now in {folder}'


def forget_failed_start(made):
    """After a failure, remove what the run made: all of it where it never trained (no
    metrics.jsonl yet), else its lock and empty files."""
    started = any(path.name == 'metrics.jsonl' and path.exists() for path in made)
    for path in reversed(made):
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()                        # only if empty
            elif not started or path.name == 'train.lock' or path.stat().st_size == 0:
                path.unlink()


def fault_line(error, args):
    """One line for a fault from outside (out of memory, a killed worker, a dead peer), or None."""
    message = str(error).strip()
    checkpoints = checkpoints_newest_first(Path(args.work_dir))
    last = checkpoints[0] if checkpoints else 'none yet'
    then = f'continue with --resume-from auto (last checkpoint: {last})'
    if isinstance(error, MemoryError) or any(text in message for text in (
            'out of memory', "can't allocate memory", 'not enough memory')):
        return (f'out of memory ("{one_line(error)[:120]}"): give a smaller --batch-size or '
                f'--crop-size, and {then}')
    if 'DataLoader worker' in message:
        return (f'a data-loading worker died ("{one_line(error)}"), most likely killed for '
                f'memory by the out-of-memory killer: run with fewer --workers, or with '
                f'--cache-dir (decoded images shared through the page cache), and {then}')
    if isinstance(error, getattr(torch.distributed, 'DistBackendError', ())) or any(
            text in message for text in ('Connection closed by peer', 'Connection reset by peer',
                                         'Broken pipe')):
        return (f'another process of this job died, and with it the connection to its peers; '
                f'under torchrun --max-restarts the job restarts and --resume-from auto '
                f'continues from the last checkpoint ({last})')
    return None


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def interrupted(args):
    """The line of a run that Ctrl-C ended at once."""
    checkpoints = checkpoints_newest_first(Path(args.work_dir))
    return (f'error: interrupted (Ctrl-C); the checkpoints written before are intact (last: '
            f'{checkpoints[0] if checkpoints else "none yet"}): continue with --resume-from auto')


class StopRequest:
    """SIGTERM and SIGINT while training, as a context. The first is answered in one line: the
    sync point that will save latest.pth and stop (`at`: the same on every rank). A second
    SIGINT quits at once, or while a checkpoint is written (`saving`) drops that file; a second
    SIGTERM changes nothing. The loop keeps `done`; forked processes ignore both."""

    def __init__(self, done, args, validate, announce):
        self.done, self.args, self.validate, self.announce = done, args, validate, announce
        self.at, self.signal, self.pid, self.saving = None, None, os.getpid(), False

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if os.getpid() != self.pid or self.signal is not None and signum == signal.SIGTERM:
            return
        if self.signal is not None and self.saving:
            raise KeyboardInterrupt
        if self.signal is not None:                 # a second Ctrl-C
            sys.stdout.flush()
            os.write(sys.stderr.fileno(), (interrupted(self.args) + '\n').encode())
            # The data workers too: in process groups of their own, they would live on until
            # they noticed, holding the terminal's or a pipe's output open.
            for child in multiprocessing.active_children():
                child.kill()
            os._exit(130)                           # the shell's status for SIGINT
        # Whatever `done` this sees (a step under way, or a sync point passed), the loop stops
        # at the first sync point at or after `at`, which is `at` itself.
        self.signal = signal.Signals(signum).name
        self.at = next((i for i in range(self.done + 1, self.args.iters)
                        if any(due(i, self.args, self.validate))), self.args.iters)
        self.announce(f'{self.signal}: stopping at iteration {self.at}, the next sync point, '
                      f'after saving latest.pth there'
                      + ('; Ctrl-C again quits at once, keeping the checkpoints written so far'
                         if signum == signal.SIGINT else ''))

    def due(self, iteration):
        """Whether the run stops at this sync point."""
        return self.at is not None and self.at <= iteration


def main(argv=None):
    args = parse_args(argv)
    runtime, lock, made, failed = None, None, [], True
    opened = contextlib.ExitStack()          # what train() opens: closed here, however it ends
    try:
        check_args(args)
        runtime = Runtime(args.device, args.amp, args.amp_dtype, args.device_list)
        lock, made, note = hold_work_dir(args, runtime)
        train(args, runtime, opened, note)
        failed = False
    except (SetupError, data.DatasetError, bisenet.CheckpointError) as e:
        fail(f'error: {one_line(e)}')
    except KeyboardInterrupt:
        fail(interrupted(args), 130)                # the shell's status for SIGINT
    except (RuntimeError, MemoryError) as e:
        line = fault_line(e, args) if runtime is not None else None
        if line is None:
            raise
        fail(f'error: {line}')
    finally:
        with contextlib.suppress(OSError):     # files flush at each line: a full disk was said
            opened.close()
            if lock is not None:
                lock.close()                        # and with it the work dir's lock
        if failed:
            forget_failed_start(made)
        if runtime is not None:
            runtime.close(finished=sys.exc_info()[0] is None)


if __name__ == '__main__':
    main()
