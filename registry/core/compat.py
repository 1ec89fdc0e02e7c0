"""Does a LoRA adapter fit its base model? Decided from headers alone (docs/architecture.md §7).

`check_compatibility` is a pure function of the adapter's config and tensor header, the base's
config.json and tensor signature (`registry.core.basemodel`), and an optional serving profile
(`registry.core.profiles`). It returns a `CompatReport`: a verdict, errors and warnings that each
carry a stable `code` and a one-line message saying what to do, and a row per LoRA module (base
tensor, shapes, rank, scale, orientation). It never sees tensor data, so callers only ever read
headers. The rules follow PEFT 0.21 (`check_target_module_exists`, `get_pattern_key`,
`set_peft_model_state_dict`): the checker says "compatible" exactly when PEFT would load every
tensor of the adapter onto the model built from that base, with nothing missing or ignored.

How names line up: adapter keys are `base_model.model.<M>.<part>`, where M is the module's path in
the model PEFT wrapped. For a head model (task CAUSAL_LM, SEQ_CLS...) that path carries the
architecture's `base_model_prefix` (`model.layers.3.self_attn.q_proj`, `transformer.h.0.attn`);
for a bare model (FEATURE_EXTRACTION) it does not. Base checkpoints may be saved either way, so
each checkpoint key is first mapped to the name the loaded model gives it ("serving names").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from registry.core.basemodel import BaseSignature

CHECKER_VERSION = "1"
MAX_PER_CODE = 5
PEFT_PREFIX = "base_model.model."
Severity = Literal["error", "warning"]

# transformers' base_model_prefix per model_type: the segment a head model puts before the body.
BASE_MODEL_PREFIX: dict[str, str] = {
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi",
            "phi3",
            "olmo",
            "olmo2",
            "granite",
            "stablelm",
            "starcoder2",
            "cohere",
            "deepseek_v2",
            "deepseek_v3",
            "opt",
            "smollm3",
            "exaone",
            "internlm2",
            "minicpm",
        ],
        "model",
    ),
    **dict.fromkeys(["gpt2", "gptj", "gpt_bigcode", "falcon", "bloom", "codegen"], "transformer"),
    "gpt_neox": "gpt_neox",
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "distilbert": "distilbert",
    "electra": "electra",
    "deberta-v2": "deberta",
}
# Architectures whose projections are transformers' Conv1D: weights stored (in, out).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
HEAD_TASKS = frozenset({"CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS"})
# Input embedding leaves, in the order they are looked for (tied output embeddings point here).
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
EMBEDDING_LEAVES = frozenset(
    {*INPUT_EMBEDDINGS, "wpe", "position_embeddings", "token_type_embeddings", "embed_positions"}
)
OUTPUT_LAYERS = frozenset({"lm_head", "score", "classifier", "qa_outputs"})
CONTAINERS = frozenset({"layers", "layer", "h", "blocks", "encoder", "decoder", "embeddings"})
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
# init_lora_weights values that change the base weights as well (the adapter needs that base).
MODIFIED_BASE_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class TensorLike(Protocol):
    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> Any: ...


class Finding(BaseModel):
    code: str
    severity: Severity
    message: str
    fix: str | None = None
    module: str | None = None


class ModuleRow(BaseModel):
    """One LoRA module: where it lands in the base and how it would be applied."""

    module: str
    kind: Literal["linear", "conv1d", "embedding"]
    base_tensor: str | None
    base_shape: list[int] | None
    base_dtype: str | None
    lora_a: list[int]
    lora_b: list[int]
    rank: int
    alpha: float
    scale: float
    orientation: str
    variants: list[str] = Field(default_factory=list)
    ok: bool = True


class CompatReport(BaseModel):
    compatible: bool
    base: str | None = None
    profile: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    errors: list[Finding] = Field(default_factory=list)
    warnings: list[Finding] = Field(default_factory=list)
    modules: list[ModuleRow] = Field(default_factory=list)
    replaced: list[str] = Field(default_factory=list)  # base tensors the adapter overwrites
    checker_version: str = CHECKER_VERSION

    @property
    def status(self) -> str:
        return "compatible" if self.compatible else "incompatible"

    def codes(self) -> set[str]:
        return {f.code for f in [*self.errors, *self.warnings]}


@dataclass
class LoraParts:
    """The tensors of one module, as found in the adapter file."""

    module: str
    a: tuple[str, list[int], str] | None = None  # (key, shape, dtype)
    b: tuple[str, list[int], str] | None = None
    embedding: bool = False
    bias: list[int] | None = None  # lora_B.bias
    magnitude: list[int] | None = None


@dataclass
class Analysis:
    """Everything the base rules found, for profiles to build on."""

    config: Mapping[str, Any]
    base: BaseSignature
    model_type: str | None
    prefix: str | None
    head: bool
    tied: bool
    serving: dict[str, str]  # serving tensor name -> checkpoint key
    lora: dict[str, LoraParts] = field(default_factory=dict)
    rows: list[ModuleRow] = field(default_factory=list)
    replaced: dict[str, list[int]] = field(default_factory=dict)  # serving name -> shape
    saved_modules: set[str] = field(default_factory=set)  # modules_to_save tensors in the file
    tokens: dict[str, list[int]] = field(default_factory=dict)  # trainable-token deltas
    quantized: bool = False
    findings: list[Finding] = field(default_factory=list)

    def add(
        self,
        code: str,
        severity: Severity,
        message: str,
        fix: str | None = None,
        module: str | None = None,
    ) -> None:
        text = f"{message}; {fix}" if fix else message
        self.findings.append(
            Finding(code=code, severity=severity, message=text, fix=fix, module=module)
        )

    def base_tensor(self, module: str, part: str = "weight") -> str | None:
        return self.serving.get(f"{module}.{part}")

    @property
    def vocab_rows(self) -> int | None:
        key = self.serving.get(f"{self.input_embedding}.weight") if self.input_embedding else None
        shape = self.base.tensors[key].shape if key else []
        return shape[0] if len(shape) == 2 else None

    @property
    def input_embedding(self) -> str | None:
        """Serving name of the input embedding module (e.g. model.embed_tokens)."""
        found = [
            name[: -len(".weight")]
            for name in self.serving
            if name.endswith(".weight") and name.split(".")[-2] in INPUT_EMBEDDINGS
        ]
        return min(found, key=len) if found else None


Rule = Callable[[Analysis, Mapping[str, Any]], None]


@dataclass(frozen=True)
class Profile:
    """A serving target's loading rules, as data: severity overrides plus extra rules.

    `overrides` maps a base finding's code to the severity it has for this target (None drops
    it); `rules` add findings of their own. `options` are the accepted option names with their
    defaults; values arrive already validated by `registry.core.profiles.bind`.
    """

    name: str
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)
    overrides: Mapping[str, Callable[[Mapping[str, Any]], Severity | None]] = field(
        default_factory=dict
    )
    rules: tuple[Rule, ...] = ()


# --- entry point -------------------------------------------------------------------------------


def check_compatibility(
    adapter_config: Mapping[str, Any],
    adapter_tensors: Mapping[str, TensorLike],
    base: BaseSignature,
    *,
    base_id: str | None = None,
    base_revision: str | None = None,
    claimed_base: tuple[str | None, str | None] | None = None,
    profile: Profile | None = None,
    options: Mapping[str, Any] | None = None,
) -> CompatReport:
    """Check an adapter against a base (and a serving profile); pure and header-only.

    `base_id`/`base_revision` name the base as registered (None for a local folder);
    `claimed_base` is the (id, revision) the adapter says it was trained on, by default
    `base_model_name_or_path` and `revision` from its config.
    """
    options = dict(options or {})
    analysis = analyse(adapter_config, adapter_tensors, base)
    if claimed_base is None:
        claimed_base = (
            _str_or_none(adapter_config.get("base_model_name_or_path")),
            _str_or_none(adapter_config.get("revision")),
        )
    _check_base_identity(analysis, claimed_base, base_id, base_revision)
    findings = analysis.findings
    if profile is not None:
        kept: list[Finding] = []
        for finding in findings:
            override = profile.overrides.get(finding.code)
            severity = override(options) if override else finding.severity
            if severity is not None:
                kept.append(finding.model_copy(update={"severity": severity}))
        analysis.findings = kept
        for rule in profile.rules:
            rule(analysis, options)
        findings = analysis.findings
    failing = {f.module for f in findings if f.severity == "error" and f.module}
    rows = [row.model_copy(update={"ok": row.module not in failing}) for row in analysis.rows]
    findings = _collapse(findings)
    errors = [f for f in findings if f.severity == "error"]
    label = None
    if base_id:
        label = f"{base_id}@{base_revision}" if base_revision else base_id
    return CompatReport(
        compatible=not errors,
        base=label,
        profile=profile.name if profile else None,
        options=options,
        errors=errors,
        warnings=[f for f in findings if f.severity == "warning"],
        modules=rows,
        replaced=sorted(analysis.replaced),
    )


def _collapse(findings: list[Finding], keep: int = MAX_PER_CODE) -> list[Finding]:
    """At most `keep` findings per (code, severity); the rest become one line that counts them
    (an all-linear adapter on the wrong base would otherwise repeat itself 150 times)."""
    seen: dict[tuple[str, Severity], list[Finding]] = {}
    for finding in findings:
        seen.setdefault((finding.code, finding.severity), []).append(finding)
    kept: list[Finding] = []
    for (code, severity), group in seen.items():
        kept.extend(group[:keep])
        rest = group[keep:]
        if rest:
            modules = [f.module for f in rest if f.module]
            where = f" ({', '.join(modules[:3])}{', ...' if len(modules) > 3 else ''})"
            fix = group[0].fix
            kept.append(
                Finding(
                    code=code,
                    severity=severity,
                    message=f"... and {len(rest)} more {code} finding(s)"
                    + (where if modules else "")
                    + (f"; {fix}" if fix else ""),
                    fix=fix,
                )
            )
    return kept


def analyse(
    config: Mapping[str, Any], tensors: Mapping[str, TensorLike], base: BaseSignature
) -> Analysis:
    """Run every base rule; the result feeds the verdict and the profiles."""
    findings: list[Finding] = []
    config = normalise_config(config, findings)
    model_type = _str_or_none(base.config.get("model_type"))
    prefix = _base_prefix(model_type, base)
    task = _str_or_none(config.get("task_type"))
    prefixed = prefix is not None and any(k.startswith(prefix + ".") for k in base.tensors)
    # Without a task type, the adapter's own key names tell which model PEFT wrapped.
    head = (
        task in HEAD_TASKS
        if task
        else any(k.startswith(f"{PEFT_PREFIX}{prefix}.") for k in tensors)
        if prefix
        else False
    )
    serving = _serving_names(base, prefix, head, prefixed)
    analysis = Analysis(config, base, model_type, prefix, head, False, serving, findings=findings)
    analysis.tied = _tie_output_embedding(analysis)
    analysis.quantized = isinstance(base.config.get("quantization_config"), dict)

    _check_config(analysis)
    _read_keys(analysis, tensors)
    replication = _replication_map(analysis)
    for parts in sorted(analysis.lora.values(), key=lambda p: p.module):
        _check_module(analysis, parts, replication)
    _check_tokens(analysis)
    _check_coverage(analysis, replication)
    _check_tied(analysis)
    return analysis


# --- adapter_config.json, typed ----------------------------------------------------------------

MAX_REPLICATED_LAYERS = 10_000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value)


def _pattern(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _is_number(v) and v > 0 for k, v in value.items()
    )


def _replication(value: Any) -> bool:
    return (
        isinstance(value, list)
        and all(
            isinstance(item, list)
            and len(item) == 2
            and all(_is_int(i) and i >= 0 for i in item)
            and item[0] <= item[1]
            for item in value
        )
        and sum(item[1] - item[0] for item in value) <= MAX_REPLICATED_LAYERS
    )


# Every field the rules read, with what PEFT accepts there. A value of another type is reported
# (`invalid_config`) and treated as absent, so no rule ever sees it.
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "lora_alpha": (_is_number, "a finite number"),
    "task_type": (lambda v: isinstance(v, str), "a string"),
    "target_modules": (lambda v: isinstance(v, str) or _str_list(v), "a list of names or a regex"),
    "exclude_modules": (lambda v: isinstance(v, str) or _str_list(v), "a list or a regex"),
    "modules_to_save": (_str_list, "a list of module names"),
    "layers_to_transform": (lambda v: (_is_int(v) and v >= 0) or _int_list(v), "layer indices"),
    "layers_pattern": (lambda v: isinstance(v, str) or _str_list(v), "a name or list of names"),
    "rank_pattern": (_pattern, "a map of module patterns to positive numbers"),
    "alpha_pattern": (_pattern, "a map of module patterns to positive numbers"),
    "layer_replication": (_replication, f"[[start, end], ...] (at most {MAX_REPLICATED_LAYERS})"),
    "trainable_token_indices": (
        lambda v: (
            _int_list(v)
            or (
                isinstance(v, dict)
                and all(isinstance(k, str) and _int_list(i) for k, i in v.items())
            )
        ),
        "a list of token ids, or a map of module names to lists",
    ),
    "bias": (lambda v: v in ("none", "all", "lora_only"), '"none", "all" or "lora_only"'),
    "init_lora_weights": (lambda v: isinstance(v, bool | str), "true, false or a method name"),
    **{
        key: (lambda v: isinstance(v, bool), "true or false")
        for key in ("use_dora", "use_rslora", "lora_bias", "use_qalora", "fan_in_fan_out")
    },
}


def normalise_config(config: Mapping[str, Any], findings: list[Finding]) -> dict[str, Any]:
    """adapter_config.json with every field the rules read checked against what PEFT accepts;
    bad values become `invalid_config` findings and are dropped."""
    clean = dict(config)
    for key, (valid, expected) in _FIELDS.items():
        value = clean.get(key)
        if value is None or valid(value):
            continue
        del clean[key]
        findings.append(
            Finding(
                code="invalid_config",
                severity="error",
                message=f"adapter_config.json: {key} must be {expected}, got {value!r:.80}; "
                "fix adapter_config.json (PEFT would refuse it)",
                fix="fix adapter_config.json (PEFT would refuse it)",
            )
        )
    return clean


# --- base model layout -------------------------------------------------------------------------


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _base_prefix(model_type: str | None, base: BaseSignature) -> str | None:
    if model_type in BASE_MODEL_PREFIX:
        return BASE_MODEL_PREFIX[model_type]
    # Unknown architecture: a first segment shared by most tensors is the body's prefix.
    firsts: dict[str, int] = {}
    for key in base.tensors:
        first = key.split(".", 1)[0]
        firsts[first] = firsts.get(first, 0) + 1
    if firsts:
        first, count = max(firsts.items(), key=lambda item: item[1])
        second = next(k for k in base.tensors if k.split(".", 1)[0] == first).split(".")[1:2]
        # A body prefix wraps the model ("model.layers.0"); a container of numbered layers
        # ("layers.0", "h.0") or of embeddings is already the body of a bare checkpoint.
        if (
            count > len(base.tensors) // 2
            and first not in OUTPUT_LAYERS | CONTAINERS
            and second
            and not second[0].isdigit()
        ):
            return first
    return None


def _serving_names(
    base: BaseSignature, prefix: str | None, head: bool, prefixed: bool
) -> dict[str, str]:
    """Checkpoint key -> the name the loaded model gives the tensor (transformers adds or strips
    the base_model_prefix when a bare checkpoint meets a head model, and the other way round)."""
    names: dict[str, str] = {}
    for key in base.tensors:
        if prefix is None:
            names[key] = key
        elif head:
            names[key if prefixed else f"{prefix}.{key}"] = key
        elif key.startswith(prefix + "."):
            names[key[len(prefix) + 1 :]] = key
        elif not prefixed:
            names[key] = key
        # else: a head tensor (lm_head...) that a bare model does not have
    return names


def _tie_output_embedding(analysis: Analysis) -> bool:
    """Whether lm_head shares the input embedding; if so, map lm_head.weight onto it."""
    config = analysis.base.config
    explicit = config.get("tie_word_embeddings")
    architectures = config.get("architectures")
    architectures = architectures if isinstance(architectures, list) else []
    lm_model = any(
        isinstance(a, str) and (a.endswith("ForCausalLM") or a.endswith("LMHeadModel"))
        for a in architectures
    )
    has_head = "lm_head.weight" in analysis.serving
    tied = bool(explicit) if isinstance(explicit, bool) else (lm_model and not has_head)
    embedding = analysis.input_embedding
    if tied and analysis.head and not has_head and embedding:
        analysis.serving["lm_head.weight"] = analysis.serving[f"{embedding}.weight"]
    return tied and analysis.head


# --- config rules ------------------------------------------------------------------------------


def _check_config(a: Analysis) -> None:
    config = a.config
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(MODIFIED_BASE_INITS):
        a.add(
            "modified_base_init",
            "error",
            f"init_lora_weights={init!r} trains against a base whose weights the init changed "
            "(a residual base), so it does not fit the original base",
            fix="convert it to a plain LoRA adapter with PEFT's save_pretrained("
            "path_initial_model_for_weight_conversion=...) and push that",
        )
    if config.get("alora_invocation_tokens"):
        a.add(
            "alora",
            "warning",
            "activated LoRA (alora_invocation_tokens) applies only after its invocation tokens; "
            "it cannot be merged and few serving engines support it",
            fix="serve it unmerged with PEFT",
        )
    if config.get("layer_replication"):
        a.add(
            "layer_replication",
            "warning",
            "layer_replication builds extra layers from copies of the base's layers at load time; "
            "it cannot be merged into the base",
            fix="serve it unmerged with PEFT",
        )
    if config.get("target_parameters"):
        a.add(
            "target_parameters_unsupported",
            "error",
            f"target_parameters {config['target_parameters']!r} (LoRA on MoE expert parameters) "
            "is not supported by the registry's checker and merge",
            fix="train with target_modules instead",
        )
    quantization = a.base.config.get("quantization_config")
    if isinstance(quantization, dict) or config.get("use_qalora"):
        method = (
            quantization.get("quant_method", "unknown")
            if isinstance(quantization, dict)
            else "qalora"
        )
        a.add(
            "quantized_base",
            "warning",
            f"the base is quantized ({method}): LoRA loads on it, but its packed weights do not "
            "show the layers' shapes (not checked), and merging into them loses precision",
            fix="merge into the original bf16/fp16 base instead",
        )
    for key in ("rank_pattern", "alpha_pattern", "target_modules", "exclude_modules"):
        value = config.get(key)
        patterns = (
            list(value) if isinstance(value, dict) else [value] if isinstance(value, str) else []
        )
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                a.add(
                    "invalid_pattern",
                    "error",
                    f"{key} {pattern!r} is not a valid regular expression ({exc})",
                    fix="fix adapter_config.json",
                )
    # Combinations LoraConfig itself refuses when PEFT loads the adapter.
    refused = []
    if config.get("lora_bias") and config.get("use_dora"):
        refused.append("lora_bias together with use_dora")
    if config.get("lora_bias") and not isinstance(config.get("init_lora_weights", True), bool):
        refused.append(f"lora_bias with init_lora_weights={config['init_lora_weights']!r}")
    layered = config.get("layers_to_transform") not in (None, []) or config.get("layers_pattern")
    if layered and isinstance(config.get("target_modules"), str):
        refused.append("layers_to_transform / layers_pattern with a regex target_modules")
    if config.get("layers_pattern") and config.get("layers_to_transform") in (None, []):
        refused.append("layers_pattern without layers_to_transform")
    for what in refused:
        a.add(
            "invalid_config",
            "error",
            f"adapter_config.json combines {what}, which PEFT refuses",
            fix="fix adapter_config.json",
        )


def _check_base_identity(
    a: Analysis,
    claimed: tuple[str | None, str | None],
    base_id: str | None,
    base_revision: str | None,
) -> None:
    claimed_id, claimed_revision = claimed
    if base_id and claimed_id and not _looks_local(claimed_id) and claimed_id != base_id:
        a.add(
            "base_id_mismatch",
            "warning",
            f"the adapter was trained on {claimed_id}, not {base_id}",
            fix=f"check against {claimed_id}, or push with --base {base_id} if it is the same "
            "model",
        )
    if base_revision and claimed_revision and claimed_revision != base_revision:
        a.add(
            "base_revision_mismatch",
            "warning",
            f"the adapter names base revision {claimed_revision}, the base is {base_revision}",
            fix=f"register {claimed_id or 'the base'}@{claimed_revision} and check against it",
        )
    elif base_id and not claimed_revision:
        a.add(
            "base_revision_unpinned",
            "warning",
            "the adapter does not record which base revision it was trained on",
            fix="push with --base ID@REVISION",
        )


def _looks_local(model_id: str) -> bool:
    return model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1


# --- tensors -----------------------------------------------------------------------------------

_PARTS = (
    ("a", re.compile(r"(.+)\.lora_A\.weight")),
    ("b", re.compile(r"(.+)\.lora_B\.weight")),
    ("bias", re.compile(r"(.+)\.lora_B\.bias")),
    ("emb_a", re.compile(r"(.+)\.lora_embedding_A")),
    ("emb_b", re.compile(r"(.+)\.lora_embedding_B")),
    ("magnitude", re.compile(r"(.+)\.lora_magnitude_vector(?:\.weight)?")),
    ("base_layer", re.compile(r"(.+)\.base_layer\.(weight|bias)")),
    ("tokens", re.compile(r"(.+)\.token_adapter\.trainable_tokens_delta")),
)
_NAMED_ADAPTER = re.compile(r".+\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.[^.]+(\..+)?")


def _read_keys(a: Analysis, tensors: Mapping[str, TensorLike]) -> None:
    modules_to_save = [m for m in a.config.get("modules_to_save") or [] if isinstance(m, str)]
    unrecognised: list[tuple[str, str]] = []
    whole: list[tuple[str, str, list[int]]] = []
    for key in sorted(tensors):
        info = tensors[key]
        shape, dtype = [int(d) for d in info.shape], info.dtype
        if not key.startswith(PEFT_PREFIX):
            unrecognised.append((key, f"keys must start with {PEFT_PREFIX!r} (PEFT's layout)"))
            continue
        rest = key[len(PEFT_PREFIX) :]
        kind, module = _classify(rest)
        if kind in ("a", "b", "emb_a", "emb_b", "bias", "magnitude"):
            parts = a.lora.setdefault(module, LoraParts(module))
            if kind in ("emb_a", "emb_b"):
                parts.embedding = True
            if kind in ("a", "emb_a"):
                parts.a = (key, shape, dtype)
            elif kind in ("b", "emb_b"):
                parts.b = (key, shape, dtype)
            elif kind == "bias":
                parts.bias = shape
            else:
                parts.magnitude = shape
        elif kind == "base_layer" or _is_saved_module(rest, modules_to_save):
            name = rest.replace(".base_layer.", ".")
            a.replaced[name] = shape
            if kind != "base_layer":
                a.saved_modules.add(name)
        elif kind == "tokens":
            a.tokens[module] = shape
        elif rest in a.serving:
            whole.append((key, rest, shape))
        else:
            unrecognised.append((key, _unrecognised_hint(rest)))
    # PEFT loads every other key naming a model parameter (load_state_dict(strict=False)):
    # bias="all", whole embeddings (save_embedding_layers), any base tensor. Except on a module
    # it wrapped with LoRA, whose own weight has become base_layer.weight.
    for key, rest, shape in whole:
        if rest.rpartition(".")[0] in a.lora:
            unrecognised.append((key, "a LoRA module's own weight is saved as base_layer.weight"))
        else:
            a.replaced[rest] = shape
    for key, hint in unrecognised:
        a.add(
            "unrecognised_key",
            "error",
            f"tensor {key} is not part of a PEFT LoRA adapter; PEFT would ignore it ({hint})",
            fix="re-save the adapter with PEFT's save_pretrained",
        )
    for parts in a.lora.values():
        for half in (parts.a, parts.b):
            if half and half[2] not in FLOAT_DTYPES:
                a.add(
                    "invalid_dtype",
                    "error",
                    f"{half[0]} is {half[2]}; LoRA weights must be floating point "
                    f"({', '.join(sorted(FLOAT_DTYPES))})",
                    fix="re-save the adapter from a float model",
                    module=parts.module,
                )


def _classify(rest: str) -> tuple[str | None, str]:
    for kind, pattern in _PARTS:
        match = pattern.fullmatch(rest)
        if match:
            return kind, match.group(1)
    return None, rest


def _is_saved_module(rest: str, modules_to_save: list[str]) -> bool:
    module = rest.rsplit(".", 1)[0]
    return any(module == m or module.endswith("." + m) for m in modules_to_save)


def _unrecognised_hint(rest: str) -> str:
    if "lora_down" in rest or "lora_up" in rest or rest.endswith(".alpha"):
        return "kohya-style lora_down/lora_up naming: convert it to PEFT's lora_A/lora_B layout"
    if _NAMED_ADAPTER.fullmatch(rest):
        return "the adapter name is still in the key, e.g. lora_A.default.weight"
    if rest.endswith(".bias") or rest.endswith(".weight"):
        return "a full tensor that neither modules_to_save nor bias in adapter_config.json names"
    return "unknown tensor kind"


def _resolve_pattern(pattern: Any, module: str, default: float) -> tuple[float, str | None]:
    """PEFT's get_pattern_key: the first key K such that the module ends with `.K` (regex)."""
    if isinstance(pattern, dict):
        for key, value in pattern.items():
            try:
                if re.match(rf"(.*\.)?({key})$", module) and isinstance(value, int | float):
                    return float(value), key
            except re.error:
                continue
    return default, None


