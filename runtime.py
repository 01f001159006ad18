"""Where and how a process runs: the one place that decides the device (NPU, CUDA or CPU), the
distributed backend, the precision and its loss scaling, SyncBatchNorm, pinning and the
profiler. train.py, eval.py and the tools import it first: it checks NumPy against torch.

    runtime = Runtime('auto', amp=True)     # under torchrun it also joins the process group
    with runtime.autocast():
        outputs = model(images.to(runtime.device))
"""
import inspect
import multiprocessing
import os
import re
import signal
import sys
import threading
from importlib import metadata


# Ctrl-C while NumPy and torch load (a second or more): one line, not their traceback.
LOADING = (signal.getsignal(signal.SIGINT) is signal.default_int_handler    # not in a & job
           and threading.current_thread() is threading.main_thread())
if LOADING:
    def quit_while_loading(signum, frame):
        os.write(2, b'error: interrupted (Ctrl-C) while starting; nothing was written\n')
        os._exit(130)                               # the shell's status for SIGINT
    signal.signal(signal.SIGINT, quit_while_loading)

try:
    import resource                      # peak memory on CPU; POSIX only
except ImportError:
    resource = None


def numpy_problem(torch_version, numpy_version):
    """Why this torch cannot run next to this NumPy, or None: torch before 2.3 is built against
    NumPy 1 and fails at the first sample next to NumPy 2 (pytorch/pytorch#107302)."""
    def major_minor(version):
        match = re.match(r'(\d+)\.(\d+)', version)
        return tuple(int(n) for n in match.groups()) if match else None
    torch_mm, numpy_mm = major_minor(torch_version), major_minor(numpy_version)
    if torch_mm and numpy_mm and torch_mm < (2, 3) and numpy_mm >= (2, 0):
        return (f'torch {torch_version} needs NumPy 1, but NumPy {numpy_version} is installed: '
                f'pip install "numpy<2"')
    return None


try:                          # before torch loads: one line instead of its pages of warnings
    _problem = numpy_problem(metadata.version('torch'), metadata.version('numpy'))
except metadata.PackageNotFoundError:       # a torch built from source: nothing to check
    _problem = None
if _problem:
    raise SystemExit(f'error: {_problem}')

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

if LOADING:                                 # loaded: Ctrl-C raises KeyboardInterrupt again
    signal.signal(signal.SIGINT, signal.default_int_handler)
FUSED_SGD = 'fused' in inspect.signature(torch.optim.SGD).parameters       # torch >= 2.3


class SetupError(RuntimeError):
    """A setting, flag or place that cannot work here."""


def one_line(error):
    """An error's message as one line: its first, or for an error a DataLoader worker re-raised
    with the worker's traceback, its last (the original error's)."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    lines = text.splitlines()
    line = lines[-1] if 'Traceback (most recent call last)' in text else lines[0]
    name = rf'^({re.escape(type(error).__module__)}\.)?{re.escape(type(error).__name__)}: '
    return re.sub(name, '', line)


def fail(line, status=1):
    """End the process with `line` on stderr, written now, before a teardown in which a
    torchrun peer's SIGTERM could end it first."""
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(status)


