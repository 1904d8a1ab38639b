"""Turn a CustomResourceDefinition's `openAPIV3Schema` into the strict JSON Schema files of this folder.

Why a script and not a hand-written schema: the KubeRay CRDs embed three full PodSpecs (head, workers,
submitter); a copy by hand would be wrong somewhere. This keeps the CRD's own schema and changes only what
the API server does differently from JSON Schema:

- unknown fields: the API server rejects them under strict field validation (`kubectl apply` warns or fails),
  JSON Schema accepts them unless told, so every object with `properties` and no `additionalProperties` (and
  no `x-kubernetes-preserve-unknown-fields`) gets `additionalProperties: false`;
- `nullable: true` becomes a `"null"` in the type;
- `apiVersion` and `kind` are pinned (`const`), `metadata` is the strict ObjectMeta of the other files here,
  `status` (written by the operator, never by a manifest) is any object, as in the other files.

The `x-kubernetes-*` keywords stay (JSON Schema ignores them; CEL rules are not checked here). Usage:

    git show v1.6.2:ray-operator/config/crd/bases/ray.io_rayjobs.yaml > /tmp/rayjobs.yaml
    python k8s/schemas/crd_to_jsonschema.py /tmp/rayjobs.yaml v1 "KubeRay v1.6.2" > k8s/schemas/rayjob-ray-v1.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
METADATA_FROM = HERE / "servicemonitor-monitoring-v1.json"  # the strict ObjectMeta every file here shares


def strict(node: Any) -> Any:
    """The node with unknown fields rejected wherever the API server rejects them, recursively."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict(value) for key, value in node.items()}
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def convert(crd: dict, version: str, origin: str, source_sha256: str) -> dict:
    spec = crd["spec"]
    (served,) = [v for v in spec["versions"] if v["name"] == version]
    schema = served["schema"]["openAPIV3Schema"]
    api_version, kind = f"{spec['group']}/{version}", spec["names"]["kind"]
    metadata = json.loads(METADATA_FROM.read_text())["properties"]["metadata"]
    properties = {
        "apiVersion": {"const": api_version},
        "kind": {"const": kind},
        "metadata": metadata,
        **{k: strict(v) for k, v in schema["properties"].items() if k not in ("apiVersion", "kind", "metadata")},
        "status": {"type": "object"},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{kind} ({api_version})",
        "description": (f"{kind} of {origin} ({crd['metadata']['name']}, CRD file sha256 {source_sha256}), "
                        "converted by crd_to_jsonschema.py from the CRD's openAPIV3Schema: unchanged but for "
                        "unknown fields rejected (as `kubectl apply --validate=strict` does), nullable as a null "
                        "type, apiVersion and kind pinned, the strict ObjectMeta of the other files here, and "
                        "status accepted as any object. See README.md in this folder."),
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": properties,
    }


def main(argv: list[str]) -> int:
    path, version, origin = argv
    raw = Path(path).read_bytes()
    schema = convert(yaml.safe_load(raw), version, origin, hashlib.sha256(raw).hexdigest())
    sys.stdout.write(json.dumps(schema, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
