"""Run export.py's ONNX and OpenVINO files on the CPU, called like the PyTorch model (evaluate.py and demo.py with
backend=openvino or onnxruntime). The packages are optional: requirements-deploy.txt."""

import contextlib
import ctypes
import importlib
import os
import sys
import threading
import warnings

import numpy as np
import torch

import precision

PURPOSES = {"onnx": "export ONNX files", "onnxruntime": "run ONNX files",  # for the message when one is missing
            "openvino": "export and run OpenVINO IR files", "nncf": "quantize OpenVINO files to INT8"}
DEFAULT_FILES = {"openvino": "model.xml", "onnxruntime": "model.onnx"}  # export.py's files beside the checkpoint


class BackendError(RuntimeError):
    """A runtime package that is not installed, or an exported model file that cannot be run."""


def require(name):
    """Import an optional package of requirements-deploy.txt, or say in one line how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise BackendError(f"the {name} package is needed to {PURPOSES.get(name, 'deploy models')} but is not "
                           "installed; pip install -r requirements-deploy.txt") from err


SS_DISABLE = 2


class _SignalStack(ctypes.Structure):  # Linux's stack_t
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def signal_stack_kept():
    """Give the calling thread back its alternate signal stack after OpenVINO work (compiling a model, NNCF's
    quantization). OpenVINO's CPU plugin (2026.4, Linux) installs one of its own on the compiling thread and can leave
    it there after freeing its memory; the next signal handled on that thread (Ctrl-C, SIGTERM, PyTorch's loader's
    SIGCHLD: Python runs every handler on the alternate stack) then ends the process with a segmentation fault."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc, saved = ctypes.CDLL(None, use_errno=True), _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(saved)) != 0:
        raise OSError(ctypes.get_errno(), "sigaltstack")
    try:
        yield
    finally:  # a stack the kernel now finds too small (AMX's larger signal frames) is replaced by none
        if libc.sigaltstack(ctypes.byref(saved), None) != 0:
            libc.sigaltstack(ctypes.byref(_SignalStack(None, SS_DISABLE, 0)), None)


# Both runners take PyTorch's thread count, which follows OMP_NUM_THREADS: torchrun sets that to 1 per process, and
# ONNX Runtime and OpenVINO, which ignore it, would otherwise each take every core (N processes, N times the cores).

