"""`convert mcore-to-nemo`: the NeMo 2 checkpoint is loaded and exported to Hugging Face by
NeMo 2.7.3 itself (in the separate .venv-nemo, `make setup-nemo`), and its logits equal those
of our own `convert mcore-to-hf` export."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli

NEMO_PYTHON = Path(os.environ.get("MEGATRON_CPT_NEMO_PYTHON", REPO / ".venv-nemo" / "bin" / "python"))
NEMO_STAMP = REPO / ".venv-nemo" / ".setup-stamp"
EXPORT_SCRIPT = REPO / "tests" / "nemo" / "export_to_hf.py"
TOLERANCE = 1e-5


def nemo_python() -> Path:
    """The NeMo venv's interpreter; without it fail under CI (never skip there), else skip."""
    custom = "MEGATRON_CPT_NEMO_PYTHON" in os.environ
    if NEMO_PYTHON.is_file() and (custom or NEMO_STAMP.is_file()):
        return NEMO_PYTHON
    reason = (f"NeMo environment missing ({NEMO_PYTHON} or {NEMO_STAMP} not found); create it with "
              "`make setup-nemo` (`make test` does) or point MEGATRON_CPT_NEMO_PYTHON at a Python "
              "with tests/nemo/requirements.txt installed")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def nemo_py() -> Path:
    """Requested before the (slow) checkpoint fixtures so a missing environment fails first."""
    return nemo_python()


def run_nemo(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               NEMO_HOME=str(cwd / "nemo_home"), HF_HOME=str(cwd / "hf_home"))
    proc = subprocess.run([str(nemo_python()), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"NeMo script exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-8000:]}")
    return proc


def dist_ckpt_keys(weights: Path) -> dict[str, tuple]:
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(weights)).read_metadata()
    return {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}