# ---- The device, the backend and the precision: decided here, and nowhere else ---------------
def cpu_has_bf16():
    """Whether oneDNN runs bfloat16 on this CPU (AVX512-BF16, AMX, Arm BF16, AVX-512)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def import_torch_npu():
    """torch_npu if it is installed and loads (without CANN it cannot), else None."""
    try:
        import torch_npu
        return torch_npu if torch.npu.is_available() else None
    except (ImportError, RuntimeError, OSError):
        return None


def npu_saturates():
    """Whether this NPU runs fp16 in saturation mode (910A: an overflow gives 65504, not inf).
    Ask after set_device: it initialises torch_npu."""
    supports_inf_nan = getattr(torch.npu.utils, 'is_support_inf_nan', None)
    return supports_inf_nan is not None and not supports_inf_nan()


def init_worker(worker_id=None):
    """A DataLoader worker's start: in a process group of its own (a signal to the job reaches
    the trainer alone, which stops at a sync point), dying with its trainer, quietly."""
    if hasattr(os, 'setpgid'):
        os.setpgid(0, 0)
    if sys.platform.startswith('linux'):
        import ctypes
        trainer = multiprocessing.parent_process()
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
        if trainer is not None and not trainer.is_alive():   # it died before the line above
            os._exit(0)
    excepthook = sys.excepthook

    def quiet_about_broken_connections(kind, value, traceback):
        if not issubclass(kind, ConnectionError):
            excepthook(kind, value, traceback)
    sys.excepthook = quiet_about_broken_connections


class Runtime:
    """This process's device, rank, precision and loss scaling. Under torchrun it joins the
    process group (hccl, nccl or gloo), one device a process picked by LOCAL_RANK."""

    def __init__(self, device='auto', amp=False, amp_dtype='fp16', device_list=None):
        self.rank = int(os.environ.get('RANK', 0))
        self.local_rank = int(os.environ.get('LOCAL_RANK', 0))
        self.world_size = int(os.environ.get('WORLD_SIZE', 1))
        npu = import_torch_npu() if device in ('auto', 'npu') else None
        if device == 'auto':
            device = 'npu' if npu else 'cuda' if torch.cuda.is_available() else 'cpu'
        if device == 'npu' and npu is None:
            raise SetupError('--device npu: torch_npu is not installed or cannot load (install '
                             'torch-npu matching torch and source CANN set_env.sh)')
        if device == 'cuda' and not torch.cuda.is_available():
            raise SetupError('--device cuda: no CUDA device is visible to this torch build')
        if amp and device == 'cpu' and amp_dtype == 'fp16':
            raise SetupError('--amp on CPU runs in bf16 only (fp16 autocast is slow there): add '
                             '--amp-dtype bf16 on a CPU with bf16 units, or drop --amp')
        if amp and device == 'cpu' and not cpu_has_bf16():
            raise SetupError('--amp-dtype bf16: this CPU has no bfloat16 units (AVX512-BF16, '
                             'AMX or Arm BF16); run in fp32 (drop --amp)')
        self.device, self.type = torch.device('cpu'), device
        if device != 'cpu':
            self.device = self.set_device(device, device_list, amp and amp_dtype == 'bf16')
        if device == 'cuda':
            torch.backends.cudnn.benchmark = True    # fixed crop sizes, as the reference sets it
        self.backend = {'npu': 'hccl', 'cuda': 'nccl', 'cpu': 'gloo'}[device]
        self.distributed = self.world_size > 1
        if self.distributed:
            # Each torchrun round (--max-restarts) in a store namespace of its own: a restarted
            # gloo group would otherwise read the dead round's addresses.
            store, rank, world_size = next(torch.distributed.rendezvous('env://'))
            restart = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
            store = torch.distributed.PrefixStore(f'bisenet/round{restart}/', store)
            torch.distributed.init_process_group(self.backend, store=store, rank=rank,
                                                 world_size=world_size)
        self.amp_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}[amp_dtype] if amp else None
        self.precision = amp_dtype if amp else 'fp32'
        # channels_last: none on NPU; it pays at inference on CPU and CUDA, training on CUDA.
        self.train_format = torch.channels_last if device == 'cuda' else torch.contiguous_format
        self.inference_format = (torch.channels_last if device in ('cpu', 'cuda')
                                 else torch.contiguous_format)

    def set_device(self, device, device_list, bf16):
        """This process's accelerator, set before any other question to it: torch_npu opens a
        context on device 0 for one asked before (is_bf16_supported, say)."""
        index, accelerator = self.local_rank, getattr(torch, device)
        if device_list:
            try:
                index = [int(i) for i in str(device_list).split(',') if i.strip()][index]
            except (ValueError, IndexError):
                raise SetupError(f'--device_list {device_list}: give one device id per local '
                                 f'rank, such as 0,1,2,3') from None
        count, processes = accelerator.device_count(), int(os.environ.get('LOCAL_WORLD_SIZE', 1))
        if device_list and index >= count:
            raise SetupError(f'--device_list {device_list} names {device} device {index}, but '
                             f'this host shows {count} {device} device(s)')
        if not device_list and processes > count:
            raise SetupError(f'{processes} processes on this host need {processes} {device} '
                             f'devices, but it shows {count}: start at most {count} (torchrun '
                             f'--nproc_per_node={count})')
        accelerator.set_device(index)                     # before init_process_group too
        if bf16 and not accelerator.is_bf16_supported():  # autocast would warn, run fp32
            raise SetupError(f'--amp-dtype bf16: this {device} device has no bfloat16 support '
                             f'(Atlas training NPUs, GPUs before Ampere); use --amp-dtype fp16')
        return torch.device(device, index)

    def autocast(self):
        """The precision of forward passes: autocast with --amp, else fp32."""
        if self.amp_dtype is None:
            return torch.autocast(self.type, enabled=False)
        return torch.autocast(self.type, dtype=self.amp_dtype)

    def loss_scaling(self, loss_scale=-1.0):
        """'off' (fp32, bf16), 'dynamic' (an overflow skips the step, halves the scale) or
        'static' (NPU with a fixed --loss-scale: it checks nothing; train.py checks weights)."""
        if self.amp_dtype != torch.float16:
            return 'off'
        return 'static' if self.type == 'npu' and loss_scale > 0 else 'dynamic'

    def grad_scaler(self, loss_scale=-1.0):
        """The fp16 GradScaler, disabled in fp32 and bf16. -1: dynamic; a number: start there and
        never grow (on NPU a true static scale, as apex's was). README: which waits how often."""
        mode = self.loss_scaling(loss_scale)
        kwargs = {} if loss_scale <= 0 else dict(init_scale=loss_scale, growth_interval=2 ** 30)
        if mode == 'static':
            return torch.npu.amp.GradScaler(init_scale=loss_scale, dynamic=False)
        if self.npu_scaler():
            return torch.npu.amp.GradScaler(enabled=mode != 'off', **kwargs)
        if hasattr(torch.amp, 'GradScaler'):                           # torch >= 2.3
            return torch.amp.GradScaler(self.type, enabled=mode != 'off', **kwargs)
        return torch.cuda.amp.GradScaler(enabled=mode != 'off', **kwargs)

    def npu_scaler(self):
        """Whether the dynamic scale is torch_npu's: before torch.amp's (2.3), and on 910A,
        whose saturation mode needs torch_npu's overflow flags."""
        return self.type == 'npu' and (not hasattr(torch.amp, 'GradScaler') or npu_saturates())

    def scale_of(self, scaler):
        """The dynamic loss scale as a device tensor copied without a wait (None when not
        dynamic): a step after which it is lower was skipped."""
        scale = getattr(scaler, '_scale', None)     # torch's and torch_npu's: made at scale()
        return scale.detach().clone() if scaler.is_enabled() and scale is not None else None

    def training_notes(self, loss_scale=-1.0):
        """What a run says at its start: where its step waits for the device, and on 910A that
        a fixed loss scale cannot see overflows."""
        mode, waits, notes = self.loss_scaling(loss_scale), [], []
        if mode == 'dynamic' and self.npu_scaler():
            waits.append("three times a step in torch_npu's fp16 GradScaler (it reads the "
                         "overflow flag and its growth counter on the host)")
        elif mode == 'dynamic' and not (self.type == 'cuda' and FUSED_SGD):
            waits.append('once a step in the fp16 GradScaler (it reads whether the gradients '
                         'overflowed, to skip the step)')
        if self.distributed and self.type != 'cpu':
            waits.append("once per SyncBatchNorm layer (torch's SyncBatchNorm with several "
                         "processes, pytorch/pytorch#78656; torch_npu's too)")
        if waits:
            notes.append(f'note: the host waits for the device {"; and ".join(waits)}')
        if mode == 'static' and npu_saturates():
            notes.append('note: this NPU (910A) computes fp16 in saturation mode (an overflow '
                         'gives the largest finite value, not inf): the fixed --loss-scale '
                         'cannot see overflows; --loss-scale -1 reads the overflow flags')
        return notes

    def load_grad_scaler(self, scaler, state, loss_scale=-1.0):
        """Continue a checkpoint's loss scale saved in this run's mode (None), else the line
        saying the scale starts fresh (a resume in another precision or mode)."""
        saved = 'off' if not state else 'static' if state.get('dynamic') is False else 'dynamic'
        mode = self.loss_scaling(loss_scale)
        if saved == mode:
            if mode != 'off':       # torch_npu's scaler also wants its 'dynamic' flag
                scaler.load_state_dict(dict(state, dynamic=mode == 'dynamic'))
            return None
        return (f'the checkpoint\'s loss scaling was {saved}, this run\'s is {mode} '
                f'({self.precision}): starting with a fresh loss scale')

    def data_parallel(self, model):
        """`model` in DistributedDataParallel under torchrun, else `model` itself."""
        if not self.distributed:
            return model
        device_ids = None if self.type == 'cpu' else [self.device.index]
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def sgd(self, parameters, **kwargs):
        """SGD, fused on CUDA where torch has it (faster; a GradScaler's overflow check stays on
        the device), its momentum buffers made now, at zero: after an fp16 overflow skips the
        first step they are still zero, where fused SGD would leave them uninitialised."""
        fused = {'fused': True} if self.type == 'cuda' and FUSED_SGD else {}
        optimizer = torch.optim.SGD(parameters, **kwargs, **fused)
        for group in optimizer.param_groups:
            for parameter in group['params'] if group['momentum'] else []:
                optimizer.state[parameter]['momentum_buffer'] = torch.zeros_like(
                    parameter, memory_format=torch.preserve_format)
        return optimizer

    def loader_options(self):
        """DataLoader arguments: batches pinned on an accelerator (unpinned, torch_npu
        synchronises at each copy; before torch 2.9 the loader pins for CUDA unless told the
        device), and workers started by init_worker."""
        options = {'pin_memory': self.type != 'cpu', 'worker_init_fn': init_worker}
        if self.type == 'npu' and tuple(map(int, torch.__version__.split('.')[:2])) < (2, 9):
            options['pin_memory_device'] = 'npu'
        return options

    def forbid_syncs(self, forbid=True):
        """CUDA: any host-device sync is an error while forbidden (train.py --sync-debug)."""
        if self.type == 'cuda':
            torch.cuda.set_sync_debug_mode('error' if forbid else 'default')

    def sync_batchnorm(self, module):
        """`module` with SyncBatchNorm where several processes share accelerators; unchanged in
        one process (torch_npu 2.1.0.post6-post11's fails without a process group) and on CPU."""
        if self.type == 'cpu' or not self.distributed:
            return module
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)

    def shard(self, size):
        """This process's share of `size` items: every world_size-th, none twice."""
        return list(range(self.rank, size, self.world_size))

    def profiler(self, trace_dir, steps=5):
        """A profiler of `steps` steps (after one skipped and one of warm-up) tracing into
        trace_dir: torch_npu's on NPU, with the NPU's kernels, else torch's."""
        module = __import__('torch_npu').profiler if self.type == 'npu' else torch.profiler
        kinds = {'npu': ['CPU', 'NPU'], 'cuda': ['CPU', 'CUDA']}.get(self.type, ['CPU'])
        return module.profile(
            activities=[getattr(module.ProfilerActivity, kind) for kind in kinds],
            schedule=module.schedule(wait=1, warmup=1, active=steps, repeat=1),
            on_trace_ready=module.tensorboard_trace_handler(str(trace_dir)))

    def synchronize(self):
        if self.type != 'cpu':
            getattr(torch, self.type).synchronize()

    def peak_memory(self):
        """(name, GB): the device's peak allocation, or on CPU the process's peak resident set
        (Linux counts it in KiB, macOS in bytes)."""
        if self.type != 'cpu':
            return 'memory_gb', getattr(torch, self.type).max_memory_allocated() / 2 ** 30
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if resource else float('nan')
        return 'peak_rss_gb', peak * (1 if sys.platform == 'darwin' else 1024) / 2 ** 30

    def all_reduce(self, tensor):                   # a sum over all processes, in place
        if self.distributed:
            torch.distributed.all_reduce(tensor)
        return tensor

    def print0(self, *args, **kwargs):
        if self.rank == 0:
            print(*args, **kwargs, flush=True)

    def close(self, finished=True):
        """Leave the process group; `finished`: every rank got here, so all meet first (torch
        2.1's gloo can hang destroying a group whose peer has exited)."""
        self.forbid_syncs(False)            # whatever the loop left on: teardown may sync
        if self.distributed and torch.distributed.is_initialized():
            if finished:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