def _replication_map(a: Analysis) -> Callable[[str], str]:
    """Map a module of the replicated model (layer_replication) to the base layer it copies."""
    spec = a.config.get("layer_replication")
    if not isinstance(spec, list) or not spec:
        return lambda name: name
    order: list[int] = []
    for item in spec:
        if isinstance(item, list) and len(item) == 2 and all(isinstance(i, int) for i in item):
            order.extend(range(item[0], item[1]))
    layer = re.compile(r"(.*?\.(?:layers|h|layer|blocks)\.)(\d+)(\..*|$)")

    def original(name: str) -> str:
        match = layer.fullmatch(name)
        if not match or int(match.group(2)) >= len(order):
            return name
        return f"{match.group(1)}{order[int(match.group(2))]}{match.group(3)}"

    return original


def _locate(a: Analysis, module: str) -> tuple[str | None, list[str]]:
    """The serving name whose weight backs `module`, or None and the checkpoint keys tried."""
    if f"{module}.weight" in a.serving or f"{module}.qweight" in a.serving:
        return module, []
    tried = [f"{module}.weight"]
    if "." in module:
        tried.append(module.split(".", 1)[1] + ".weight")
    if a.prefix:
        tried.append(f"{a.prefix}.{module}.weight")
    return None, tried


def _not_found(a: Analysis, module: str, tried: list[str], what: str) -> None:
    """Explain why `module` has no base tensor: a prefix mix-up, or a module the base lacks."""
    if a.prefix and f"{a.prefix}.{module}.weight" in a.serving:
        a.add(
            "bare_model_prefix",
            "error",
            f"{what} {module} lacks the {a.prefix!r} segment: the adapter was saved from the bare "
            f"model, so PEFT finds none of its modules in the {a.config.get('task_type')} model "
            f"({a.prefix}.{module})",
            fix=f"rename keys base_model.model.X to base_model.model.{a.prefix}.X, or re-save "
            "the adapter from the model with the head",
            module=module,
        )
    elif "." in module and f"{module.split('.', 1)[1]}.weight" in a.serving:
        a.add(
            "module_prefix_mismatch",
            "error",
            f"{what} {module} carries a {module.split('.', 1)[0]!r} prefix that the "
            f"{a.config.get('task_type') or 'bare'} model does not have",
            fix="set task_type in adapter_config.json to the task it was trained for "
            "(e.g. CAUSAL_LM), or rename the keys",
            module=module,
        )
    else:
        a.add(
            "module_not_found",
            "error",
            f"{what} {module} is not in the base (tried {', '.join(tried)})",
            fix="check that the adapter was trained on this base architecture",
            module=module,
        )


