"""Export a checkpoint folder as a NeMo 2 checkpoint, without NeMo installed.

Layout written (what NeMo 2.7.3's own ``llm.import_ckpt`` writes for a Qwen2 model)::

    OUT/
      context/
        io.json           fiddle serialization of TrainerContext(model=Qwen2Model(config=Qwen2Config(...),
                          tokenizer=AutoTokenizer("nemo_tokenizer")), trainer=Trainer(...), extra={})
        model.yaml        the same model, every Qwen2Config field resolved (read by NeMo's TRT-LLM/vLLM
                          exporters)
        nemo_tokenizer/   the Hugging Face tokenizer files
        artifacts/        (empty: no generation config is exported)
      weights/            Megatron-core torch_dist dist checkpoint: GPTModel keys with a ``module.``
                          prefix, layers stacked on a leading axis, norms under the TE names;
                          common.pt holds NeMo's ``content_metadata``

Choices that follow NeMo's own HF importer so that stock NeMo loads and exports the result:

- ``vocab_size`` is the HF row count and the embedding / output layer are stored with exactly that
  many rows (NeMo does not pad a preset ``vocab_size``); our padding rows are dropped.
- Tied models are written untied (``share_embeddings_and_output_weights: false``) with the output
  layer a copy of the embedding, as NeMo's importer does for Qwen2.5-0.5B; NeMo 2.7.3's HF exporter
  cannot export a shared output layer. Logits are identical.

The dist checkpoint is written by Megatron-core 0.16.1 (this environment); Megatron-core 0.15.3
(NeMo 2.7.3's pin) reads it: tests/test_nemo_export.py checks that with NeMo itself.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_cpt.checkpoint import hf_files, store
from megatron_cpt.errors import UsageError
from megatron_cpt.models.qwen2 import ModelConfig

NEMO_VERSION = "2.7.3"  # the NeMo release whose layout this reproduces (and the test verifies)
CONTEXT, NEMO_WEIGHTS, NEMO_TOKENIZER, ARTIFACTS = "context", "weights", "nemo_tokenizer", "artifacts"
MODEL_TEMPLATE = Path(__file__).with_name("nemo_model.yaml")
PREFIX = "module."  # NeMo wraps the GPTModel in MegatronParallel: every key gains this prefix
# What NeMo's MegatronStrategy stores in common.pt and passes back to sharded_state_dict() on load.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                    "distrib_optim_sharding_type": "dp_reshardable"}


# -- a minimal fiddle JSON writer ---------------------------------------------------------------
# fiddle's serialization (fiddle._src.experimental.serialization, version 0.0.1) as NeMo writes it
# with `io_dump`: one object per Config / tuple / dict, referenced by key, children before parents.

@dataclass(frozen=True)
class PyRef:
    """A reference to a Python object by module and name (a class, function or dtype)."""

    module: str
    name: str


@dataclass
class Call:
    """``fdl.Config(fn, **args)``: arguments in the order they were set."""

    fn: PyRef
    args: list[tuple[str, Any]] = field(default_factory=list)


_FDL = "fiddle._src.config"


def _pyref(module: str, name: str, **extra) -> dict:
    return {"type": "pyref", "module": module, "name": name, **extra}


_TUPLE, _DICT = _pyref("builtins", "tuple"), _pyref("builtins", "dict")
_CONFIG, _BTM = _pyref(_FDL, "Config"), _pyref(_FDL, "BuildableTraverserMetadata")


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


class _FiddleWriter:
    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}
        self.counts: dict[str, int] = {}

    def _add(self, base: str, obj: dict) -> dict:
        self.counts[base] = self.counts.get(base, 0) + 1
        key = f"{base}_{self.counts[base]}"
        self.objects[key] = obj
        return {"type": "ref", "key": key}

    def value(self, v: Any, path: str) -> dict:
        if isinstance(v, Call):
            return self.config(v, path)
        if isinstance(v, dict):
            return self.dict(v, path)
        if isinstance(v, PyRef):
            return _pyref(v.module, v.name, paths=[path])
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise TypeError(f"cannot serialize {type(v).__name__} at {path}")
        return {"type": "leaf", "value": v, "paths": [path]}

    def _names(self, names: list[str]) -> dict:
        return self._add("tuple", {"type": _TUPLE, "metadata": None,
                                   "items": [[f"Index(index={i})", n] for i, n in enumerate(names)]})

    def _empty_dict(self) -> dict:
        return self._add("dict", {"type": _DICT, "items": [],
                                  "metadata": {"type": _TUPLE, "items": [], "metadata": None}})

    def dict(self, d: dict, path: str) -> dict:
        if not d:
            meta: dict = {"type": _TUPLE, "items": [], "metadata": None}
            items: list = []
        else:
            meta = self._names(list(d))
            items = [[f"Key(key={k!r})", self.value(v, f"{path}[{k!r}]")] for k, v in d.items()]
        return self._add("dict", {"type": _DICT, "items": items, "metadata": meta, "paths": [path]})

    def config(self, c: Call, path: str) -> dict:
        items = [[f"Attr(name={n!r})", self.value(v, f"{path}.{n}")] for n, v in c.args]
        names = self._names([n for n, _ in c.args])
        tags, history = self._empty_dict(), self._empty_dict()
        btm = self._add("buildable_traverser_metadata", {
            "type": _BTM,
            "items": [["Attr(name='fn_or_cls')", _pyref(c.fn.module, c.fn.name)],
                      ["Attr(name='argument_names')", names],
                      ["Attr(name='argument_tags')", tags],
                      ["Attr(name='argument_history')", history]],
            "metadata": _BTM,
        })
        return self._add(_snake(c.fn.name), {"type": _CONFIG, "items": items, "metadata": btm,
                                             "paths": [path]})


def fiddle_json(root: Call) -> dict:
    """The io.json document of ``root`` (every object referenced once)."""
    w = _FiddleWriter()
    ref = w.value(root, "<root>")
    return {"root": ref, "objects": w.objects, "refcounts": {k: 1 for k in w.objects},
            "version": "0.0.1"}


# -- the NeMo model description -----------------------------------------------------------------

def qwen2_config_args(cfg: ModelConfig, dtype: str) -> list[tuple[str, Any]]:
    """``Qwen2Config`` arguments in the order NeMo 2.7.3's HF importer sets them."""
    return [
        ("tensor_model_parallel_size", 1),
        ("pipeline_model_parallel_comm_backend", None),
        ("pipeline_model_parallel_size", 1),
        ("virtual_pipeline_model_parallel_size", None),
        ("sequence_parallel", False),
        ("context_parallel_size", 1),
        ("expert_model_parallel_size", 1),
        ("expert_tensor_parallel_size", None),
        ("moe_extended_tp", False),
        ("fp16", dtype == "float16"),
        ("bf16", dtype == "bfloat16"),
        ("params_dtype", PyRef("torch", dtype)),
        ("use_te_rng_tracker", False),
        ("pipeline_dtype", None),
        ("microbatch_group_size_per_vp_stage", 1),
        ("num_layers", cfg.num_layers),
        ("num_layers_in_first_pipeline_stage", None),
        ("num_layers_in_last_pipeline_stage", None),
        ("pipeline_model_parallel_layout", None),
        ("account_for_embedding_in_pipeline_split", False),
        ("account_for_loss_in_pipeline_split", False),
        ("hidden_size", cfg.hidden_size),
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_query_groups", cfg.num_query_groups),
        ("ffn_hidden_size", cfg.ffn_hidden_size),
        ("layernorm_epsilon", float(cfg.norm_eps)),
        ("gated_linear_unit", True),
        ("init_method_std", 0.02),
        ("share_embeddings_and_output_weights", False),
        ("make_vocab_size_divisible_by", cfg.make_vocab_size_divisible_by),
        ("rotary_base", float(cfg.rotary_base)),
        ("seq_length", cfg.max_position_embeddings),
        ("vocab_size", cfg.vocab_size),
    ]


