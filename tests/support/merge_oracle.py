"""PEFT's own ``merge_and_unload`` on CPU, as the reference the streaming merge engine is tested
against (``tests/test_merge_oracle.py``).

``peft_merged`` loads a base folder with transformers, puts an adapter folder on it with
``PeftModel.from_pretrained`` and merges it, exactly as a user following PEFT's documentation
would. Two switches reproduce what the engine is asked to do differently from a plain load:
``untie`` gives ``lm_head`` its own copy of the shared embedding once the adapter is loaded
(on the tied model, as it was trained), before merging: what ``MergeOptions(untie=True)`` means
is that the adapter's change to one of them must not land in the other, while everything the
adapter did to the shared tensor itself (a saved, possibly resized, embedding) reaches both.
``vocab_size`` resizes the token embeddings first (the adapter was trained after
``resize_token_embeddings``).

``checkpoint_state`` names the merged model's tensors as the base checkpoint names them (GPT-2
checkpoints with or without ``transformer.``; a tied ``lm_head`` is not in the checkpoint),
``read_folder`` reads every tensor of a checkpoint folder, and ``mismatches`` compares two such
dicts bit for bit, describing each difference by its largest distance in units in the last place.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.oracle import _offline

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

__all__ = [
    "INPUT_IDS",
    "checkpoint_state",
    "forward",
    "load_merged_folder",
    "mismatches",
    "model_class",
    "peft_merged",
    "quiet",
    "read_folder",
    "train_adapter",
    "ulp_distance",
]

# A fixed input: every id of the tiny vocabularies' first rows and the trainable tokens (1..3),
# plus some from the top of the original vocabulary.
INPUT_IDS = [[0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 250, 255, 7]]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Offline, and transformers'/PEFT's own warnings about the deliberate oddities of the
    fixtures (tied heads, Conv1D's fan_in_fan_out...) neither printed nor raised: the suite runs
    with warnings as errors, and what is under test here is the engine, not the oracle."""
    with _offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def model_class(folder: Path) -> Any:
    """The transformers auto class for a checkpoint folder: a causal LM where the config says
    so, else the bare model (our BERT bases are ``BertModel``)."""
    import transformers

    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return transformers.AutoModelForCausalLM if causal else transformers.AutoModel


def _load(folder: Path, dtype: torch.dtype | None) -> PreTrainedModel:
    model: PreTrainedModel = model_class(folder).from_pretrained(
        str(folder), dtype=dtype if dtype is not None else "auto", local_files_only=True
    )
    model.eval()  # type: ignore[no-untyped-call]
    return model


def peft_merged(
    base_dir: Path,
    adapter_dir: Path,
    *,
    dtype: torch.dtype | None = None,
    untie: bool = False,
    vocab_size: int | None = None,
    merge: bool = True,
) -> PreTrainedModel:
    """The base (in its stored dtype unless ``dtype``) with the adapter loaded by PEFT and, unless
    ``merge=False``, merged with ``merge_and_unload()`` on CPU."""
    from peft import PeftModel

    with quiet():
        model = _load(base_dir, dtype)
        if vocab_size is not None:
            model.resize_token_embeddings(vocab_size)
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        peft_model.eval()
        if untie:
            _untie(peft_model.get_base_model())
        if not merge:
            return peft_model  # type: ignore[return-value]
        merged: PreTrainedModel = peft_model.merge_and_unload()
    merged.eval()  # type: ignore[no-untyped-call]
    return merged


def _weight_owner(module: Any) -> Any:
    """The module holding the real weight under PEFT's wrappers (LoRA layers, modules_to_save)."""
    while True:
        if hasattr(module, "base_layer"):
            module = module.base_layer
        elif hasattr(module, "original_module"):
            module = module.original_module
        else:
            return module


def _untie(model: Any) -> None:
    """Give the output embedding its own copy of the tied input embedding (as it is now)."""
    import torch

    head = _weight_owner(model.get_output_embeddings())
    embedding = _weight_owner(model.get_input_embeddings())
    assert head.weight is embedding.weight, "the base is not tied"
    head.weight = torch.nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


