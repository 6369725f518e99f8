r"""Serve one ONNX file with Seldon MLServer (Open Inference Protocol v2), for side-by-side benchmarks and
`optiserve bench --url`. Runs in its own venv:
``python -m venv /opt/peers/mlserver && /opt/peers/mlserver/bin/pip install mlserver onnxruntime``.

    /opt/peers/mlserver/bin/python benchmarks/peers/mlserver_onnx.py \
        M.onnx --name NAME --port 8080 --threads 1

Nothing of optiserve is imported: this is MLServer as its users write a custom runtime. `main()` writes a
settings folder (settings.json + model-settings.json pointing at `mlserver_onnx.OnnxModel`) and execs
`mlserver start` on it, so this process becomes the server and SIGTERM stops it. Inference runs in that one
process (parallel_workers=0), with no adaptive batching, no access log and no Prometheus metrics.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor
from peer_cli import parse_args


class OnnxModel(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        params = self.settings.parameters
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.extra.get("threads", 1))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(params.uri, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [t.name for t in self.session.get_outputs()]
        self.inputs = [_meta(t) for t in self.session.get_inputs()]
        self.outputs = [_meta(t) for t in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        outputs = self.session.run(None, {self.input_name: x})
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            outputs=[
                NumpyCodec.encode_output(name, value.astype(np.float32, copy=False))
                for name, value in zip(self.output_names, outputs, strict=True)
            ],
        )


def _meta(tensor: ort.NodeArg) -> MetadataTensor:
    """OIP tensor metadata; a symbolic (dynamic) axis is -1."""
    shape = [d if isinstance(d, int) else -1 for d in tensor.shape]
    return MetadataTensor(name=tensor.name, datatype="FP32", shape=shape)


def main() -> None:
    args = parse_args(__doc__)

    folder = tempfile.mkdtemp(prefix=f"mlserver_onnx_{args.port}_")
    settings = {
        "debug": False,
        "http_port": args.port,
        "grpc_port": args.port + 1,
        "metrics_port": args.port + 2,
        "metrics_endpoint": None,  # no Prometheus middleware/server
        "parallel_workers": 0,  # infer in this one process (the benchmark pins it to one CPU)
    }
    model_settings = {
        "name": args.name,
        "implementation": "mlserver_onnx.OnnxModel",
        "parameters": {"uri": os.path.abspath(args.model), "extra": {"threads": args.threads}},
    }
    os.mkdir(os.path.join(folder, args.name))  # MLServer warns when the folder name isn't the model name
    for filename, content in (
        ("settings.json", settings),
        (f"{args.name}/model-settings.json", model_settings),
    ):
        with open(os.path.join(folder, filename), "w") as f:
            json.dump(content, f, indent=2)

    env = dict(os.environ)
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    mlserver = os.path.join(os.path.dirname(sys.executable), "mlserver")
    sys.stdout.flush()
    os.execve(mlserver, [mlserver, "start", folder], env)


if __name__ == "__main__":
    main()
