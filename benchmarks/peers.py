"""Peers of pydiffmed's UNet3D for benchmarks/bench_unet.py: other ways to run the same MONAI DiffusionModelUNet
(same weights, same input) on the CPU, each as a callable `fn()` that runs one forward and returns its output.

    peers = build_peers(monai_model, x, t, include=("eager", "autocast", "compile", "onnxruntime", "openvino"))

Peers (the `include` keys):
* eager        MONAI eager fp32 (the model as given) and bf16 (a copy cast with .to(torch.bfloat16)).
* autocast     MONAI fp32 weights under torch.autocast("cpu", dtype=torch.bfloat16).
* compile      torch.compile(MONAI) fp32 and bf16 (mode: compile_mode, "default" unless asked; "max-autotune"
               compiles for minutes on a CPU); compile_s = wall time of the first call (compile + one forward).
* onnxruntime  ONNX Runtime, CPU execution provider, fp32, on torch.onnx.export of MONAI's model (the dynamo
               exporter first, the legacy TorchScript exporter if that fails; Peer.note says which and the opset).
* openvino     OpenVINO CPU fp32 and bf16 (compile config INFERENCE_PRECISION_HINT), from
               openvino.convert_model(torch model, example_input=...) or, if that fails, from the ONNX export.

ONNX Runtime and OpenVINO get torch's thread count (intra-op threads / INFERENCE_NUM_THREADS), so every peer uses
the same cores. A peer that cannot be imported, exported or compiled is returned with fn=None and a one-line note
saying why: building peers never raises. Every built peer is run once and checked against MONAI fp32
(Peer.rel_l2 = ‖y − y_MONAI fp32‖ / ‖y_MONAI fp32‖).
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

PEER_KEYS = ("eager", "autocast", "compile", "onnxruntime", "openvino")


@dataclass
class Peer:
    name: str                      # row name; its last word is the dtype ("OpenVINO bf16")
    key: str                       # which of PEER_KEYS built it
    dtype: str                     # "fp32" or "bf16": the precision it computes in
    fn: Callable | None = None     # one forward, returns the output; None when the peer failed
    note: str = ""                 # how it was built, or why it failed (one line)
    compile_s: float | None = None  # build / compile time where it applies
    rel_l2: float | None = None    # vs MONAI fp32 eager

    @property
    def ok(self) -> bool:
        return self.fn is not None


def why(exc: BaseException) -> str:
    """One line: the exception's type and the first line of its message, at most 160 characters."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}".strip()
    return line if len(line) <= 160 else line[:157] + "..."


def as_tensor(y) -> torch.Tensor:
    if isinstance(y, (list, tuple)):
        y = y[0]
    if not isinstance(y, torch.Tensor):
        import numpy as np

        y = torch.from_numpy(np.asarray(y))
    return y.detach().float().cpu()


def rel_l2(y, ref) -> float:
    y, ref = as_tensor(y), as_tensor(ref)
    return float(torch.linalg.vector_norm(y - ref) / torch.linalg.vector_norm(ref))


# --- torch peers ---------------------------------------------------------------------------------------------

def _eager(model, x, t):
    def fn():
        with torch.no_grad():
            return model(x, t)
    return fn


def _autocast(model, x, t):
    def fn():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, t)
    return fn


def _compiled(model, x, t, mode):
    import torch._dynamo

    # a benchmark compiles the same MONAI classes for every case and dtype: keep dynamo's recompile limit clear
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))
    compiled = torch.compile(model, mode=mode, dynamic=False)
    fn = _eager(compiled, x, t)
    start = time.perf_counter()
    fn()  # compiles (and, with max-autotune, benchmarks kernels) outside the timed region
    return fn, time.perf_counter() - start


# --- ONNX export (shared by ONNX Runtime and, as a fallback, OpenVINO) ------------------------------------------