def load_merged_folder(folder: Path) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A merged checkpoint folder loaded with transformers (stored dtype), and the loading info
    (missing / unexpected / mismatched keys)."""
    with quiet():
        model, info = model_class(folder).from_pretrained(
            str(folder), dtype="auto", local_files_only=True, output_loading_info=True
        )
    model.eval()
    return model, info


def forward(model: Any, input_ids: list[list[int]] | None = None) -> torch.Tensor:
    """Logits (or, for a bare encoder, the last hidden state) on a fixed input."""
    import torch

    ids = torch.tensor(input_ids or INPUT_IDS)
    with torch.no_grad(), quiet():
        output = model(input_ids=ids)
    logits = getattr(output, "logits", None)
    result: torch.Tensor = logits if logits is not None else output.last_hidden_state
    return result


def checkpoint_state(model: Any, checkpoint_keys: set[str]) -> dict[str, torch.Tensor]:
    """The model's tensors named as in a checkpoint whose tensor names are ``checkpoint_keys``:
    as is, without the model's ``base_model_prefix`` (old GPT-2 files) or with it. Tensors that
    match no checkpoint key are kept under their own name, so that a comparison reports them."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    named: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        candidates = [key]
        if prefix and key.startswith(prefix + "."):
            candidates.append(key.removeprefix(prefix + "."))
        if prefix:
            candidates.append(f"{prefix}.{key}")
        name = next((c for c in candidates if c in checkpoint_keys), key)
        named[name] = value.detach().to("cpu")
    return named


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in a checkpoint folder."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            assert key not in tensors, f"{key} is in two shards"
            tensors[key] = value
    return tensors


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between corresponding elements of two float tensors of the same
    dtype, counted in representable values (units in the last place); 0 means bitwise equal up
    to the sign of zero."""
    import torch

    assert a.dtype == b.dtype and a.shape == b.shape
    if a.numel() == 0:
        return 0
    bits = {
        torch.bfloat16: torch.int16,
        torch.float16: torch.int16,
        torch.float32: torch.int32,
        torch.float64: torch.int64,
    }[a.dtype]

    def ordered(t: torch.Tensor) -> torch.Tensor:
        raw = t.contiguous().view(bits).to(torch.int64)
        sign = torch.iinfo(bits).min
        # sign-magnitude to two's complement order: -0.0 and +0.0 both map to 0
        return torch.where(raw < 0, sign - raw, raw)

    return int((ordered(a) - ordered(b)).abs().max())


def mismatches(
    ours: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    *,
    keys: set[str] | None = None,
) -> list[str]:
    """Every difference between two state dicts over ``keys`` (default: the union): a tensor
    missing on one side, another dtype or shape, or values that are not bitwise equal (with the
    largest distance in ulps and absolute value)."""
    import torch

    problems: list[str] = []
    for key in sorted(keys if keys is not None else set(ours) | set(reference)):
        if key not in ours or key not in reference:
            side = "our output" if key not in ours else "the reference"
            problems.append(f"{key}: missing from {side}")
            continue
        mine, theirs = ours[key], reference[key]
        if mine.dtype != theirs.dtype or mine.shape != theirs.shape:
            problems.append(
                f"{key}: {mine.dtype}{list(mine.shape)} vs {theirs.dtype}{list(theirs.shape)}"
            )
            continue
        if torch.equal(mine, theirs):
            continue
        if mine.is_floating_point():
            differ = int((mine != theirs).sum())
            abs_diff = float((mine.double() - theirs.double()).abs().max())
            problems.append(
                f"{key}: {differ} of {mine.numel()} values differ, max "
                f"{ulp_distance(mine, theirs)} ulp (abs {abs_diff:.3g})"
            )
        else:
            problems.append(f"{key}: values differ")
    return problems


def train_adapter(adapter: Path, to: Path, seed: int = 0) -> Path:
    """A copy of a ``make_adapter`` folder as training would leave it: ``make_adapter`` gives the
    LoRA factors random values, but tensors PEFT initialises from the base (modules_to_save
    copies, ``base_layer`` biases and embeddings, trainable-token rows, DoRA magnitudes) are
    still equal to the base there, so a merge that ignored them would go unnoticed. Each of them
    gets seeded noise (relative, in its own dtype), the same noise where PEFT saved one tensor
    under two names; the LoRA factors are kept."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, to)
    weights = to / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    generator = torch.Generator().manual_seed(seed + 3_000)
    factors = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
    trained: list[tuple[torch.Tensor, torch.Tensor]] = []  # (initial, trained) values
    for key in sorted(tensors):
        if key.endswith(factors):
            continue
        value = tensors[key]
        # One tensor saved twice (a tied lm_head next to the embedding's base_layer) stays one.
        same = next(
            (t for v, t in trained if v.shape == value.shape and torch.equal(v, value)), None
        )
        if same is None:
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
            scale = float(value.float().abs().mean()) or 1.0
            same = (value.float() + 0.1 * scale * noise).to(value.dtype)
            trained.append((value, same))
        tensors[key] = same.clone()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return to
