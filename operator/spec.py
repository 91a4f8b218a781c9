"""Typed view of a LocalModel's `spec`, and the operator's own settings.

Plain functions and frozen dataclasses, no kopf: the handlers parse `spec` once with `parse_spec` and
hand the result to the builders in `lmkube.operator.resources`. A spec the operator cannot act on
raises ValueError with a message fit for the LocalModel's status.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

from lmkube import __version__

GpuOffload = Literal["max", "off"] | float

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_STORAGE_SIZE = "20Gi"
DEFAULT_SECRET_KEY = "token"
DEFAULT_MCP_KEY = "mcp.json"
MCP_DIR = "/etc/lmkube/mcp"  # where spec.mcp's ConfigMap or Secret is mounted
MAX_PARALLEL = 256  # the server's /api/v1/models/load limit
DEFAULT_SCALE_DOWN_DELAY = 300  # seconds; KubeAI's default is 30 s, too eager for a model that takes minutes to load
DEFAULT_SCALING_WINDOW = 60  # seconds the autoscaler averages the load over

_TTL_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_TTL_UNITS = (86400, 3600, 60, 1)


@dataclass(frozen=True)
class GpuSpec:
    count: int = 1
    resource: str = DEFAULT_GPU_RESOURCE
    offload: GpuOffload = "max"


@dataclass(frozen=True)
class StorageSpec:
    size: str = DEFAULT_STORAGE_SIZE
    storage_class_name: str | None = None
    existing_claim: str | None = None


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str = DEFAULT_SECRET_KEY


@dataclass(frozen=True)
class McpConfigRef:
    """spec.mcp: the ConfigMap or Secret whose `key` is the server's mcp.json (its other keys, e.g. a
    stdio server's script, are mounted next to it)."""

    kind: Literal["configMap", "secret"]
    name: str
    key: str = DEFAULT_MCP_KEY


@dataclass(frozen=True)
class ScalingSpec:
    """spec.scaling: the operator's autoscaler owns the replica count between `min_replicas` and `max_replicas`.

    `target_requests`: running + queued requests one replica should carry (None: spec.parallel, its slots).
    `scale_down_delay`: seconds of lower demand before replicas are removed (and after any scale change).
    `window`: seconds the load is averaged over.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    target_requests: int | None = None
    scale_down_delay: int = DEFAULT_SCALE_DOWN_DELAY
    window: int = DEFAULT_SCALING_WINDOW


@dataclass(frozen=True)
class SamplingSpec:
    """spec.sampling: the server's sampling for requests that leave a parameter out (`lmkube serve --temp ...`);
    None leaves the server's default."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None

    def serve_flags(self) -> list[str]:
        values = (("--temp", self.temperature), ("--top-k", self.top_k), ("--top-p", self.top_p),
                  ("--min-p", self.min_p), ("--repeat-penalty", self.repeat_penalty))
        return [part for flag, value in values if value is not None for part in (flag, str(value))]


@dataclass(frozen=True)
class LocalModelSpec:
    """A parsed LocalModel spec. Pod knobs are kept as the plain Kubernetes JSON the user wrote."""

    model: str
    variant: str | None = None
    context_length: int | None = None
    ttl: int | None = None  # seconds
    gpu: GpuSpec = field(default_factory=GpuSpec)
    parallel: int = 4
    replicas: int = 1
    storage: StorageSpec = field(default_factory=StorageSpec)
    auth: SecretRef | None = None  # spec.auth.secretRef; None: the operator generates the token Secret
    image: str | None = None
    resources: Mapping[str, Any] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    runtime_class_name: str | None = None
    priority_class_name: str | None = None
    env: tuple[Mapping[str, Any], ...] = ()
    image_pull_secrets: tuple[str, ...] = ()
    mcp: McpConfigRef | None = None
    scaling: ScalingSpec | None = None  # None: spec.replicas is set by hand, `kubectl scale`, an HPA or KEDA
    sampling: SamplingSpec = field(default_factory=SamplingSpec)

    @property
    def target_requests(self) -> int:
        """Running + queued requests per replica the autoscaler aims at."""
        scaling = self.scaling
        return scaling.target_requests if scaling and scaling.target_requests else self.parallel

    @property
    def model_key(self) -> str:
        """The key the server lists the model under: a Hugging Face repo id lower-cased (`org/name`)."""
        return model_key(self.model)


@dataclass(frozen=True)
class InferencePoolSettings:
    """The InferencePool (Gateway API Inference Extension) the operator creates per LocalModel, when enabled.

    `endpoint_picker`: the picker's Service; `{pool}` in it becomes the pool's name (GIE's inferencepool chart
    names the picker it installs for a pool `<pool>-epp`, the default here).
    """

    endpoint_picker: str = "{pool}-epp"
    endpoint_picker_port: int = 9002
    failure_mode: Literal["FailClose", "FailOpen"] = "FailClose"