def onnxruntime_runner(path):
    """A function input array (float32 (N, 3, H, W); a labels file: uint8 (N, H, W, 3)) -> the output array of the
    ONNX file `path`, run by onnxruntime on the CPU. Its `shapes`: the input's and the output's dimensions as the file
    declares them (None where dynamic)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    output = session.get_outputs()[0].name

    def run(image):
        return session.run([output], {"image": image})[0]

    run.jobs = 1  # inputs at once that help: one, on every thread
    run.shapes = tuple([d if isinstance(d, int) else None for d in io.shape]
                       for io in (session.get_inputs()[0], session.get_outputs()[0]))
    return run


def openvino_runner(path, hint=None, throughput=False):
    """The same for an OpenVINO IR (.xml) or ONNX file on the CPU, compiled with the inference precision `hint`
    ("f32" or "bf16"): by default f32 for a float file (OpenVINO's own default is bf16 where the CPU has it, not what an
    fp32 file promises) and, for an INT8 file (export.py --int8), bf16 where the CPU has it natively, else f32: the
    layers NNCF leaves unquantized then run in bf16 (0.66x the time of the f32 hint on 2 AMX cores). `throughput`:
    compiled for OpenVINO's throughput hint, as many requests at once as its CPU streams, one per calling thread (a
    video: `jobs` frames at once); else one at a time, each on every thread. The runner's `hint` and `jobs` say
    what it was compiled with."""
    ov = require("openvino")
    core = ov.Core()
    model = core.read_model(path)
    hint = hint or ("bf16" if is_int8(model) and precision.native_bf16(torch.device("cpu")) else "f32")
    config = {ov.properties.hint.inference_precision: {"f32": ov.Type.f32, "bf16": ov.Type.bf16}[hint],
              ov.properties.inference_num_threads: torch.get_num_threads()}
    if throughput:
        config[ov.properties.hint.performance_mode] = ov.properties.hint.PerformanceMode.THROUGHPUT
    with signal_stack_kept():
        compiled = core.compile_model(model, "CPU", config)
    local = threading.local()  # a request per thread: a request runs one input at a time

    def request():
        if not hasattr(local, "request"):
            local.request = compiled.create_infer_request()
        return local.request

    def infer(image):  # the request alone (benchmark.py): the input read in place, the output a view of the request's
        return request().infer([image], share_inputs=True, share_outputs=True)[compiled.output(0)]

    def run(image):
        return request().infer([image])[compiled.output(0)]  # copied out: the request reuses its own

    run.shapes = tuple([d.get_length() if d.is_static else None for d in port.get_partial_shape()]
                       for port in (compiled.input(0), compiled.output(0)))
    run.hint, run.infer = hint, infer
    run.jobs = compiled.get_property(ov.properties.optimal_number_of_infer_requests()) if throughput else 1
    return run


def is_int8(model):
    """Whether an OpenVINO model (ov.Model) holds NNCF's quantization, FakeQuantize ops: export.py --int8's files."""
    return any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


class BackendModel:
    """An exported file run by `backend` on the CPU. A logits file is called like the PyTorch model (normalized images
    in, logits out on the input's device); a labels file (export.py --argmax, `outputs_labels`) gives labels(frames)."""

    device = torch.device("cpu")  # where it computes, whatever device the images come from

    def __init__(self, path, backend, hint=None, num_classes=None, throughput=False):
        require(backend)  # the runtime's package is named as the backend: install it first, then export
        if not os.path.isfile(path):
            raise BackendError(f"{backend} model not found: {path}; write it with python export.py --ckpt CKPT"
                               + (" --openvino" if backend == "openvino" else "") + " or set backend_model=FILE")
        self.path, self.backend = path, backend
        try:  # hint and throughput: OpenVINO's (openvino_runner); ONNX Runtime: f32, one input at a time
            self.run = (openvino_runner(path, hint, throughput) if backend == "openvino"
                        else onnxruntime_runner(path))
        except Exception as err:  # the runtimes' own errors: a corrupt file, an IR without its .bin, the wrong format
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise BackendError(f"{backend} cannot load {path}: {first}; expected a file export.py wrote"
                               + (" (an .xml with its .bin beside it)" if backend == "openvino" else " (.onnx)")
                               ) from None
        input_shape, output_shape = self.run.shapes
        self.outputs_labels = check_shapes(path, input_shape, output_shape, num_classes)
        if num_classes is not None and not self.outputs_labels and output_shape[1] is None:  # class count open: ask
            check_shapes(path, input_shape, self.run(np.zeros((1, 3, 64, 64), np.float32)).shape, num_classes)

    def __call__(self, image):
        if self.outputs_labels:
            raise BackendError(f"{self.path} outputs labels (export.py --argmax) of uint8 BGR frames: call labels(), "
                               "or export the logits (without --argmax)")
        logits = self.run(image.detach().to("cpu", torch.float32).contiguous().numpy())
        return torch.from_numpy(logits).float().to(image.device)

    def labels(self, frames):
        """A labels file's uint8 class ids (N, H, W), a CPU tensor, of uint8 BGR frames (N, H, W, 3) as OpenCV decodes
        them (an array or a CPU tensor): the file normalizes them itself."""
        return torch.from_numpy(self.run(np.ascontiguousarray(frames)))


def check_shapes(path, input_shape, output_shape, num_classes=None):
    """Whether the file is a labels file, mapping frames (N, H, W, 3) to labels (N, H, W); BackendError unless it is
    that or a logits file, mapping images (N, 3, H, W) to logits (N, num_classes, H, W)."""
    if len(output_shape) == 3:
        if len(input_shape) != 4 or input_shape[3] != 3:
            raise BackendError(f"{path} outputs labels but takes input of shape {_dims(input_shape)}, not uint8 frames "
                               "(N, H, W, 3): an --argmax file of an older export.py; export it again")
        return True
    if len(output_shape) != 4:
        raise BackendError(f"{path} outputs shape {_dims(output_shape)}: expected logits (N, C, H, W) or labels "
                           "(N, H, W)")
    if len(input_shape) != 4 or input_shape[1] not in (3, None):
        raise BackendError(f"{path} takes input of shape {_dims(input_shape)}; expected images (N, 3, H, W)")
    if num_classes is not None and output_shape[1] not in (num_classes, None):
        raise BackendError(f"{path} outputs {output_shape[1]} classes, but the config has num_classes={num_classes}: "
                           "it was exported from another model; export this checkpoint (python export.py --ckpt CKPT)")
    return False


def check_labels_mode(model, mode, short_side):
    """BackendError where `model` is a labels file and evaluation asks for more than its labels at the image's size:
    the other modes and eval_short_side add up class scores, which a labels file does not give."""
    if isinstance(model, BackendModel) and model.outputs_labels and (mode != "ss" or short_side):
        asked = f"mode={mode}" if mode != "ss" else f"eval_short_side={short_side}"
        raise BackendError(f"{model.path} outputs labels (export.py --argmax), which score in mode=ss at the image's "
                           f"own size only, not {asked}: export the logits (without --argmax) for that")


def _dims(shape):
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def load_model(cfg, ckpt, model, throughput=False):
    """What evaluate.py and demo.py run: the PyTorch `model` for backend=torch, else a BackendModel of the file
    (`throughput`: openvino_runner's)."""
    if cfg.backend == "torch":
        return model
    if cfg.eval_amp != "none":
        warnings.warn(f"eval_amp={cfg.eval_amp} applies to backend=torch only; the {cfg.backend} file runs in the "
                      "precision it was exported in (export.py --int8 for INT8)", stacklevel=2)
    loaded = BackendModel(model_path(cfg, ckpt), cfg.backend, num_classes=cfg.num_classes, throughput=throughput)
    check_labels_mode(loaded, cfg.eval_mode, cfg.eval_short_side)
    return loaded


def model_path(cfg, ckpt):
    return cfg.backend_model or os.path.join(os.path.dirname(os.path.abspath(ckpt)), DEFAULT_FILES[cfg.backend])