def _check_module(a: Analysis, parts: LoraParts, replication: Callable[[str], str]) -> None:
    module = parts.module
    if parts.a is None or parts.b is None:
        have, missing = (parts.a or parts.b), ("B" if parts.a else "A")
        name = have[0] if have else module
        a.add(
            "incomplete_pair",
            "error",
            f"{name} has no matching lora_{missing} tensor",
            fix="the adapter file is incomplete: save it again with PEFT",
            module=module,
        )
        return
    (_, shape_a, _), (_, shape_b, _) = parts.a, parts.b
    config = a.config
    r_value, alpha_value = config.get("r"), config.get("lora_alpha")
    r_default = float(r_value) if isinstance(r_value, int) else 8.0
    alpha_default = float(alpha_value) if isinstance(alpha_value, int | float) else 8.0
    r_config, r_key = _resolve_pattern(config.get("rank_pattern"), module, r_default)
    alpha, _ = _resolve_pattern(config.get("alpha_pattern"), module, alpha_default)
    rank = shape_a[0] if shape_a else 0
    rslora = bool(config.get("use_rslora"))
    scale = alpha / math.sqrt(rank) if rslora and rank else (alpha / rank if rank else 0.0)
    variants = [v for v, on in (("rslora", rslora), ("dora", bool(config.get("use_dora")))) if on]
    if parts.bias is not None:
        variants.append("lora_bias")

    located, tried = _locate(a, replication(module))
    base_key = (
        a.serving.get(f"{located}.weight") or a.serving.get(f"{located}.qweight")
        if located
        else None
    )
    base = a.base.tensors[base_key] if base_key else None
    leaf = module.rsplit(".", 1)[-1]
    if parts.embedding:
        kind: Literal["linear", "conv1d", "embedding"] = "embedding"
    elif a.model_type in CONV1D_MODEL_TYPES and leaf not in OUTPUT_LAYERS:
        kind = "conv1d"
    else:
        kind = "linear"
    orientation = {
        "linear": "W (out, in) + s * B @ A",
        "conv1d": "W (in, out) + s * (B @ A)^T  [Conv1D, fan_in_fan_out]",
        "embedding": "W (vocab, dim) + s * (B @ A)^T",
    }[kind]
    row = ModuleRow(
        module=module,
        kind=kind,
        base_tensor=base_key,
        base_shape=base.shape if base else None,
        base_dtype=base.dtype if base else None,
        lora_a=shape_a,
        lora_b=shape_b,
        rank=rank,
        alpha=alpha,
        scale=scale,
        orientation=orientation,
        variants=variants,
    )
    a.rows.append(row)

    if len(shape_a) != 2 or len(shape_b) != 2:
        a.add(
            "shape_mismatch",
            "error",
            f"{module}: lora_A {shape_a} / lora_B {shape_b} are not matrices",
            fix="only Linear, Conv1D and Embedding LoRA layers are supported",
            module=module,
        )
        return
    if shape_b[1] != rank:
        a.add(
            "rank_mismatch",
            "error",
            f"{module}: lora_A has rank {rank} {shape_a} but lora_B has rank {shape_b[1]} "
            f"{shape_b}",
            fix="the adapter file is inconsistent: save it again with PEFT",
            module=module,
        )
        return
    if rank != r_config:
        source = f"rank_pattern[{r_key!r}]" if r_key else "r"
        a.add(
            "rank_mismatch",
            "error",
            f"{module}: adapter_config.json gives rank {r_config:g} ({source}) but the tensors "
            f"have rank {rank}; PEFT would refuse the size mismatch",
            fix="fix r / rank_pattern in adapter_config.json to match the weights",
            module=module,
        )
    if base is None:
        _not_found(a, module, tried, "module")
        return
    if a.quantized:
        return  # packed weights: their stored shapes are not the layer's (quantized_base)
    w = base.shape
    if len(w) != 2:
        a.add(
            "shape_mismatch",
            "error",
            f"{module}: base tensor {base_key} has shape {w}; LoRA here needs a 2-D weight",
            fix="target Linear, Conv1D or Embedding layers only",
            module=module,
        )
        return
    if kind == "embedding":
        want_a, want_b = [rank, w[0]], [w[1], rank]
        vocab = a.replaced.get(f"{module}.weight")
        if vocab is not None and len(vocab) == 2:
            want_a[1] = vocab[0]
    elif kind == "conv1d":
        want_a, want_b = [rank, w[0]], [w[1], rank]
    else:
        want_a, want_b = [rank, w[1]], [w[0], rank]
    if shape_a != want_a or shape_b != want_b:
        transposed = (
            kind != "embedding"
            and shape_a == [rank, want_b[0]]
            and shape_b
            == [
                want_a[1],
                rank,
            ]
        )
        if kind == "embedding" and shape_b == want_b and shape_a[1] != want_a[1]:
            a.add(
                "vocab_size_mismatch",
                "error",
                f"{module}: lora_embedding_A covers {shape_a[1]} tokens, the base embedding "
                f"{base_key} has {w[0]}",
                fix="the vocabulary was resized: register the resized base, or push the adapter "
                "with its full embedding (PEFT save_embedding_layers=True)",
                module=module,
            )
        else:
            a.add(
                "shape_mismatch",
                "error",
                f"{module}: lora_A {shape_a} / lora_B {shape_b} do not fit base {base_key} {w} "
                f"(expected lora_A {want_a}, lora_B {want_b})"
                + (" - they fit the transposed weight" if transposed else ""),
                fix="the adapter was trained on a base of another size or architecture",
                module=module,
            )
        return
    out_features = want_b[0]
    if config.get("use_dora"):
        want_m = [w[1]] if kind == "embedding" else [out_features]
        if parts.magnitude is None:
            a.add(
                "missing_dora_magnitude",
                "error",
                f"{module}: use_dora is set but the file has no lora_magnitude_vector for it",
                fix="save the adapter again with PEFT",
                module=module,
            )
        elif parts.magnitude != want_m:
            a.add(
                "shape_mismatch",
                "error",
                f"{module}: DoRA magnitude {parts.magnitude} does not fit base {w} "
                f"(expected {want_m})",
                fix="the adapter was trained on a base of another size or architecture",
                module=module,
            )
    elif parts.magnitude is not None:
        a.add(
            "unrecognised_key",
            "error",
            f"{module}: lora_magnitude_vector without use_dora; PEFT would ignore it",
            fix="set use_dora: true in adapter_config.json, or drop the tensor",
            module=module,
        )
    if parts.bias is not None:
        if parts.bias != [out_features]:
            a.add(
                "shape_mismatch",
                "error",
                f"{module}: lora_B.bias {parts.bias} does not fit {out_features} outputs",
                fix="the adapter was trained on a base of another size or architecture",
                module=module,
            )
        if not config.get("lora_bias"):
            a.add(
                "unrecognised_key",
                "error",
                f"{module}: lora_B.bias without lora_bias in the config; PEFT would ignore it",
                fix="set lora_bias: true in adapter_config.json, or drop the tensor",
                module=module,
            )
        elif a.base_tensor(located or module, "bias") is None:
            a.add(
                "lora_bias_without_base_bias",
                "warning",
                f"{module}: lora_bias on a layer whose base has no bias; PEFT loads it, but the "
                "merge adds the bias to a layer that has none",
                fix="serve it unmerged, or retrain without lora_bias",
                module=module,
            )


