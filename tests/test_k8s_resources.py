"""Pod resources that hold under the worst case (issue 17, items 7, 8, 9): QoS Guaranteed (requests equal
limits), thread pools told the pod's CPU limit through the Downward API, and a memory limit that covers
the worst case the service's own limits allow, computed from the ConfigMap and the measured per-request
costs (`python -m loadtest.memory`), as docs/deploy.md states it."""

from __future__ import annotations

import math

import pytest

from test_k8s import OVERLAYS, render
from test_k8s_policy import all_containers, config, main_container, quantity, ray_containers, rayjob

from osteoscreen.serving.grpc.server import CONTROL_HEADROOM

GiB, MiB = 2**30, 2**20
# Measured on this project's machine (docs/deploy.md, "Memory"): decoding the largest admitted image peaks at
# ~366 MiB at 50 MP (7.3 bytes per pixel); the model process holds VGG16 + the forest (~2 GiB: ~1.9 GB RSS
# measured for a process holding VGG16),
# plus VGG16's activations at batch 32 (the two largest block1 tensors, 32 x 224 x 224 x 64 float32 each).
DECODE_BYTES_PER_PIXEL = 366 * MiB / 50e6
MODEL_PROCESS = 2 * GiB
ACTIVATIONS_BATCH_32 = 2 * 32 * 224 * 224 * 64 * 4
FRONT_BASE = 512 * MiB  # BentoML's arbiter + one front worker, idle (~290 MiB measured), with margin
CUDA_HOST = 1 * GiB  # the GPU image: CUDA runtime and cuDNN host memory


def worst_case_bytes(settings: dict[str, str], cpus: int, gpu: bool) -> float:
    """What the pod may hold when every bound is reached at once (one front worker)."""
    grpc = (int(settings["OSTEOSCREEN_GRPC_MAX_CONCURRENT"]) + CONTROL_HEADROOM) * \
        int(settings["OSTEOSCREEN_GRPC_MAX_MESSAGE_BYTES"])
    http = int(settings["OSTEOSCREEN_HTTP_MAX_CONCURRENT"]) * (int(settings["OSTEOSCREEN_MAX_BYTES"]) + MiB)
    decodes = cpus * int(settings["OSTEOSCREEN_MAX_PIXELS"]) * DECODE_BYTES_PER_PIXEL
    model = MODEL_PROCESS + ACTIVATIONS_BATCH_32 + (CUDA_HOST if gpu else 0)
    return FRONT_BASE + grpc + http + decodes + model


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_qos_is_guaranteed_requests_equal_limits(overlay):
    for container in all_containers(render(overlay)):
        resources = container["resources"]
        for resource in ("cpu", "memory"):
            assert quantity(resources["requests"][resource]) == quantity(resources["limits"][resource]), \
                f"{container['name']}: {resource} request != limit (QoS would be Burstable)"


def test_screening_pods_are_guaranteed_too():
    """The RayJob's pods (head, workers, submitter, autoscaler): a Ray node the kubelet evicts under memory
    pressure loses its objects and its actors' batches; Guaranteed pods go last."""
    for role, container in ray_containers(rayjob()):
        resources = container["resources"]
        for resource in ("cpu", "memory"):
            assert quantity(resources["requests"][resource]) == quantity(resources["limits"][resource]), \
                f"{role}: {resource} request != limit"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_thread_pools_are_told_the_pods_cpu_limit(overlay):
    container = main_container(render(overlay))
    [cpus] = [e for e in container.get("env", []) if e["name"] == "OSTEOSCREEN_CPUS"]
    field = cpus["valueFrom"]["resourceFieldRef"]
    assert field["resource"] == "limits.cpu" and field.get("containerName") == container["name"]
    assert str(field.get("divisor", "1")) == "1", "whole CPUs: the Downward API rounds the limit up"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_memory_limit_covers_the_worst_case_the_service_limits_allow(overlay):
    docs = render(overlay)
    container, settings = main_container(docs), config(docs)
    limits = container["resources"]["limits"]
    cpus = math.ceil(quantity(limits["cpu"]))
    worst = worst_case_bytes(settings, cpus, gpu="nvidia.com/gpu" in limits)
    memory = quantity(limits["memory"])
    assert worst <= memory, f"worst case {worst / GiB:.1f} GiB > memory limit {memory / GiB:.1f} GiB"
    assert memory - worst < 4 * GiB, f"{(memory - worst) / GiB:.1f} GiB never used even in the worst case"
    # bytes admitted to the queue are bounded too, and a single largest image still fits
    assert int(settings["OSTEOSCREEN_MAX_BYTES"]) <= int(settings["OSTEOSCREEN_MAX_INFLIGHT_BYTES"]) <= 1 * GiB
