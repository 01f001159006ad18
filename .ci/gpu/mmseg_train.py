"""mmsegmentation 1.2.2's own training of bisenetv1_r18-d32_4xb4-160k_cityscapes-1024x1024 on a
Cityscapes-layout folder, for timing beside train.py --perf (not part of the project).
    python mmseg_train.py ROOT WORK_DIR ITERS WORKERS [amp] [crop]
Prints per log window (10 iterations) mmengine's own time and data_time, and at the end
'MMSEG images/s: X (data_time Y s)' over the windows after the first two."""
import glob, json, sys, types, importlib.machinery, importlib.util, time
root, work_dir, iters, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
amp = len(sys.argv) > 5 and sys.argv[5] == 'amp'
crop = int(sys.argv[6]) if len(sys.argv) > 6 else 1024
if importlib.util.find_spec('mmcv._ext') is None:       # mmcv-lite: no compiled ops
    ext = types.ModuleType('mmcv._ext')
    def kernel(name):
        if name.startswith('__'):
            raise AttributeError(name)
        def missing(*a, **k):
            raise NotImplementedError(name)
        return missing
    ext.__getattr__ = kernel
    ext.__spec__ = importlib.machinery.ModuleSpec('mmcv._ext', None)
    sys.modules['mmcv._ext'] = ext
import mmseg
from mmengine.config import Config
from mmengine.runner import Runner
from mmseg.utils import register_all_modules
register_all_modules()
config = glob.glob(mmseg.__path__[0] + '/.mim/configs/bisenetv1/'
                   'bisenetv1_r18-d32_4xb4-160k_cityscapes-1024x1024.py')[0]
cfg = Config.fromfile(config)
cfg.work_dir = work_dir
cfg.launcher = 'none'
cfg.train_dataloader.dataset.data_root = root
cfg.train_dataloader.num_workers = workers
cfg.train_dataloader.batch_size = 4
if crop != 1024:
    cfg.train_dataloader.dataset.pipeline[3]['crop_size'] = (crop, crop)
    cfg.model.data_preprocessor['size'] = (crop, crop)
cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=10 ** 9)
cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
cfg.default_hooks.logger.interval = 10
cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=10 ** 9,
                                    save_last=False)
if amp:
    cfg.optim_wrapper = dict(type='AmpOptimWrapper', optimizer=cfg.optimizer, loss_scale='dynamic')
runner = Runner.from_cfg(cfg)
start = time.time()
runner.train()
wall = time.time() - start
records = []
for path in glob.glob(work_dir + '/*/vis_data/scalars.json'):
    records += [json.loads(line) for line in open(path)]
records = [r for r in records if 'time' in r and 'data_time' in r]
timed = records[2:]                              # the first 20 iterations warm up
t = sum(r['time'] for r in timed) / len(timed)
d = sum(r['data_time'] for r in timed) / len(timed)
print(f'MMSEG windows: ' + ' '.join(f'{r["iter"]}:{r["time"]:.4f}/{r["data_time"]:.4f}' for r in records))
print(f'MMSEG images/s: {4 / t:.2f} (time {t:.4f} s, data_time {d:.4f} s per iteration, '
      f'{len(timed) * 10} iterations timed, wall {wall:.1f} s, amp {amp}, workers {workers})')