def _check_tokens(a: Analysis) -> None:
    indices_config = a.config.get("trainable_token_indices")
    for module, shape in sorted(a.tokens.items()):
        located, tried = _locate(a, module)
        if located is None:
            _not_found(a, module, tried, "trainable-token module")
            continue
        weight = a.base.tensors[a.serving[f"{located}.weight"]].shape
        if len(weight) != 2:
            a.add(
                "shape_mismatch",
                "error",
                f"{module}: trainable tokens need an embedding, the base weight is {weight}",
                fix="set trainable_token_indices for the embedding layer",
                module=module,
            )
            continue
        indices: Any = indices_config
        if isinstance(indices_config, dict):
            leaf = module.rsplit(".", 1)[-1]
            indices = indices_config.get(leaf, indices_config.get(module))
        count = len(indices) if isinstance(indices, list) else None
        if len(shape) != 2 or shape[1] != weight[1] or (count is not None and shape[0] != count):
            a.add(
                "shape_mismatch",
                "error",
                f"{module}: trainable_tokens_delta {shape} does not fit {count} token(s) of an "
                f"embedding of width {weight[1]}",
                fix="the adapter was trained on a base of another size or architecture",
                module=module,
            )
        if isinstance(indices, list) and any(
            not isinstance(i, int) or i < 0 or i >= weight[0] for i in indices
        ):
            a.add(
                "vocab_size_mismatch",
                "error",
                f"{module}: trainable_token_indices go past the base vocabulary of {weight[0]}",
                fix="resize the base's vocabulary first, or check the indices",
                module=module,
            )