@dataclass(frozen=True)
class OperatorSettings:
    """Operator-wide settings (flags / env of the operator Deployment), not per LocalModel."""

    cpu_image: str = f"lmkube/lmkube:{__version__}"
    cuda_image: str = f"lmkube/lmkube:{__version__}-cuda"
    models_dir: str = "/models"
    port: int = 1234
    image_pull_policy: str | None = None  # None: Kubernetes' default for the tag
    # The credential `lmkube gateway` sends; every model-server pod then accepts it besides its own token.
    gateway_token: str | None = field(default=None, repr=False)
    # Set when the chart's inferenceExtension.enabled is: an InferencePool per LocalModel, and model-server pods
    # whose /metrics answer without a token (the endpoint picker scrapes them without one).
    inference_pool: InferencePoolSettings | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """Settings from LMKUBE_OPERATOR_CPU_IMAGE, _CUDA_IMAGE, _MODELS_DIR, _PORT, _IMAGE_PULL_POLICY,
        _GATEWAY_TOKEN, and _INFERENCE_POOL=true with _ENDPOINT_PICKER, _ENDPOINT_PICKER_PORT and
        _ENDPOINT_PICKER_FAILURE_MODE."""
        env = os.environ if environ is None else environ
        default = cls()
        pool = None
        if (env.get("LMKUBE_OPERATOR_INFERENCE_POOL") or "").strip().lower() in ("1", "true", "yes"):
            failure_mode = env.get("LMKUBE_OPERATOR_ENDPOINT_PICKER_FAILURE_MODE") or "FailClose"
            if failure_mode not in ("FailClose", "FailOpen"):
                raise ValueError(f"LMKUBE_OPERATOR_ENDPOINT_PICKER_FAILURE_MODE must be FailClose or FailOpen, "
                                 f"got {failure_mode!r}")
            pool = InferencePoolSettings(
                endpoint_picker=env.get("LMKUBE_OPERATOR_ENDPOINT_PICKER") or InferencePoolSettings.endpoint_picker,
                endpoint_picker_port=int(env.get("LMKUBE_OPERATOR_ENDPOINT_PICKER_PORT")
                                         or InferencePoolSettings.endpoint_picker_port),
                failure_mode=failure_mode)  # type: ignore[arg-type]  # one of the two, checked above
        return cls(
            cpu_image=env.get("LMKUBE_OPERATOR_CPU_IMAGE") or default.cpu_image,
            cuda_image=env.get("LMKUBE_OPERATOR_CUDA_IMAGE") or default.cuda_image,
            models_dir=env.get("LMKUBE_OPERATOR_MODELS_DIR") or default.models_dir,
            port=int(env.get("LMKUBE_OPERATOR_PORT") or default.port),
            image_pull_policy=env.get("LMKUBE_OPERATOR_IMAGE_PULL_POLICY") or None,
            gateway_token=env.get("LMKUBE_OPERATOR_GATEWAY_TOKEN") or None,
            inference_pool=pool,
        )


def parse_ttl(value: Any) -> int | None:
    """Seconds from a ttl: an int, "90", "45s", "30m", "1h30m", "1d"; None stays None.

    Raises ValueError for anything else, including zero and negatives (the server wants ttl > 0).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"ttl must be a duration like 30m or a number of seconds, got {value!r}")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, float) and value.is_integer():
        seconds = int(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            seconds = int(text)
        else:
            match = _TTL_RE.fullmatch(text)
            if not text or match is None:
                raise ValueError(f"ttl must be a duration like 30m, 1h30m or 45s, or seconds, got {value!r}")
            seconds = sum(int(part) * unit for part, unit in zip(match.groups(), _TTL_UNITS, strict=True) if part)
    else:
        raise ValueError(f"ttl must be a duration like 30m or a number of seconds, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"ttl must be positive, got {value!r}")
    return seconds


def parse_offload(value: Any) -> GpuOffload:
    if value is None:
        return "max"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("max", "off"):
            return text  # type: ignore[return-value]  # "max" or "off", checked on the line above
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f'gpu.offload must be "max", "off" or a fraction 0-1, got {value!r}') from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f'gpu.offload must be "max", "off" or a fraction 0-1, got {value!r}')
    return float(value)


def split_model(model: str) -> tuple[str, str | None]:
    """(`model` without a variant suffix, the suffix) for `org/name@q4_k_m` and llama.cpp's `org/name:Q4_K_M`.

    URLs are returned whole: the scheme's colon is no variant and a /blob/... URL pins its own file.
    """
    text = model.strip()
    if _is_url(text):
        return text, None
    for sep in ("@", ":"):
        head, found, tail = text.rpartition(sep)
        if found and head and tail:
            return head, tail
    return text, None


def model_key(model: str) -> str:
    """The server's model key for a spec.model: `org/name` lower-cased, from a repo id or a Hugging Face URL."""
    text, _ = split_model(model)
    if _is_url(text):
        url = text if re.match(r"^https?://", text, re.IGNORECASE) else "https://" + text
        parts = [p for p in urlparse(url).path.split("/") if p]
        if parts and parts[0] == "models":
            parts = parts[1:]
        if len(parts) >= 2:
            text = f"{parts[0]}/{parts[1]}"
    return text.lower()