def logits(hf_dir: Path, ids, dtype):
    """fp32 logits of an HF folder loaded in ``dtype`` (then computed in float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        return model.float()(ids).logits, state


@pytest.mark.parametrize("variant,dtype", [("tied_kv1", "float32"), ("untied_kv2", "float32"),
                                           ("untied_kv2", "bfloat16")])
def test_nemo_export_round_trips_through_nemo(nemo_py, variant, dtype, tiny_ckpt, tmp_path):
    import torch
    import yaml

    ckpt = tiny_ckpt[variant]
    cfg = yaml.safe_load((ckpt / "model.yaml").read_text())
    nemo_dir, nemo_hf, our_hf = tmp_path / "nemo", tmp_path / "nemo_hf", tmp_path / "our_hf"
    run_cli("convert", "mcore-to-nemo", "--ckpt", str(ckpt), "--out", str(nemo_dir), "--dtype", dtype)
    run_cli("convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(our_hf), "--dtype", dtype)

    # layout and key names, as NeMo's own importer writes them
    for rel in ("context/io.json", "context/model.yaml", "context/nemo_tokenizer/tokenizer.json",
                "weights/.metadata", "weights/common.pt", "weights/metadata.json"):
        assert (nemo_dir / rel).is_file(), rel
    keys = dist_ckpt_keys(nemo_dir / "weights")
    h, v, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_layers"]
    assert all(k.startswith("module.") for k in keys)
    assert keys["module.embedding.word_embeddings.weight"] == (v, h)  # NeMo keeps HF rows, unpadded
    assert keys["module.output_layer.weight"] == (v, h)  # also for tied models (NeMo's importer)
    assert keys["module.decoder.layers.self_attention.linear_qkv.layer_norm_weight"] == (L, h)
    assert keys["module.decoder.layers.mlp.linear_fc1.layer_norm_weight"] == (L, h)

    # NeMo: load_context + export_ckpt(target="hf")
    report_path = tmp_path / "report.json"
    t0 = time.perf_counter()
    run_nemo(str(EXPORT_SCRIPT), "--nemo", str(nemo_dir), "--out", str(nemo_hf),
             "--report", str(report_path), cwd=tmp_path)
    print(f"\n[{variant} {dtype}] NeMo load_context + export_ckpt: {time.perf_counter() - t0:.1f} s "
          f"({nemo_py})")
    report = json.loads(report_path.read_text())
    assert report["nemo_version"] == "2.7.3"
    assert (report["model_class"], report["config_class"]) == ("Qwen2Model", "Qwen2Config")
    c = report["config"]
    assert (c["num_layers"], c["hidden_size"], c["num_attention_heads"], c["num_query_groups"],
            c["ffn_hidden_size"], c["vocab_size"], c["seq_length"]) == (
        L, h, cfg["num_attention_heads"], cfg["num_query_groups"], cfg["ffn_hidden_size"], v,
        cfg["max_position_embeddings"])
    assert c["rotary_base"] == cfg["rotary_base"] and c["layernorm_epsilon"] == cfg["norm_eps"]
    assert c["normalization"] == "RMSNorm" and c["add_qkv_bias"] and not c["add_bias_linear"]
    assert report["params_dtype"] == f"torch.{dtype}" and report["activation_func"] == "silu"
    assert c["bf16"] == (dtype == "bfloat16")

    # logits (computed in fp32) of NeMo's HF export vs ours; the weights are bit-exact. In
    # bfloat16 our HF export keeps the local spec's float32 norms: compare it loaded in bfloat16.
    torch_dtype = getattr(torch, dtype)
    hf_conf = json.loads((nemo_hf / "config.json").read_text())
    assert (hf_conf.get("dtype") or hf_conf.get("torch_dtype")) == dtype
    ids = torch.randint(0, v, (2, 48), generator=torch.Generator().manual_seed(0))
    ours, our_sd = logits(our_hf, ids, torch_dtype)
    theirs, their_sd = logits(nemo_hf, ids, torch_dtype)
    diff = (ours - theirs).abs().max().item()
    print(f"[{variant} {dtype}] max |logit diff| NeMo-exported HF vs our HF export: {diff:.3g}")
    assert diff <= TOLERANCE
    for name, t in our_sd.items():
        assert torch.equal(t, their_sd[name]), name
    if cfg["tie_word_embeddings"]:
        assert torch.equal(their_sd["lm_head.weight"], our_sd["model.embed_tokens.weight"])


def test_nemo_io_json_is_a_complete_fiddle_graph(tiny_ckpt, tmp_path):
    """Without NeMo: every reference resolves, the model and tokenizer are where NeMo looks."""
    out = tmp_path / "nemo"
    run_cli("convert", "mcore-to-nemo", "--ckpt", str(tiny_ckpt["untied_kv2"]), "--out", str(out),
            "--dtype", "bfloat16")
    doc = json.loads((out / "context" / "io.json").read_text())
    assert set(doc) == {"root", "objects", "refcounts", "version"}
    objs = doc["objects"]

    def refs(node):
        if isinstance(node, dict):
            if node.get("type") == "ref":
                yield node["key"]
            for v in node.values():
                yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    seen = list(refs(doc["root"])) + [k for o in objs.values() for k in refs(o)]
    assert set(seen) == set(objs) and all(seen.count(k) == doc["refcounts"][k] for k in objs)
    cfg = {item[0]: item[1] for item in objs["qwen2_config_1"]["items"]}
    assert cfg["Attr(name='params_dtype')"]["name"] == "bfloat16"
    assert cfg["Attr(name='bf16')"]["value"] is True
    tok = {item[0]: item[1] for item in objs["auto_tokenizer_1"]["items"]}
    assert tok["Attr(name='pretrained_model_name')"]["value"] == "nemo_tokenizer"
    import yaml

    model_yaml = yaml.safe_load((out / "context" / "model.yaml").read_text())
    assert model_yaml["config"]["params_dtype"]["_target_"] == "torch.bfloat16"
    assert model_yaml["config"]["num_query_groups"] == 2
    tok_conf = json.loads((out / "context" / "nemo_tokenizer" / "tokenizer_config.json").read_text())
    assert tok_conf.get("tokenizer_class") != "TokenizersBackend"  # unknown to transformers 4.x
    keys = dist_ckpt_keys(out / "weights")
    assert keys["module.embedding.word_embeddings.weight"] == (1000, 64)
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(out / "weights")).read_metadata().state_dict_metadata
    dtypes = {str(m.properties.dtype) for k, m in md.items() if hasattr(m, "size")}
    assert dtypes == {"torch.bfloat16"}  # norms too: NeMo declares one params_dtype


def test_nemo_export_refuses_existing_output(tiny_ckpt, tmp_path):
    out = tmp_path / "nemo"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    proc = run_cli("convert", "mcore-to-nemo", "--ckpt", str(tiny_ckpt["tied_kv1"]), "--out", str(out),
                   check=False)
    assert proc.returncode != 0 and "--force" in proc.stderr
    assert (out / "keep.txt").is_file()