class OnnxExport:
    """torch.onnx.export of the model into a temporary directory, done once on first use; path is None (and note
    says why) when every exporter failed."""

    def __init__(self, model, x, t, opsets=(18, 17)):
        self.model, self.x, self.t, self.opsets = model, x, t, opsets
        self.dir = None
        self.path = None
        self.note = None
        self.export_s = None

    def get(self):
        if self.note is not None:
            return self.path
        self.dir = tempfile.mkdtemp(prefix="pydiffmed_onnx_")
        failures = []
        start = time.perf_counter()
        for dynamo in (True, False):
            for opset in self.opsets:
                path = os.path.join(self.dir, f"unet_{'dynamo' if dynamo else 'legacy'}_{opset}.onnx")
                label = f"{'dynamo' if dynamo else 'legacy'} exporter, opset {opset}"
                onnx_log = logging.getLogger("torch.onnx")
                level = onnx_log.level
                onnx_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" etc.
                try:
                    with torch.no_grad(), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        torch.onnx.export(self.model, (self.x, self.t), path, input_names=["x", "t"],
                                          output_names=["y"], opset_version=opset, dynamo=dynamo, verbose=False)
                    if not os.path.exists(path):
                        raise RuntimeError("no file written")
                except Exception as exc:  # noqa: BLE001 - any failure: try the next exporter / opset
                    failures.append(f"{label}: {why(exc)}")
                    continue
                finally:
                    onnx_log.setLevel(level)
                self.path, self.export_s = path, time.perf_counter() - start
                self.note = label + (f" (failed first: {'; '.join(failures)})" if failures else "")
                return path
        self.note = "torch.onnx.export failed: " + " | ".join(failures)
        return None

    def cleanup(self):
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _onnxruntime(export: OnnxExport, x, t, threads):
    import onnxruntime as ort

    path = export.get()
    if path is None:
        raise RuntimeError(export.note)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    start = time.perf_counter()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    build_s = time.perf_counter() - start
    names = [i.name for i in session.get_inputs()]
    feeds = dict(zip(names, (x.numpy(), t.numpy())))

    def fn():
        return torch.from_numpy(session.run(None, feeds)[0])

    return fn, build_s, f"ORT {ort.__version__}, CPUExecutionProvider, {export.note}"


# --- OpenVINO ------------------------------------------------------------------------------------------------

class OpenVinoModel:
    """The model converted to OpenVINO once (openvino.convert_model on the torch model, else the ONNX export);
    compile(precision) gives a CPU compiled model for each precision."""

    def __init__(self, model, x, t, export: OnnxExport):
        self.model, self.x, self.t, self.export = model, x, t, export
        self.ov_model = None
        self.source = None
        self.convert_s = None

    def get(self):
        if self.ov_model is not None:
            return self.ov_model
        import openvino as ov

        start = time.perf_counter()
        shapes = [ov.PartialShape(list(self.x.shape)), ov.PartialShape(list(self.t.shape))]
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ov_model = ov.convert_model(self.model, example_input=(self.x, self.t))
            self.source = "openvino.convert_model(torch model)"
        except Exception as exc:  # noqa: BLE001 - fall back to the ONNX export
            path = self.export.get()
            if path is None:
                raise RuntimeError(f"convert_model: {why(exc)}; {self.export.note}") from exc
            ov_model = ov.Core().read_model(path)
            self.source = f"ONNX export ({self.export.note}; convert_model failed: {why(exc)})"
        ov_model.reshape(dict(zip(ov_model.inputs, shapes)))  # static shapes: the CPU plugin plans for them
        self.ov_model, self.convert_s = ov_model, time.perf_counter() - start
        return ov_model


def _openvino(source: OpenVinoModel, x, t, threads, precision):
    import openvino as ov

    ov_model = source.get()
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    start = time.perf_counter()
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    build_s = time.perf_counter() - start
    request = compiled.create_infer_request()
    inputs = {0: x.numpy(), 1: t.numpy()}

    def fn():
        request.infer(inputs, share_inputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data)

    actual = compiled.get_property("INFERENCE_PRECISION_HINT")
    actual = actual.get_type_name() if hasattr(actual, "get_type_name") else actual
    note = (f"OpenVINO {ov.__version__.split('-')[0]}, from {source.source}, inference precision {actual}, "
            f"{compiled.get_property('INFERENCE_NUM_THREADS')} threads")
    return fn, build_s, note