def _is_url(text: str) -> bool:
    return bool(re.match(r"^(https?://|huggingface\.co/|hf\.co/)", text, re.IGNORECASE))


def parse_spec(spec: Mapping[str, Any]) -> LocalModelSpec:
    """A LocalModelSpec from a LocalModel's `spec` (camelCase keys, as stored); ValueError when invalid.

    Unknown keys are ignored: the CRD's schema is where unknown fields are pruned or rejected.
    """
    if not isinstance(spec, Mapping):
        raise ValueError("spec must be an object")
    raw_model = spec.get("model")
    if not isinstance(raw_model, str) or not raw_model.strip():
        raise ValueError("spec.model is required (a Hugging Face repo id like Qwen/Qwen2.5-0.5B-Instruct-GGUF)")
    model, suffix = split_model(raw_model)
    variant = _opt_str(spec, "variant")
    if suffix is not None:
        if variant is not None and variant.lower() != suffix.lower():
            raise ValueError(f"spec.model names variant {suffix!r} but spec.variant is {variant!r}")
        variant = variant or suffix

    gpu_raw = _mapping(spec, "gpu")
    gpu = GpuSpec(
        count=_int(gpu_raw, "count", 1, minimum=0, where="gpu.count"),
        resource=_opt_str(gpu_raw, "resource", "gpu.resource") or DEFAULT_GPU_RESOURCE,
        offload=parse_offload(gpu_raw.get("offload")),
    )
    storage_raw = _mapping(spec, "storage")
    storage = StorageSpec(
        size=_quantity(storage_raw.get("size")) or DEFAULT_STORAGE_SIZE,
        storage_class_name=_opt_str(storage_raw, "storageClassName", "storage.storageClassName"),
        existing_claim=_opt_str(storage_raw, "existingClaim", "storage.existingClaim"),
    )
    auth = None
    secret_ref = _mapping(_mapping(spec, "auth"), "secretRef", "auth.secretRef")
    if secret_ref:
        name = _opt_str(secret_ref, "name", "auth.secretRef.name")
        if not name:
            raise ValueError("auth.secretRef.name is required")
        auth = SecretRef(name=name, key=_opt_str(secret_ref, "key", "auth.secretRef.key") or DEFAULT_SECRET_KEY)

    # Without storage.existingClaim every replica gets a cache volume of its own (resources.statefulset).
    replicas = _int(spec, "replicas", 1, minimum=0)
    scaling = parse_scaling(spec.get("scaling"))

    return LocalModelSpec(
        model=model,
        variant=variant,
        context_length=_opt_int(spec, "contextLength", minimum=1),
        ttl=parse_ttl(spec.get("ttl")),
        gpu=gpu,
        parallel=_int(spec, "parallel", 4, minimum=1, maximum=MAX_PARALLEL),
        replicas=replicas,
        storage=storage,
        auth=auth,
        image=_opt_str(spec, "image"),
        resources=dict(_mapping(spec, "resources")),
        node_selector=dict(_mapping(spec, "nodeSelector")),
        tolerations=tuple(_list(spec, "tolerations")),
        affinity=dict(spec["affinity"]) if spec.get("affinity") else None,
        runtime_class_name=_opt_str(spec, "runtimeClassName"),
        priority_class_name=_opt_str(spec, "priorityClassName"),
        env=tuple(_list(spec, "env")),
        image_pull_secrets=tuple(_pull_secret(s) for s in _list(spec, "imagePullSecrets")),
        mcp=parse_mcp(_mapping(spec, "mcp")),
        scaling=scaling,
        sampling=parse_sampling(_mapping(spec, "sampling")),
    )


def parse_sampling(value: Mapping[str, Any]) -> SamplingSpec:
    """spec.sampling; ValueError when a value is out of range (the CRD's schema refuses those too)."""
    return SamplingSpec(
        temperature=_opt_number(value, "temperature", minimum=0),
        top_k=_opt_int(value, "topK", minimum=0, where="sampling.topK"),
        top_p=_opt_number(value, "topP", minimum=0, maximum=1),
        min_p=_opt_number(value, "minP", minimum=0, maximum=1),
        repeat_penalty=_opt_number(value, "repeatPenalty", minimum=0, exclusive=True),
    )


