"""The one inference path every protocol shares (admission, deadlines, the greedy batcher, the client of the
model service, metrics) and the protocol adapters over it: `http` and `grpc/`. Adapters never import
TensorFlow: the model runs in its own BentoML service."""