def _check_coverage(a: Analysis, replication: Callable[[str], str]) -> None:
    """Replaced tensors must fit; config targets and file tensors must name the same modules."""
    for name, shape in sorted(a.replaced.items()):
        module, _, part = name.rpartition(".")
        located, tried = _locate(a, replication(module))
        key = a.serving.get(f"{located}.{part}") if located else None
        if key is None:
            if located is not None:
                _missing_base_part(a, name, module, part)
            elif name in a.saved_modules and module.rsplit(".", 1)[-1] in OUTPUT_LAYERS:
                a.add(
                    "new_head",
                    "warning",
                    f"{name} {shape} is a head trained with the adapter (modules_to_save) that "
                    "the base checkpoint does not have; the task model creates it and PEFT "
                    "loads it",
                    fix=f"load the base with the head for task {a.config.get('task_type')}"
                    + (f" and num_labels={shape[0]}" if shape else ""),
                    module=module,
                )
            else:
                _not_found(a, module, tried, "replaced module")
            continue
        base_shape = a.base.tensors[key].shape
        if shape == base_shape:
            continue
        if (
            len(shape) == 2 == len(base_shape)
            and shape[1] == base_shape[1]
            and (module.rsplit(".", 1)[-1] in INPUT_EMBEDDINGS or module.endswith("lm_head"))
        ):
            a.add(
                "resized_vocabulary",
                "error",
                f"{name} has {shape[0]} rows, the base {key} has {base_shape[0]}: the vocabulary "
                "was resized for this adapter",
                fix=f"call model.resize_token_embeddings({shape[0]}) on the base before loading, "
                "or merge it (the merge resizes)",
                module=module,
            )
        else:
            a.add(
                "shape_mismatch",
                "error",
                f"{name} has shape {shape}, the base {key} has {base_shape}",
                fix="the adapter was trained on a base of another size",
                module=module,
            )

    if a.config.get("layer_replication"):
        return  # the replicated model has modules the base signature cannot list
    _check_saved_modules(a)
    _check_targets(a)


