"""Every `OSTEOSCREEN_*` setting in one place: its type, default, bounds and meaning.

Settings are environment variables (Kubernetes sets them from a ConfigMap), read and validated together by
`current()`, once per process in practice: `service.py` and the CLI call it at start, so a bad value stops
`bentoml serve` or the command with one line naming the variable and what it accepts, instead of failing
wherever the value is first used, sometimes in the middle of a request. No other module reads an
`OSTEOSCREEN_*` variable; the README's settings table is generated from this class (`markdown_table`).

Pydantic does the typing and bounds (`1_000_000`, `off`, ` Flag ` all parse as a person means them). Not
pydantic-settings' `BaseSettings`: its source reads `os.environ` only, while the TLS checks and the tests
validate explicit mappings, and its errors name fields, not the variables an operator sets.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from osteoscreen.errors import OsteoScreenError

log = logging.getLogger("osteoscreen.settings")

PREFIX = "OSTEOSCREEN_"
MiB = 1024 * 1024
# Variables with the prefix that configure the test suite and the load test, not the product.
NOT_SETTINGS = frozenset({"OSTEOSCREEN_REQUIRE_TOOLS", "OSTEOSCREEN_LOADTEST_DATA"})
_BOOL_ACCEPTS = "1 or 0 (also true/false, yes/no, on/off)"


class SettingsError(OsteoScreenError, ValueError):
    """A setting has a value it does not accept. The message names the variable and what it accepts."""


class Settings(BaseModel):
    """One process's settings; the field `max_queue` is the variable `OSTEOSCREEN_MAX_QUEUE`."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    # -- the model --------------------------------------------------------------------------------------
    model_tag: str = Field("osteoscreen:latest", min_length=1, description="the registered model to serve (a BentoML tag)")
    runtime: Literal["auto", "tensorflow", "openvino"] = Field(
        "auto", description="the extractor's runtime; auto: the fastest runtime and precision this hardware runs "
                            "natively whose recorded agreement passes the model's numerics gate")
    precision: Literal["auto", "float32", "bfloat16", "int8"] = Field(
        "auto", description="the extractor's compute precision (int8: OpenVINO only); auto: the fastest one the "
                            "hardware runs natively and the model's numerics gate passes")
    intended_use: Literal["refuse", "flag"] = Field(
        "refuse", description="an image failing an intended-use check is refused (HTTP 422, gRPC FAILED_PRECONDITION) "
                              "or answered with its findings (site validation, research)")
    gpu: bool = Field(False, description="the model service asks BentoML for one GPU instead of one CPU")
    max_batch: int = Field(32, ge=1, description="largest model batch (the greedy batcher's; on CPU 8 is about as fast and needs less memory)")
    cpus: Optional[float] = Field(None, gt=0, description="CPUs for TensorFlow's, OpenMP's and BLAS's pools and the "
                                                         "decode threads (the Deployment sets it from the pod's CPU "
                                                         "limit); unset: the cgroup quota, else the schedulable CPUs")
    keras_download: bool = Field(True, description="`osteoscreen weights` first tries Keras's own download "
                                                   "(0: offline sources only)")
    cache: Path = Field(Path.home() / ".cache" / "osteoscreen",
                        description="where training caches extracted features")
    # -- the front: admission and input limits ------------------------------------------------------------
    front_workers: int = Field(1, ge=1, description="front worker processes (decode, HTTP, gRPC); they share one batcher")
    max_queue: int = Field(64, ge=1, description="images admitted and not yet answered per front worker, before "
                                                  "503 / RESOURCE_EXHAUSTED (bounds memory; deadlines bound time)")
    max_inflight_bytes: int = Field(256 * MiB, ge=1, description="encoded image bytes admitted and not yet "
                                                                  "answered per front worker, both protocols")
    decode_threads: int = Field(0, ge=0, description="images decoded at once per front worker, each up to "
                                                     "~0.3 GiB at 40 MP (0: one per CPU)")
    http_max_concurrent: int = Field(32, ge=1, description="HTTP requests in flight per front worker (503 "
                                                            "beyond); as many as a batch, so HTTP clients alone can fill one")
    max_bytes: int = Field(64 * MiB, ge=1, description="largest encoded image accepted, checked before decoding")
    max_pixels: int = Field(50_000_000, ge=1, description="largest image accepted, in pixels (rows x columns)")
    j2k_reduce: bool = Field(True, description="decode large JPEG 2000 DICOM at a reduced resolution level (>= 448 px)")
    model_check_s: float = Field(2.0, gt=0, description="seconds between the front's checks that the model service answers")
    model_check_timeout_s: float = Field(3.0, gt=0, description="a model check slower than this fails")
    explain_concurrency: int = Field(1, ge=1, description="explanations running at once per front worker")
    explain_queue: int = Field(2, ge=0, description="explanations waiting per front worker; more get "
                                                 "503 / RESOURCE_EXHAUSTED at once (screening is not affected)")
    # -- gRPC -----------------------------------------------------------------------------------------
    grpc_port: int = Field(50051, ge=0, le=65535, description="the gRPC port (0: any free port)")
    grpc_host: str = Field("[::]", min_length=1, description="the address gRPC binds")
    grpc_max_message_bytes: int = Field(64 * MiB, ge=1, description="largest gRPC message, either way")
    grpc_max_concurrent: int = Field(80, ge=1, description="prediction RPCs in flight per front worker "
                                                           "(RESOURCE_EXHAUSTED beyond); with the message limit it "
                                                           "bounds the bytes gRPC holds (docs/deploy.md)")
    grpc_max_connection_age_s: float = Field(300.0, ge=0, description="clients reconnect after this, so new replicas "
                                                                      "get traffic (0: never)")
    grpc_health_port: int = Field(50052, ge=0, le=65535, description="with TLS: a plaintext grpc.health.v1-only port "
                                                                     "for probes (0: none)")
    shutdown_grace_s: float = Field(20.0, ge=0, description="seconds in-flight calls get to finish after SIGTERM")
    # -- TLS ------------------------------------------------------------------------------------------
    tls_cert: Optional[Path] = Field(None, description="PEM server certificate (chain): TLS on gRPC and HTTP")
    tls_key: Optional[Path] = Field(None, description="PEM key of that certificate")
    tls_client_ca: Optional[Path] = Field(None, description="PEM CA bundle: mutual TLS, client certificates required")
    allowed_clients: Optional[str] = Field(None, description="comma list of caller identities (client "
                                                      "certificate SAN or CN; `prefix*`); others get 403 / PERMISSION_DENIED")
    # -- the PACS node (osteoscreen.serving.dicom) --------------------------------------------------------
    dicom_port: Optional[int] = Field(None, ge=0, le=65535, description="the DICOM port (C-STORE and C-ECHO) the "
                                                                        "PACS routes images to (unset: no DICOM node; 0: any free port)")
    dicom_host: str = Field("0.0.0.0", min_length=1, description="the IPv4 address the DICOM port binds")
    dicom_ae_title: str = Field("OSTEOSCREEN", min_length=1, max_length=16,
                                description="the node's AE title (1-16 characters, no backslash)",
                                json_schema_extra={"accepts": "1-16 characters of text, no backslash"})
    dicom_allowed_aes: Optional[str] = Field(None, description="comma list of the calling AE titles allowed to "
                                                               "associate; any other is rejected (unset: any)",
                                         json_schema_extra={"accepts": "AE titles (1-16 characters), comma separated"})
    dicom_concurrency: int = Field(32, ge=1, le=256, description="outbox entries the node screens at once: enough "
                                                                 "to fill the model's batches, each holding one decoded image")
    results_destination: Optional[str] = Field(
        None, description="where the node stores results back: `dicom://AET@host:port` (C-STORE); "
                          "`http(s)://host:port/path`, a DICOMweb service root (STOW-RS); required with the DICOM port",
        json_schema_extra={"accepts": "dicom://AET@host:port or http(s)://host:port/path"})
    results_overlay: bool = Field(False, description="also store the explanation overlay (a Secondary Capture the SR "
                                                     "references) with each SR; costs an explanation per image")
    outbox_dir: Optional[Path] = Field(None, description="the node's durable outbox (SQLite, mode 0600; a "
                                                         "PersistentVolume in Kubernetes); unset: `<cache>/outbox`")
    outbox_retention_s: float = Field(7 * 86400.0, ge=0, description="seconds a finished outbox record (UIDs and "
                                                                     "state only; the image is purged when done) is kept")
    results_retry_s: float = Field(5.0, gt=0, description="first wait before storing a result again after the "
                                                          "destination failed; doubles per attempt")
    results_retry_max_s: float = Field(300.0, gt=0, description="longest wait between store-back attempts")

    @field_validator("dicom_ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        if "\\" in value or not value.isascii() or not value.isprintable():
            raise ValueError("an AE title is printable ASCII without a backslash")
        return value

    @field_validator("dicom_allowed_aes")
    @classmethod
    def _ae_titles(cls, value: str | None) -> str | None:
        if value is not None:
            for title in value.split(","):
                cls._ae_title(title.strip())
                if not 1 <= len(title.strip()) <= 16:
                    raise ValueError("an AE title has 1-16 characters")
        return value

    @field_validator("results_destination")
    @classmethod
    def _destination(cls, value: str | None) -> str | None:
        if value is not None:
            destination(value)
        return value

    @property
    def allowed_aes(self) -> tuple[str, ...]:
        """The calling AE titles allowed to associate with the DICOM node (empty: any)."""
        return tuple(t.strip() for t in (self.dicom_allowed_aes or "").split(",") if t.strip())

    @property
    def outbox_path(self) -> Path:
        return self.outbox_dir or self.cache / "outbox"

    @field_validator("runtime", "precision", "intended_use", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def accelerator(self) -> dict[str, int | str]:
        """The model service's BentoML resources."""
        return {"gpu": 1} if self.gpu else {"cpu": "1"}


@dataclass(frozen=True)
class Destination:
    """`OSTEOSCREEN_RESULTS_DESTINATION`, parsed: scheme "dicom" (ae_title, host, port) or "http"/"https" (url)."""

    scheme: str
    host: str
    port: int
    ae_title: str = ""
    url: str = ""


def destination(value: str) -> Destination:
    """Parse `dicom://AET@host:port` or `http(s)://host[:port]/path`; ValueError when it is neither."""
    parts = urllib.parse.urlsplit(value.strip())
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port is not a number from 0 to 65535") from None
    if parts.scheme == "dicom":
        title = urllib.parse.unquote(parts.username or "")
        if not (1 <= len(title) <= 16 and parts.hostname and port and not parts.path.strip("/")):
            raise ValueError("a DICOM destination is dicom://AET@host:port")
        return Destination("dicom", parts.hostname, port, ae_title=title)
    if parts.scheme in ("http", "https") and parts.hostname and not parts.username:
        return Destination(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80),
                           url=value.strip().rstrip("/"))
    raise ValueError("a destination is dicom://AET@host:port or http(s)://host:port/path")


def default(field: str):
    """A setting's default, for the typed knobs objects (`GrpcSettings`, ...) that tests build by hand: one
    source of truth for every default."""
    return Settings.model_fields[field].default


def variable(field: str) -> str:
    return PREFIX + field.upper()


def accepts(field: str) -> str:
    """What a field's variable accepts, in words, from its type and bounds (for errors and the README)."""
    info = Settings.model_fields[field]
    if isinstance(info.json_schema_extra, dict) and "accepts" in info.json_schema_extra:
        return str(info.json_schema_extra["accepts"])
    kind = info.annotation
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        kind = args[0]
    if typing.get_origin(kind) is Literal:
        return " or ".join(typing.get_args(kind))
    if kind is bool:
        return _BOOL_ACCEPTS
    bounds = []
    for bound in info.metadata:
        if isinstance(bound, annotated_types.Ge):
            bounds.append(f">= {bound.ge}")
        elif isinstance(bound, annotated_types.Gt):
            bounds.append(f"> {bound.gt}")
        elif isinstance(bound, annotated_types.Le):
            bounds.append(f"<= {bound.le}")
    noun = {int: "an integer", float: "a number", Path: "a file path", str: "text"}.get(kind, str(kind))
    return f"{noun} {' and '.join(bounds)}".strip()


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Validate the `OSTEOSCREEN_*` variables of `environ` (default: this process's). An empty value means
    unset. Raises SettingsError naming the first bad variable; an unknown name is a warning with the nearest
    real one, since a misspelt setting that is silently ignored is the classic outage."""
    env = os.environ if environ is None else environ
    values: dict[str, str] = {}
    for name, raw in env.items():
        if not name.startswith(PREFIX) or name in NOT_SETTINGS or not raw.strip():
            continue
        field = name[len(PREFIX):].lower()
        if field not in Settings.model_fields:
            near = difflib.get_close_matches(field, Settings.model_fields, n=1)
            log.warning("%s is not a setting%s; ignored", name, f" (did you mean {variable(near[0])}?)" if near else "")
            continue
        values[field] = raw
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0])
        raise SettingsError(f"{variable(field)}={values.get(field, '')!r} is not valid: it accepts "
                            f"{accepts(field)}") from None


@functools.lru_cache(maxsize=8)
def _cached(items: tuple[tuple[str, str], ...]) -> Settings:
    return load(dict(items))


def current() -> Settings:
    """This process's settings. Parsed once for a given environment: the cache key is the `OSTEOSCREEN_*`
    variables themselves, so a test that changes one gets the new value, and a server, whose environment
    never changes, parses them once."""
    return _cached(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(PREFIX))))


README_BEGIN, README_END = "<!-- settings:begin -->", "<!-- settings:end -->"


def markdown_table() -> str:
    """The README's settings table: variable, default, what it accepts, meaning."""
    rows = ["| variable | default | accepts | meaning |", "| --- | --- | --- | --- |"]
    for field, info in Settings.model_fields.items():
        default = info.default
        if isinstance(default, bool):
            shown = "1" if default else "0"
        elif default is None:
            shown = "unset"
        elif field == "cache":
            shown = "`~/.cache/osteoscreen`"
        elif isinstance(default, int) and default >= MiB and default % MiB == 0:
            shown = f"{default} ({default // MiB} MiB)"
        else:
            shown = f"`{default}`"
        rows.append(f"| `{variable(field)}` | {shown} | {accepts(field)} | {info.description} |")
    return "\n".join(rows)


def readme_with_table(readme: str) -> str:
    """`readme` with the text between its settings markers replaced by `markdown_table()`."""
    head, found, rest = readme.partition(README_BEGIN)
    _, found_end, tail = rest.partition(README_END)
    if not (found and found_end):
        raise ValueError(f"the README has no {README_BEGIN} ... {README_END} markers")
    return f"{head}{README_BEGIN}\n{markdown_table()}\n{README_END}{tail}"


if __name__ == "__main__":  # `python -m osteoscreen.settings README.md`: regenerate the README's table
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    target.write_text(readme_with_table(target.read_text()))
