"""Every bad conversion input fails early with one line and exit code 2."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_cli


def _expect_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr[-3000:]
    for frag in fragments:
        assert frag in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_unsupported_architecture(tmp_path, tiny_hf):
    hf = tmp_path / "llama"
    shutil.copytree(tiny_hf["untied_kv2"], hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (hf / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "o"), check=False)
    _expect_error(proc, "unsupported architectures", "LlamaForCausalLM")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model,tp,pp,fragment", [
    ("untied_kv2", 3, 1, "attention heads"),
    ("tied_kv1", 2, 1, "kv heads"),
    ("untied_kv2", 1, 3, "layers"),
])
def test_parallel_sizes_that_cannot_split_the_model(tiny_hf, tiny_ckpt, model, tp, pp, fragment):
    proc = run_cli("convert", "verify", "--hf", str(tiny_hf[model]), "--ckpt", str(tiny_ckpt[model]),
                   "--tp", str(tp), "--pp", str(pp), check=False)
    _expect_error(proc, fragment)


def test_world_size_must_match(tiny_hf, tiny_ckpt):
    proc = run_cli("convert", "verify", "--hf", str(tiny_hf["untied_kv2"]), "--ckpt",
                   str(tiny_ckpt["untied_kv2"]), "--tp", "2", check=False)
    _expect_error(proc, "needs exactly TP*PP = 2 processes")


@pytest.fixture()
def sharded_hf(tmp_path, tiny_hf):
    """The untied model re-saved in several safetensors shards with an index."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(tiny_hf["untied_kv2"])).save_pretrained(
        str(out), max_shard_size="200KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (out / "model.safetensors.index.json").is_file()
    return out, shards


def test_missing_shard(tmp_path, sharded_hf):
    hf, shards = sharded_hf
    shards[1].unlink()
    proc = run_cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "o"), check=False)
    _expect_error(proc, "is missing", shards[1].name)


def test_truncated_shard(tmp_path, sharded_hf):
    hf, shards = sharded_hf
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) - 1000])
    proc = run_cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "o"), check=False)
    _expect_error(proc, "truncated", shards[-1].name)


def test_tokenizer_larger_than_embedding(tmp_path, tiny_tokenizer):
    from megatron_cpt.tiny import make_hf_model
    from conftest import tiny_variants

    hf = make_hf_model(tmp_path / "small_vocab", tiny_variants()["untied_kv2"], vocab_size=256,
                       tokenizer_dir=tiny_tokenizer)
    proc = run_cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "o"), check=False)
    _expect_error(proc, "512 tokens", "256 rows")


def test_existing_output_needs_force(tmp_path, tiny_hf, tiny_ckpt):
    proc = run_cli("convert", "hf-to-mcore", "--hf", str(tiny_hf["tied_kv1"]), "--out",
                   str(tiny_ckpt["tied_kv1"]), check=False)
    _expect_error(proc, "already holds a checkpoint", "--force")
    out = tmp_path / "again"
    shutil.copytree(tiny_ckpt["tied_kv1"], out)
    run_cli("convert", "hf-to-mcore", "--hf", str(tiny_hf["untied_kv2"]), "--out", str(out), "--force")
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["architecture"]["tie_word_embeddings"] is False
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