def trainer_context(cfg: ModelConfig, dtype: str) -> Call:
    """TrainerContext(model=Qwen2Model(...), trainer=Trainer(...), extra={}) as NeMo dumps it."""
    qwen2 = "nemo.collections.llm.gpt.model.qwen2"
    model = Call(PyRef(qwen2, "Qwen2Model"), [
        ("config", Call(PyRef(qwen2, "Qwen2Config"), qwen2_config_args(cfg, dtype))),
        ("tokenizer", Call(PyRef("nemo.collections.common.tokenizers.huggingface.auto_tokenizer",
                                 "AutoTokenizer"),
                           [("pretrained_model_name", NEMO_TOKENIZER), ("trust_remote_code", False)])),
    ])
    strategy = Call(PyRef("nemo.lightning.pytorch.strategies.megatron_strategy", "MegatronStrategy"),
                    [("ckpt_save_optimizer", False), ("kwargs", {"always_save_context": True})])
    trainer = Call(PyRef("nemo.lightning.pytorch.trainer", "Trainer"),
                   [("accelerator", "cpu"), ("strategy", strategy), ("devices", 1)])
    return Call(PyRef("nemo.lightning.io.pl", "TrainerContext"),
                [("model", model), ("trainer", trainer), ("extra", {})])


def model_yaml(cfg: ModelConfig, dtype: str) -> dict:
    """context/model.yaml: NeMo 2.7.3's resolved Qwen2Model with this architecture filled in."""
    doc = yaml.safe_load(MODEL_TEMPLATE.read_text())
    conf = doc["config"]
    for name, value in qwen2_config_args(cfg, dtype):
        if isinstance(value, PyRef):
            value = {"_call_": False, "_target_": f"{value.module}.{value.name}"}
        conf[name] = value
    conf["generation_config"] = None
    return doc


