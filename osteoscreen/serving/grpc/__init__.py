"""gRPC adapters: `server` (one grpc.aio server with its guards, health and reflection), `screening` (the
osteoscreen.v1 API) and `v2` (the KServe/Triton Open Inference Protocol), thin over the inference path."""