def _check_saved_modules(a: Analysis) -> None:
    """modules_to_save and trainable tokens the config names must be in the file: PEFT raises
    KeyError for a missing one."""
    saved_modules = {name.rpartition(".")[0] for name in a.saved_modules}
    for entry in a.config.get("modules_to_save") or []:
        in_base = [
            m for m, wrappable in _all_modules(a).items() if wrappable and _ends_with(m, entry)
        ]
        if in_base and not any(_ends_with(m, entry) for m in saved_modules):
            a.add(
                "missing_lora_tensors",
                "error",
                f"modules_to_save names {entry!r} ({in_base[0]}) but the file has no tensors for "
                "it; PEFT would fail to load it",
                fix="the file is incomplete: save the adapter again",
                module=in_base[0],
            )
    if a.config.get("trainable_token_indices") and not a.tokens:
        a.add(
            "missing_lora_tensors",
            "error",
            "trainable_token_indices is set but the file has no trainable_tokens_delta; PEFT "
            "would fail to load it",
            fix="the file is incomplete: save the adapter again",
        )


def _check_targets(a: Analysis) -> None:
    """Config targets and file tensors must name the same modules, all of them LoRA-able."""
    target = a.config.get("target_modules")
    if target is None:
        return
    modules = _all_modules(a)
    all_linear = isinstance(target, str) and target.lower() == "all-linear"
    try:
        selected = {m for m in modules if _peft_selects(a.config, m, all_linear)}
    except re.error:
        return  # reported as invalid_pattern
    if all_linear:
        selected = {
            m
            for m in selected
            if modules[m] and m.rsplit(".", 1)[-1] not in EMBEDDING_LEAVES | OUTPUT_LAYERS
        }
    unsupported = sorted(m for m in selected if not modules[m])
    if unsupported:
        a.add(
            "unsupported_target",
            "error",
            f"target_modules selects {len(unsupported)} module(s) without a 2-D weight, e.g. "
            f"{', '.join(unsupported[:3])}; PEFT refuses to put LoRA on them",
            fix="target Linear, Conv1D or Embedding layers only (e.g. q_proj, v_proj)",
            module=unsupported[0],
        )
    targeted = selected - set(unsupported)
    found = {module for module in a.lora if _locate(a, module)[0] is not None}
    missing = sorted(targeted - found)
    if missing:
        a.add(
            "missing_lora_tensors",
            "error",
            f"target_modules selects {len(missing)} module(s) of the base that have no tensors "
            f"in the file, e.g. {', '.join(missing[:3])}; PEFT would leave them untrained",
            fix="the file is incomplete or target_modules was edited: save the adapter again",
            module=missing[0],
        )
    for module in sorted(found - targeted):
        a.add(
            "untargeted_module",
            "error",
            f"{module} has LoRA tensors but target_modules does not select it; PEFT would "
            "ignore its weights",
            fix="fix target_modules in adapter_config.json",
            module=module,
        )
    if a.lora and not found:
        a.add(
            "no_modules_matched",
            "error",
            f"none of the adapter's {len(a.lora)} LoRA modules matches a module of the base: "
            "loaded, it would silently serve the base model unchanged",
            fix="check the base model and the key names (see the module errors)",
        )
    if isinstance(target, list):
        for entry in target:
            if not any(_ends_with(m, entry) for m in modules):
                a.add(
                    "target_module_unmatched",
                    "warning",
                    f"target_modules entry {entry!r} matches no module of the base",
                    fix="remove it, or check that this is the base the adapter was trained on",
                )


