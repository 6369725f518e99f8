"""Serve one ONNX file with KServe's Python ModelServer (Open Inference Protocol v2), for side-by-side
benchmarks and `optiserve bench --url`. Runs in its own venv (kserve's starlette pin clashes with
BentoML's): ``python -m venv /opt/peers/kserve && /opt/peers/kserve/bin/pip install kserve onnxruntime``.

    /opt/peers/kserve/bin/python benchmarks/peers/kserve_onnx.py M.onnx --name NAME --port 8080 --threads 1

Nothing of optiserve is imported: this is KServe as its users write a custom model.
"""

from __future__ import annotations

import kserve
import numpy as np
import onnxruntime as ort
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from peer_cli import parse_args


class OnnxModel(kserve.Model):  # type: ignore[misc]
    def __init__(self, name: str, path: str, threads: int) -> None:
        super().__init__(name)
        self.path, self.threads = path, threads
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:  # type: ignore[type-arg]
        return [_meta(t) for t in self.session.get_inputs()]

    def get_output_types(self) -> list[dict]:  # type: ignore[type-arg]
        return [_meta(t) for t in self.session.get_outputs()]

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:  # type: ignore[no-untyped-def]
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        outputs = self.session.run(None, {self.input_name: x})
        infer_outputs = []
        for meta, value in zip(self.session.get_outputs(), outputs, strict=True):
            out = InferOutput(name=meta.name, shape=list(value.shape), datatype="FP32")
            out.set_data_from_numpy(value, binary_data=False)
            infer_outputs.append(out)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=infer_outputs)


def _meta(tensor: ort.NodeArg) -> dict:  # type: ignore[type-arg]
    """OIP tensor metadata; a symbolic (dynamic) axis is -1."""
    shape = [d if isinstance(d, int) else -1 for d in tensor.shape]
    return {"name": tensor.name, "datatype": "FP32", "shape": shape}


def main() -> None:
    args = parse_args(__doc__)
    kserve.ModelServer(http_port=args.port, grpc_port=args.port + 1, enable_grpc=False, workers=1).start(
        [OnnxModel(args.name, args.model, args.threads)]
    )


if __name__ == "__main__":
    main()
