"""Sends images to a TF Serving model and prints the answer.

    python export/client.py --model=simclr_encoder image1.png image2.jpg
    python export/client.py --grpc --port=8500 --model=fashion_classifier shirt.png

REST (default, port 8501) posts TF Serving's predict format:
    {"signature_name": "serving_default", "instances": [{"b64": "<base64>"}, ...]}
gRPC (port 8500) needs `pip install --no-deps tensorflow-serving-api`.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request


def rest_request_body(image_bytes: list[bytes], signature: str = "serving_default") -> dict:
    """TF Serving's REST predict body for the string input `images`."""
    return {"signature_name": signature,
            "instances": [{"b64": base64.b64encode(data).decode("ascii")}
                          for data in image_bytes]}


def rest_predict(host: str, port: int, model: str, image_bytes: list[bytes],
                 version: int | None = None, timeout: float = 30.0) -> dict:
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version else "") + ":predict"
    request = urllib.request.Request(
        f"http://{host}:{port}{path}",
        data=json.dumps(rest_request_body(image_bytes)).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def grpc_request(model: str, image_bytes: list[bytes], version: int | None = None):
    """A PredictRequest for the serving_default signature."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "serving_default"
    if version:
        request.model_spec.version.value = version
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(image_bytes, dtype=tf.string))
    return request


def grpc_predict(host: str, port: int, model: str, image_bytes: list[bytes],
                 version: int | None = None, timeout: float = 30.0) -> dict:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channel = grpc.insecure_channel(f"{host}:{port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.Predict(grpc_request(model, image_bytes, version), timeout)
    return {name: tf.make_ndarray(proto).tolist() for name, proto in response.outputs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, BMP, GIF)")
    parser.add_argument("--model", required=True, help="TF Serving model name")
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=None, help="8501 (REST) / 8500 (gRPC)")
    parser.add_argument("--grpc", action="store_true", help="use gRPC instead of REST")
    args = parser.parse_args(argv)
    data = []
    for path in args.images:
        with open(path, "rb") as f:
            data.append(f.read())
    port = args.port or (8500 if args.grpc else 8501)
    try:
        if args.grpc:
            answer = grpc_predict(args.host, port, args.model, data, args.version)
        else:
            answer = rest_predict(args.host, port, args.model, data, args.version)
    except Exception as error:  # noqa: BLE001  (grpc.RpcError needs grpc imported)
        if not (isinstance(error, OSError) or type(error).__module__.startswith("grpc")):
            raise
        reason = getattr(error, "reason", None) or getattr(error, "details", lambda: error)()
        print(f"error: no answer from TF Serving at {args.host}:{port} "
              f"({'gRPC' if args.grpc else 'REST'}): {reason}. Is the server running "
              "(README: docker run ... tensorflow/serving)?", file=sys.stderr)
        return 1
    json.dump(answer, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