def _ends_with(module: str, name: str) -> bool:
    return module == name or module.endswith("." + name)


def _missing_base_part(a: Analysis, name: str, module: str, part: str) -> None:
    a.add(
        "module_not_found",
        "error",
        f"{name} replaces {module}.{part}, which the base does not have",
        fix="check that the adapter was trained on this base",
        module=module,
    )


def _all_modules(a: Analysis) -> dict[str, bool]:
    """Every module path of the loaded model (containers too) -> whether PEFT can give it a LoRA
    layer (it has a 2-D weight: Linear, Conv1D, Embedding)."""
    modules: dict[str, bool] = {}
    for serving_name, key in a.serving.items():
        parts = serving_name.split(".")
        for end in range(1, len(parts)):
            modules.setdefault(".".join(parts[:end]), False)
        if parts[-1] in ("weight", "qweight") and len(a.base.tensors[key].shape) == 2:
            modules[".".join(parts[:-1])] = True
    return modules


def _peft_selects(config: Mapping[str, Any], name: str, all_linear: bool) -> bool:
    """PEFT 0.21's check_target_module_exists for one module name (all-linear: every module,
    narrowed to linear layers by the caller)."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str):
        if re.fullmatch(exclude, name):
            return False
    elif exclude and any(_ends_with(name, e) for e in exclude):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.get("modules_to_save") or []):
        return False
    target = config["target_modules"]
    if isinstance(target, str):
        return all_linear or re.fullmatch(target, name) is not None
    if name in target:
        return True  # exact names skip the layer filter
    hit = any(name.endswith("." + t) for t in target)
    layers = config.get("layers_to_transform")
    if hit and layers not in (None, []):
        hit = _layer_selected(name, layers, config.get("layers_pattern"))
    return hit


def _layer_selected(name: str, layers: Any, pattern: Any) -> bool:
    if pattern:
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        match = None
        for p in patterns:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if match:
                break
    else:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    if not match:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _check_tied(a: Analysis) -> None:
    if not a.tied:
        return
    embedding = a.input_embedding
    touched = (
        {p.module for p in a.lora.values()}
        | {name.rpartition(".")[0] for name in a.replaced}
        | set(a.tokens)
    )
    hits = sorted(m for m in touched if m == "lm_head" or m == embedding)
    if hits:
        a.add(
            "tied_embeddings",
            "warning",
            f"the base ties lm_head to {embedding}, and the adapter changes {', '.join(hits)}: "
            "merged, the change lands in both",
            fix="merge with --untie to write a separate lm_head",
            module=hits[0],
        )