# --- all peers -----------------------------------------------------------------------------------------------

def build_peers(model, x, t, *, include=PEER_KEYS, dtypes=("fp32", "bf16"), compile_mode="default",
                threads=None, reference=None, log=None) -> list[Peer]:
    """The peers named by `include` (PEER_KEYS) at the precisions in `dtypes`, built from the fp32 MONAI model
    on CPU tensors x (B×C×D×H×W, fp32) and t ((B,), long). reference: MONAI fp32's output (computed if None).
    log(str): progress lines (default: none)."""
    log = log or (lambda line: None)
    threads = threads or torch.get_num_threads()
    unknown = set(include) - set(PEER_KEYS)
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)}; known: {PEER_KEYS}")
    model = model.eval()
    if reference is None:
        with torch.no_grad():
            reference = model(x, t)
    bf16_model = None

    def monai_bf16():
        nonlocal bf16_model
        if bf16_model is None:
            bf16_model = copy.deepcopy(model).to(torch.bfloat16)
        return bf16_model

    export = OnnxExport(model, x, t)
    ov_source = OpenVinoModel(model, x, t, export)
    xb = x.to(torch.bfloat16)
    suffix = "" if compile_mode == "default" else f", {compile_mode}"
    plans = []  # (key, name, dtype, builder() -> fn | (fn, compile_s) | (fn, compile_s, note))
    if "eager" in include:
        plans += [("eager", "MONAI fp32", "fp32", lambda: _eager(model, x, t)),
                  ("eager", "MONAI bf16", "bf16", lambda: _eager(monai_bf16(), xb, t))]
    if "autocast" in include:
        plans.append(("autocast", "MONAI autocast bf16", "bf16", lambda: _autocast(model, x, t)))
    if "compile" in include:
        plans += [("compile", f"torch.compile(MONAI{suffix}) fp32", "fp32",
                   lambda: _compiled(model, x, t, compile_mode)),
                  ("compile", f"torch.compile(MONAI{suffix}) bf16", "bf16",
                   lambda: _compiled(monai_bf16(), xb, t, compile_mode))]
    if "onnxruntime" in include:
        plans.append(("onnxruntime", "ONNX Runtime fp32", "fp32", lambda: _onnxruntime(export, x, t, threads)))
    if "openvino" in include:
        plans += [("openvino", "OpenVINO fp32", "fp32", lambda: _openvino(ov_source, x, t, threads, "f32")),
                  ("openvino", "OpenVINO bf16", "bf16", lambda: _openvino(ov_source, x, t, threads, "bf16"))]
    peers = []
    for key, name, dtype, build in plans:
        if dtype not in dtypes:
            continue
        peer = Peer(name, key, dtype)
        start = time.perf_counter()
        try:
            built = build()
            fn, extra = (built[0], built[1:]) if isinstance(built, tuple) else (built, ())
            peer.compile_s = extra[0] if extra else None
            peer.note = extra[1] if len(extra) > 1 else ""
            peer.rel_l2 = rel_l2(fn(), reference)
            peer.fn = fn
        except Exception as exc:  # noqa: BLE001 - a peer that fails is a row note, never a crash
            peer.note = f"failed: {why(exc)}" + (" (pip install -e '.[bench]')" if isinstance(exc, ImportError) else "")
        if key == "openvino" and ov_source.convert_s is not None and peer.compile_s is not None:
            peer.compile_s += ov_source.convert_s  # conversion counted with each precision's compile
        if key == "onnxruntime" and export.export_s is not None and peer.compile_s is not None:
            peer.compile_s += export.export_s
        log(f"peer {name}: {'built' if peer.ok else 'FAILED'} in {time.perf_counter() - start:.1f} s"
            + (f", rel L2 vs MONAI fp32 {peer.rel_l2:.2e}" if peer.ok else "")
            + (f" ({peer.note})" if peer.note else ""))
        peers.append(peer)
    export.cleanup()  # ONNX Runtime and OpenVINO hold the model in memory once built
    return peers


__all__ = ["PEER_KEYS", "OnnxExport", "OpenVinoModel", "Peer", "build_peers", "rel_l2", "why"]
