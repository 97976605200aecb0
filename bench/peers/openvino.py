"""OpenVINO peers: the ONNX export converted to IR (fp32 weights kept), NNCF int8 of it, compiled for the CPU
with each peer's precision hint, and run under LATENCY or THROUGHPUT (``_OvPeers``, shared by ``PeerSet`` and
``NaflexPeerSet``; ``_OvRunner``)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .common import _seconds

# OpenVINO peers: INFERENCE_PRECISION_HINT of each (the CPU plugin's default is bf16 on CPUs with AMX or
# AVX512-BF16, which would make "ov-fp32" a bf16 peer); ov-int8 runs NNCF's int8 ops and f32 everywhere else,
# like fastclip int8 and ONNX Runtime's dynamic int8.
OV_PRECISION = {"ov-fp32": "f32", "ov-bf16": "bf16", "ov-int8": "f32"}
OV_CALIBRATION = {"image": 64, "text": 128}  # NNCF calibration items per tower, one input each
# nncf.quantize's options beyond the dataset (its preset is then MIXED: symmetric int8 weights per channel,
# asymmetric activations per tensor, SmoothQuant on the MatMuls).
OV_INT8_OPTIONS = {"model_type": "TRANSFORMER", "target_device": "CPU"}
Inputs = torch.Tensor | dict  # a model's one input (B, ...), or its inputs by name {name: (B, ...)}


class _OvPeers:
    """The OpenVINO peers of a peer set, on its ONNX export of ``tower``. The host provides ``onnx_path(tower)``,
    ``ov_calibration(tower)`` (NNCF's items, one model input each: an array, or a dict of arrays by input name),
    ``self._built`` and ``self.info``."""

    def ov_ir_path(self, tower: str) -> Path:
        """The ONNX export (``onnx_path``) converted by ``openvino.convert_model`` and saved as OpenVINO IR with
        its fp32 weights kept (``compress_to_fp16=False``): ``<tower>/openvino.xml`` (+ ``.bin``)."""
        import openvino as ov

        path = self.onnx_path(tower).with_name("openvino.xml")
        if not path.is_file():
            _save_ir(ov.convert_model(str(self.onnx_path(tower))), path)
        return path

    def ov_int8_path(self, tower: str) -> Path:
        """NNCF post-training quantisation of the OpenVINO IR (``nncf.quantize``, ``OV_INT8_OPTIONS``), calibrated
        on ``ov_calibration(tower)``: ``<tower>/openvino-int8-cal<N>.xml`` (+ ``.bin``)."""
        import nncf
        import openvino as ov

        items = self.ov_calibration(tower)
        path = self.onnx_path(tower).with_name(f"openvino-int8-cal{len(items)}.xml")
        if not path.is_file():
            model = ov.Core().read_model(str(self.ov_ir_path(tower)))
            quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items),
                                      model_type=nncf.ModelType[OV_INT8_OPTIONS["model_type"]],
                                      target_device=nncf.TargetDevice[OV_INT8_OPTIONS["target_device"]])
            _save_ir(quantized, path)
        return path

    def ov_compiled(self, impl: str, tower: str, hint: str):
        """``openvino.Core().compile_model`` of ``impl``'s IR on the CPU: ``PERFORMANCE_HINT=hint``, torch's thread
        count, and the ``INFERENCE_PRECISION_HINT`` of ``OV_PRECISION[impl]`` (f32 unless the peer is bf16)."""
        import openvino as ov

        key = ("openvino", impl, tower, hint)
        if key not in self._built:
            path = self.ov_int8_path(tower) if impl == "ov-int8" else self.ov_ir_path(tower)
            config = {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                      "INFERENCE_PRECISION_HINT": OV_PRECISION[impl]}
            self._built[key] = ov.Core().compile_model(str(path), "CPU", config)
        return self._built[key]

    def ov_encoder(self, impl: str, tower: str, example: Inputs) -> Callable:
        """``impl`` (``ov-fp32``, ``ov-bf16``, ``ov-int8``) on ``example``'s batch size (``example``: the model's one
        input tensor, or a dict of its input tensors by name, e.g. NaFlex's three): LATENCY for one item; for
        more, the faster on ``example`` of LATENCY (one request on every thread) and THROUGHPUT (the batch split
        over the plugin's optimal number of requests, run as parallel streams). The compiled settings, both
        timings and the choice go in ``info``."""
        key = ("openvino-runner", impl, tower, _batch(example))
        if key in self._built:
            return self._built[key]
        hints = ("LATENCY",) if _batch(example) == 1 else ("LATENCY", "THROUGHPUT")
        trials = {}
        for hint in hints:
            run = _OvRunner(self.ov_compiled(impl, tower, hint))
            run(example)  # warm-up
            trials[hint] = (run, min(_seconds(run, example) for _ in range(2)) if len(hints) > 1 else None)
        choice = min(trials, key=lambda h: trials[h][1] or 0.0)
        compiled = self.ov_compiled(impl, tower, choice)
        info = {"performance_hint": choice,
                "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
                "inference_num_threads": compiled.get_property("INFERENCE_NUM_THREADS"),
                "num_streams": int(compiled.get_property("NUM_STREAMS")),
                "infer_requests": trials[choice][0].requests}
        if len(hints) > 1:
            info.update({f"seconds_{h}": round(v[1], 4) for h, v in trials.items()})
        if impl == "ov-int8":
            options = ", ".join(f"{k}={v}" for k, v in OV_INT8_OPTIONS.items())
            info["quantization"] = f"nncf.quantize({options}), {len(self.ov_calibration(tower))} calibration items"
        self.info[f"{impl} {tower}"] = info
        self._built[key] = trials[choice][0]
        return self._built[key]


def _save_ir(model, path: Path) -> None:
    """Save an OpenVINO model as IR at ``path`` (.xml + .bin) with fp32 weights kept; complete files only."""
    import openvino as ov

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.stem + ".partial.xml")
    ov.save_model(model, str(staging), compress_to_fp16=False)
    staging.with_suffix(".bin").rename(path.with_suffix(".bin"))
    staging.rename(path)  # the .xml last: it marks the IR complete


class _OvRunner:
    """Tensor in (or a dict of tensors by input name, all of one batch size), features out through a compiled
    OpenVINO model. One request (LATENCY): the whole batch on it. More (THROUGHPUT): the batch split into one slice
    per request, run at once on the plugin's streams."""

    def __init__(self, compiled):
        import openvino as ov

        self.requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.request = compiled.create_infer_request()
        self.queue = ov.AsyncInferQueue(compiled, self.requests) if self.requests > 1 else None
        self._outputs: dict[int, object] = {}
        if self.queue is not None:
            self.queue.set_callback(self._done)

    def _done(self, request, index: int) -> None:
        self._outputs[index] = request.get_output_tensor(0).data.copy()

    def __call__(self, x: Inputs) -> torch.Tensor:
        named = {k: v.contiguous() for k, v in (x.items() if isinstance(x, dict) else [(0, x)])}  # input: (B, ...)
        if self.queue is None or _batch(x) == 1:
            return torch.from_numpy(self.request.infer(_arrays(named), share_inputs=True, share_outputs=False)[0])
        parts = min(self.requests, _batch(x))
        split = {k: torch.tensor_split(v, parts) for k, v in named.items()}  # each: ``parts`` slices of the batch
        chunks = [{k: split[k][i] for k in named} for i in range(parts)]
        self._outputs.clear()
        for index, chunk in enumerate(chunks):
            self.queue.start_async(_arrays(chunk), userdata=index, share_inputs=True)
        self.queue.wait_all()
        return torch.from_numpy(np.concatenate([self._outputs[i] for i in range(len(chunks))]))


def _batch(x: Inputs) -> int:
    """The batch size of one input tensor or of a dict of them."""
    return (next(iter(x.values())) if isinstance(x, dict) else x).shape[0]


def _arrays(named: dict) -> list | dict:
    """OpenVINO's inputs of ``{0: tensor}`` (the one input, by position) or ``{name: tensor}`` (by name)."""
    if list(named) == [0]:
        return [named[0].numpy()]
    return {k: v.numpy() for k, v in named.items()}