# -- writing ------------------------------------------------------------------------------------

def _nemo_sharded_state_dict(gpt, cfg: ModelConfig, dtype) -> dict:
    """The model's sharded state dict under NeMo's keys (``module.`` prefix), with the
    embedding and output layer cut to ``cfg.vocab_size`` rows, a tied output layer
    materialized as a copy of the embedding, and every tensor in ``dtype`` (the local spec
    keeps its norms in float32; NeMo's config declares one params_dtype, as with TE)."""
    import dataclasses

    from megatron.core.dist_checkpointing import ShardedTensor

    sd = gpt.sharded_state_dict(prefix=PREFIX)
    for k, v in sd.items():
        if isinstance(v, ShardedTensor) and v.data.is_floating_point() and v.data.dtype != dtype:
            sd[k] = dataclasses.replace(v, data=v.data.detach().to(dtype), dtype=dtype)
    emb_key, out_key = PREFIX + "embedding.word_embeddings.weight", PREFIX + "output_layer.weight"
    by_key = {getattr(v, "key", None): k for k, v in sd.items()}
    if emb_key not in by_key:
        raise RuntimeError(f"{emb_key} missing from the model's sharded state dict")
    emb = sd[by_key[emb_key]]
    rows = slice(0, cfg.vocab_size)

    def full(key: str, data, like) -> ShardedTensor:
        return ShardedTensor.from_rank_offsets(key, data[rows].detach().clone(),
                                               replica_id=like.replica_id)

    sd[by_key[emb_key]] = full(emb_key, emb.data, emb)
    if cfg.tie_word_embeddings:
        if out_key in by_key:
            raise RuntimeError("a tied model should not hold a separate output layer")
        sd[out_key] = full(out_key, emb.data, emb)
    else:
        out = sd[by_key[out_key]]
        sd[by_key[out_key]] = full(out_key, out.data, out)
    return sd


def write_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the HF tokenizer files; make ``tokenizer_config.json`` loadable by the
    transformers 4.x that NeMo 2.7.3 pins (transformers 5 names its generic fast tokenizer
    class ``TokenizersBackend``, unknown to 4.x, whose name for it is ``PreTrainedTokenizerFast``)."""
    files = hf_files.copy_tokenizer(src, dst)
    path = dst / "tokenizer_config.json"
    if path.is_file():
        conf = json.loads(path.read_text())
        if conf.get("tokenizer_class") == "TokenizersBackend":
            conf["tokenizer_class"] = "PreTrainedTokenizerFast"
            conf.pop("backend", None)
            path.write_text(json.dumps(conf, indent=2, ensure_ascii=False))
    return files


def mcore_to_nemo(ckpt: Path, out: Path, force: bool = False, dtype: str | None = None) -> dict:
    """Export a checkpoint folder (converted or trained) as a NeMo 2 checkpoint folder."""
    from megatron.core import dist_checkpointing

    dtype_name = store.export_dtype(store.read_metadata(ckpt), dtype)
    store.check_output_dir(out, force)
    tok_dir = Path(ckpt) / store.TOKENIZER
    if not (tok_dir / "tokenizer_config.json").is_file() and not (tok_dir / "tokenizer.json").is_file():
        raise UsageError(f"{ckpt} has no tokenizer/ folder; NeMo checkpoints carry their tokenizer")
    t0 = time.perf_counter()
    gpt, cfg = store.load_model(ckpt, dtype=dtype_name, local_spec=True)
    with store.atomic_dir(out, force=force) as tmp:
        context = tmp / CONTEXT
        (context / ARTIFACTS).mkdir(parents=True)
        write_tokenizer(tok_dir, context / NEMO_TOKENIZER)
        (context / "io.json").write_text(json.dumps(fiddle_json(trainer_context(cfg, dtype_name)),
                                                    indent=2))
        (context / "model.yaml").write_text(yaml.safe_dump(model_yaml(cfg, dtype_name),
                                                           sort_keys=True))
        weights = tmp / NEMO_WEIGHTS
        weights.mkdir()
        sd = _nemo_sharded_state_dict(gpt, cfg, store.DTYPES[dtype_name])
        dist_checkpointing.save(sd, str(weights), content_metadata=dict(CONTENT_METADATA))
    return {"seconds": time.perf_counter() - t0, "out": str(out), "dtype": dtype_name,
            "tensors": sum(1 for k in sd if not k.endswith("_extra_state"))}