def _opt_number(obj: Mapping[str, Any], key: str, *, minimum: float, maximum: float | None = None,
                exclusive: bool = False) -> float | None:
    """A number field of spec.sampling; `exclusive`: it must be above `minimum`."""
    value = obj.get(key)
    if value is None:
        return None
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or (value <= minimum if exclusive else value < minimum) or (
            maximum is not None and value > maximum):
        bounds = (f"more than {minimum:g}" if exclusive else f"between {minimum:g} and {maximum:g}"
                  if maximum is not None else f"at least {minimum:g}")
        raise ValueError(f"spec.sampling.{key} must be a number {bounds}, got {value!r}")
    return float(value)


def parse_scaling(value: Any) -> ScalingSpec | None:
    """spec.scaling, or None when unset; ValueError when invalid."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError("spec.scaling must be an object")
    minimum = _int(value, "minReplicas", 1, minimum=0, where="scaling.minReplicas")
    maximum = _int(value, "maxReplicas", max(minimum, 1), minimum=1, where="scaling.maxReplicas")
    if minimum > maximum:
        raise ValueError(f"spec.scaling.minReplicas ({minimum}) must not exceed scaling.maxReplicas ({maximum})")
    return ScalingSpec(
        min_replicas=minimum,
        max_replicas=maximum,
        target_requests=_opt_int(value, "targetRequests", minimum=1, where="scaling.targetRequests"),
        scale_down_delay=_duration(value, "scaleDownDelay", DEFAULT_SCALE_DOWN_DELAY, zero_ok=True),
        window=_duration(value, "window", DEFAULT_SCALING_WINDOW, zero_ok=False),
    )


def _duration(obj: Mapping[str, Any], key: str, default: int, *, zero_ok: bool) -> int:
    """A duration field of spec.scaling (`30s`, `5m`, or seconds), in seconds."""
    value = obj.get(key)
    if value is None:
        return default
    if zero_ok and value in (0, "0", "0s"):
        return 0
    try:
        seconds = parse_ttl(value)
    except ValueError:
        raise ValueError(f"spec.scaling.{key} must be a duration like 30s or 5m, or seconds, got {value!r}") from None
    assert seconds is not None
    return seconds


def parse_mcp(mcp: Mapping[str, Any]) -> McpConfigRef | None:
    """spec.mcp: exactly one of configMapRef / secretRef, each `{name, key?}`."""
    refs = [kind for kind in ("configMapRef", "secretRef") if mcp.get(kind) is not None]
    if not refs:
        return None
    if len(refs) > 1:
        raise ValueError("spec.mcp takes one of configMapRef and secretRef, not both")
    ref = _mapping(mcp, refs[0], f"mcp.{refs[0]}")
    name = _opt_str(ref, "name", f"mcp.{refs[0]}.name")
    if not name:
        raise ValueError(f"spec.mcp.{refs[0]}.name is required")
    key = _opt_str(ref, "key", f"mcp.{refs[0]}.key") or DEFAULT_MCP_KEY
    return McpConfigRef("configMap" if refs[0] == "configMapRef" else "secret", name, key)


def _mapping(obj: Mapping[str, Any], key: str, where: str | None = None) -> Mapping[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"spec.{where or key} must be an object")
    return value


def _list(obj: Mapping[str, Any], key: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ValueError(f"spec.{key} must be a list")
    return list(value)


def _opt_str(obj: Mapping[str, Any], key: str, where: str | None = None) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"spec.{where or key} must be a string")
    return value.strip() or None


def _opt_int(obj: Mapping[str, Any], key: str, *, minimum: int, where: str | None = None) -> int | None:
    if obj.get(key) is None:
        return None
    return _int(obj, key, minimum, minimum=minimum, where=where)


def _int(obj: Mapping[str, Any], key: str, default: int, *, minimum: int, maximum: int | None = None,
         where: str | None = None) -> int:
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"spec.{where or key} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"spec.{where or key} must be {bounds}, got {value}")
    return value


def _quantity(value: Any) -> str | None:
    """A Kubernetes quantity (int-or-string in the CRD) as a string: 20Gi, or 21474836480 bytes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str) or (isinstance(value, int) and value <= 0):
        raise ValueError(f"spec.storage.size must be a quantity like 20Gi, got {value!r}")
    return str(value).strip() or None


def _pull_secret(value: Any) -> str:
    name = value.get("name") if isinstance(value, Mapping) else value
    if not isinstance(name, str) or not name:
        raise ValueError("spec.imagePullSecrets entries must be {name: ...} or a secret name")
    return name
