"""What a merge does to each base tensor, decided from headers before any weight is read.

`plan_merge` runs the compatibility checker with the `merge` profile (an incompatible adapter is
refused with its report) and turns the checker's analysis into one `TensorPlan` per output
tensor: pass through, or replace / add a LoRA delta / add a LoRA bias / overwrite token rows, in
the order PEFT's `merge_and_unload` applies them (docs/peft-format.md §3). The plan also says which
config.json fields change (untie, resized vocabulary, dtype).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from registry.core.basemodel import BaseSignature, BaseTensor
from registry.core.compat import PEFT_PREFIX, CompatReport, analyse, check_compatibility
from registry.core.errors import Incompatible
from registry.core.profiles import bind

FLOAT_DTYPES = ("BF16", "F16", "F32")
DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class LoraDelta:
    """W' = W + scale·B·A in the layer's orientation (DoRA rescales rows by m / ‖W + ΔW‖)."""

    a: str  # adapter keys
    b: str
    scale: float
    kind: Literal["linear", "conv1d", "embedding"]
    magnitude: str | None = None  # DoRA


@dataclass
class TensorPlan:
    key: str  # output checkpoint key
    shard: str  # output shard file
    dtype: str  # output safetensors dtype
    shape: list[int]
    source: str | None  # base checkpoint key read as the starting value (None: new tensor)
    source_dtype: str | None = None
    replace: str | None = None  # adapter key whose value replaces the base value
    lora: LoraDelta | None = None
    bias: tuple[str, float] | None = None  # lora_B.bias key and scale, added to this bias
    tokens: tuple[str, list[int]] | None = None  # trainable_tokens_delta key, row indices

    @property
    def changed(self) -> bool:
        return bool(self.replace or self.lora or self.bias or self.tokens)

    @property
    def nbytes(self) -> int:
        size = DTYPE_SIZES[self.dtype]
        for dim in self.shape:
            size *= dim
        return size


DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass
class MergePlan:
    report: CompatReport
    shards: dict[str, list[TensorPlan]]  # shard file -> its tensors, in file order
    config_changes: dict[str, Any] = field(default_factory=dict)

    @property
    def tensors(self) -> list[TensorPlan]:
        return [t for plans in self.shards.values() for t in plans]


def plan_merge(
    adapter_config: Mapping[str, Any],
    adapter_tensors: Mapping[str, Any],
    base: BaseSignature,
    base_order: Mapping[str, list[str]],
    *,
    dtype: str | None = None,
    untie: bool = False,
    base_id: str | None = None,
    base_revision: str | None = None,
) -> MergePlan:
    """The plan for merging an adapter (config + tensor header) into a base.

    `base_order` lists each shard's tensors in file order (the output keeps that layout).
    Raises `Incompatible` with the report when the merge profile refuses the adapter.
    """
    base_order = {shard: list(keys) for shard, keys in base_order.items()}
    profile, options = bind("merge", {"untie": untie})
    report = check_compatibility(
        adapter_config,
        adapter_tensors,
        base,
        base_id=base_id,
        base_revision=base_revision,
        profile=profile,
        options=options,
    )
    if not report.compatible:
        first = report.errors[0]
        raise Incompatible(
            f"cannot merge: {first.message}"
            + (f" (and {len(report.errors) - 1} more error(s))" if len(report.errors) > 1 else ""),
            report=report.model_dump(mode="json"),
        )
    a = analyse(adapter_config, adapter_tensors, base)
    out_dtype = DTYPE_NAMES[dtype] if dtype else None

    def output_dtype(tensor: BaseTensor) -> str:
        return out_dtype if out_dtype and tensor.dtype in FLOAT_DTYPES else tensor.dtype

    plans: dict[str, TensorPlan] = {}
    for shard, keys in base_order.items():
        for key in keys:
            tensor = base.tensors[key]
            plans[key] = TensorPlan(
                key=key,
                shard=shard,
                dtype=output_dtype(tensor),
                shape=list(tensor.shape),
                source=key,
                source_dtype=tensor.dtype,
            )
    config_changes: dict[str, Any] = {}
    embedding = a.input_embedding
    embedding_key = a.serving.get(f"{embedding}.weight") if embedding else None
    untied_head: TensorPlan | None = None
    if untie and a.tied and embedding_key and "lm_head.weight" not in base.tensors:
        touched = {f"{row.module}.weight" for row in a.rows} | set(a.replaced)
        touched |= {f"{module}.weight" for module in a.tokens}
        if touched & {"lm_head.weight", f"{embedding}.weight"}:
            source = plans[embedding_key]
            untied_head = TensorPlan(
                key="lm_head.weight",
                shard=source.shard,
                dtype=source.dtype,
                shape=list(source.shape),
                source=embedding_key,
                source_dtype=source.source_dtype,
            )
            base_order[source.shard].append("lm_head.weight")
            config_changes["tie_word_embeddings"] = False

    def plan_for(serving: str) -> TensorPlan | None:
        if serving == "lm_head.weight" and untied_head is not None:
            return untied_head
        key = a.serving.get(serving)
        return plans.get(key) if key else None

    adapter_keys = set(adapter_tensors)
    for name, shape in sorted(a.replaced.items()):
        module, _, part = name.rpartition(".")
        adapter_key = next(
            k
            for k in (f"{PEFT_PREFIX}{module}.base_layer.{part}", f"{PEFT_PREFIX}{name}")
            if k in adapter_keys
        )
        plan = plan_for(name)
        if plan is None:  # a head the base lacks (new_head): the merged model gets it
            last = list(base_order)[-1]
            dtype_of = adapter_tensors[adapter_key].dtype
            plan = TensorPlan(
                key=name,
                shard=last,
                dtype=out_dtype if out_dtype and dtype_of in FLOAT_DTYPES else dtype_of,
                shape=list(shape),
                source=None,
            )
            plans[name] = plan
            base_order[last].append(name)
        plan.replace = adapter_key
        if plan.shape != list(shape):  # resized vocabulary: the saved embedding sets the size
            plan.shape = list(shape)
            if module == embedding or module.endswith("lm_head"):
                config_changes["vocab_size"] = shape[0]
    for row in a.rows:
        plan = plan_for(f"{row.module}.weight")
        assert plan is not None, row.module  # the checker proved every module has a base tensor
        parts = a.lora[row.module]
        assert parts.a is not None and parts.b is not None
        magnitude = None
        if a.config.get("use_dora"):
            magnitude = next(
                k
                for k in (
                    f"{PEFT_PREFIX}{row.module}.lora_magnitude_vector",
                    f"{PEFT_PREFIX}{row.module}.lora_magnitude_vector.weight",
                )
                if k in adapter_keys
            )
        plan.lora = LoraDelta(parts.a[0], parts.b[0], row.scale, row.kind, magnitude)
        if parts.bias is not None:
            bias = plan_for(f"{row.module}.bias")
            assert bias is not None  # merge profile: lora_bias without a base bias is an error
            bias.bias = (f"{PEFT_PREFIX}{row.module}.lora_B.bias", row.scale)
    indices_config = a.config.get("trainable_token_indices")
    for module in sorted(a.tokens):
        plan = plan_for(f"{module}.weight")
        assert plan is not None
        indices = indices_config
        if isinstance(indices_config, dict):
            leaf = module.rsplit(".", 1)[-1]
            indices = indices_config.get(leaf, indices_config.get(module))
        assert isinstance(indices, list)
        plan.tokens = (f"{PEFT_PREFIX}{module}.token_adapter.trainable_tokens_delta", indices)
    if untied_head is not None:
        plans["lm_head.weight"] = untied_head
    if out_dtype:
        config_changes["dtype"] = dtype
    shards = {shard: [plans[key] for key in keys_] for shard, keys_ in base_order.items()}
    return MergePlan(report=report, shards=shards, config_changes=config_changes)
