# Load and performance targets; the Makefile includes this file (it defines BIN and the targets install,
# weights, train and model). Every target serves the registered model on free loopback ports, training one first
# when none is registered (like `make serve`). Details: loadtest/README.md.
#
#   make loadtest   Locust headless (HTTP + gRPC + v2) for LOADTEST_RUN_TIME; HTML/CSV reports; exit 1 on a broken SLO
#   make bench      raw model vs served throughput and p50/p95 at concurrency 1/8/32; markdown + JSON
#   make overload   offered load OVERLOAD_FACTOR x capacity: every answer within its deadline, bounded memory
#   make soak       Locust for SOAK_RUN_TIME at SOAK_LOAD x the capacity `make bench` measured; zero failures
#   make bench-dicom  the DICOM node: C-STORE over 8 associations to SR stored back in Orthanc, against the raw model
#   make bench-gpu  on a GPU machine (a few minutes): raw float32 vs bfloat16, a short served bench; gpu.json/gpu.md
#   make bench-gpu-torch  here: export the extractor for the lent GPU machine (PyTorch, no TensorFlow there) to
#                   GPU_BUNDLE (build/gpu, ~58 MiB: weights, phantom inputs, Keras float32 features) and run its
#                   benchmark once on this CPU (--smoke); then there: `python3 -m loadtest.gpu_torch` (loadtest/README.md)
LOADTEST_USERS ?= 6
LOADTEST_SPAWN_RATE ?= 6
LOADTEST_RUN_TIME ?= 60s
LOADTEST_PROTOCOLS ?= http,grpc,v2
LOADTEST_SLO ?= loadtest/slo.yaml
LOADTEST_REPORTS ?= reports/loadtest
LOADTEST_MIX ?= png=6,jpeg=3,dicom=1
LOADTEST_TARGET_RPS ?= 0
LOADTEST_ARGS ?=
BENCH_OUT ?= reports/bench
BENCH_DURATION ?= 15
BENCH_ARGS ?=
OVERLOAD_FACTOR ?= 4
OVERLOAD_DURATION ?= 30
OVERLOAD_DEADLINE ?= 10
OVERLOAD_ARGS ?=
SOAK_RUN_TIME ?= 5m
SOAK_LOAD ?= 0.8
SOAK_USERS ?= 16
# the inputs `make bench` measured capacity with (no DICOM), so that SOAK_LOAD is a true share of capacity
SOAK_MIX ?= png=2,jpeg=1
GPU_BUNDLE ?= build/gpu
# e.g. --model osteoscreen:TAG (a registered extractor instead of a fresh one), --random-weights (throughput only)
GPU_EXPORT_ARGS ?=

.PHONY: loadtest bench overload soak bench-gpu bench-gpu-torch bench-dicom

loadtest: model
	$(BIN)/python -m loadtest.run --users $(LOADTEST_USERS) --spawn-rate $(LOADTEST_SPAWN_RATE) \
		--run-time $(LOADTEST_RUN_TIME) --protocols $(LOADTEST_PROTOCOLS) --slo $(LOADTEST_SLO) \
		--reports $(LOADTEST_REPORTS) --mix $(LOADTEST_MIX) --target-rps $(LOADTEST_TARGET_RPS) $(LOADTEST_ARGS)

bench: model
	$(BIN)/python -m loadtest.bench bench --duration $(BENCH_DURATION) --out $(BENCH_OUT) $(BENCH_ARGS)

overload: model
	$(BIN)/python -m loadtest.bench overload --factor $(OVERLOAD_FACTOR) --duration $(OVERLOAD_DURATION) \
		--deadline $(OVERLOAD_DEADLINE) --out $(BENCH_OUT) $(OVERLOAD_ARGS)

soak: model
	$(BIN)/python -m loadtest.run --users $(SOAK_USERS) --spawn-rate $(SOAK_USERS) --run-time $(SOAK_RUN_TIME) \
		--protocols $(LOADTEST_PROTOCOLS) --slo $(LOADTEST_SLO) --reports $(LOADTEST_REPORTS)/soak \
		--mix $(SOAK_MIX) --capacity-from $(BENCH_OUT)/bench_serving.json --load $(SOAK_LOAD)

bench-gpu: model
	$(BIN)/python -m loadtest.gpu --out $(BENCH_OUT)/gpu

# the GPU machine has no TensorFlow: the export carries what its pure-PyTorch benchmark needs; the smoke run proves
# the script works on this bundle before GPU time is spent on it
bench-gpu-torch: weights
	$(BIN)/python -m loadtest.gpu_export --out $(GPU_BUNDLE) $(GPU_EXPORT_ARGS)
	$(BIN)/python -m loadtest.gpu_torch --bundle $(GPU_BUNDLE) --out $(BENCH_OUT)/gpu_torch_smoke --smoke

# the demo data's phantoms (what the model was trained on), so the content check passes as for real lumbar films
bench-dicom: model data tools
	$(BIN)/python -m loadtest.dicom_node --data $(DATA) --out $(BENCH_OUT) $(BENCH_DICOM_ARGS)
