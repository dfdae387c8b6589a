"""Every config kind reads YAML through megatron_cpt.config_loader: a YAML syntax error, an
unknown key or a wrong type is one line naming file:line (exit 2 from the CLI), never a
PyYAML traceback. Table-driven over the four config kinds."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_cpt.cli import main
from megatron_cpt.errors import UsageError

REPO = Path(__file__).resolve().parents[1]

TRAIN = """\
run_dir: run
model:
  pretrained: ckpt
data:
  train:
    - {prefix: corpus, weight: 1.0}
budget:
  iterations: 4
"""
STUDY = (REPO / "configs" / "study-demo.yaml").read_text().replace(
    "train_config: train/tiny-cpu.yaml", f"train_config: {REPO / 'configs/train/tiny-cpu.yaml'}")
MODEL = (REPO / "configs" / "models" / "tiny-a.yaml").read_text()
FILTER = (REPO / "configs" / "data" / "sample.yaml").read_text()


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


# (kind, good text, edit producing the fault, substring on the faulty line, message pattern)
CASES = [
    ("train", TRAIN, ("  iterations: 4", "  iterations: 4: 5"), "iterations", "invalid YAML"),
    ("train", TRAIN, ("  pretrained: ckpt", "  pretrained: ckpt\n  pretraind: x"), "pretraind",
     r"unknown key\(s\) \['pretraind'\] in model"),
    ("train", TRAIN, ("  iterations: 4", "  iterations: four"), "iterations", "budget.iterations must be int"),
    ("study", STUDY, ("general: true", "general: true\n\tbad: 1"), "bad: 1", "invalid YAML"),
    ("study", STUDY, ("general: true", "general: true\ngenral: true"), "genral", r"unknown key\(s\) \['genral'\]"),
    ("study", STUDY, ("  num_fewshot: 0 ", "  num_fewshot: [0] "), "num_fewshot", "eval.num_fewshot must be int"),
    ("model", MODEL, ("num_layers: 4", "num_layers: 4: 5"), "num_layers", "invalid YAML"),
    ("model", MODEL, ("num_layers: 4", "num_layers: 4\nnum_layer: 4"), "num_layer: 4", r"unknown key\(s\) \['num_layer'\]"),
    ("model", MODEL, ("tie_word_embeddings: true", "tie_word_embeddings: 3"), "tie_word", "must be bool"),
    ("filter", FILTER, ("seed: 0", "seed: 0\n\tbad: 1"), "bad: 1", "invalid YAML"),
    ("filter", FILTER, ("  ngram: 13", "  ngram: 13\n  ngrams: 13"), "ngrams", r"unknown key\(s\) \['ngrams'\]"),
    ("filter", FILTER, ("  workers: 2", "  workers: two"), "workers: two", "executor.workers must be int"),
    # numbers outside the range declared with their field (megatron_cpt/config_ranges.py)
    ("train", TRAIN, ("  iterations: 4", "  iterations: 0"), "iterations", "budget.iterations must be >= 1, got 0"),
    ("study", STUDY, ("max_requeues: 3", "max_requeues: -1"), "max_requeues", "resources.max_requeues must be >= 0"),
    ("study", STUDY, ("  num_fewshot: 0 ", "  num_fewshot: -1 "), "num_fewshot", "eval.num_fewshot must be >= 0"),
    ("model", MODEL, ("norm_eps: 1.0e-06", "norm_eps: 0"), "norm_eps", r"norm_eps must be > 0, got 0"),
    ("filter", FILTER, ("  ngram: 13", "  ngram: 0"), "ngram: 0", "decontamination.ngram must be >= 1"),
    ("filter", FILTER, ("threshold_sweep: [0.3,", "threshold_sweep: [1.3,"), "threshold_sweep",
     r"threshold_sweep must be in \[0, 1\], got 1.3"),
    ("filter", FILTER, ("  threshold: 0.5 ", "  threshold: 2 "), "language:", r"language.threshold must be in \[0, 1\], got 2"),
]


def _load(kind: str, path: Path):
    if kind == "train":
        from megatron_cpt.training.config import TrainConfig
        return TrainConfig.load(path)
    if kind == "study":
        from megatron_cpt.launch.study import StudyConfig
        return StudyConfig.load(path, use_env=False)
    if kind == "model":
        from megatron_cpt.models.qwen2 import ModelConfig
        return ModelConfig.load(path)
    from data_prep.filter import FilterConfig
    return FilterConfig.from_yaml(str(path))


@pytest.mark.parametrize("kind,text,edit,needle,message", CASES,
                         ids=[f"{c[0]}-{c[4].split()[0]}" for c in CASES])
def test_config_errors_name_file_and_line(tmp_path, kind, text, edit, needle, message):
    assert edit[0] in text, f"the {kind} fixture changed: {edit[0]!r} not in it"
    _load(kind, _write(tmp_path, text))  # the unedited file loads
    bad_text = text.replace(edit[0], edit[1], 1)
    path = _write(tmp_path, bad_text)
    with pytest.raises(UsageError) as err:
        _load(kind, path)
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert msg.startswith(f"{path}:{_line_of(bad_text, needle)}: "), msg
    assert re.search(message, msg), msg


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("argv,text,needle", [
    (["train", "--config", "{p}", "--check"], TRAIN.replace("budget:", "budgett:"), "budgett"),
    (["launch", "render-sbatch", "--study", "{p}", "--out", "{d}"], STUDY + "\n  valid_sequences: [",
     "valid_sequences: ["),
    (["prep", "filter", "--config", "{p}"], FILTER.replace("seed: 0", "seed: zero"), "seed: zero"),
])
def test_cli_prints_one_line_and_exits_2(tmp_path, capsys, argv, text, needle):
    path = _write(tmp_path, text)
    code = main([a.format(p=path, d=tmp_path / "out") for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and f"{path}:{_line_of(text, needle)}: " in err, err


def test_cli_refuses_negative_workers_before_any_work(tmp_path, capsys):
    path = _write(tmp_path, FILTER)
    assert main(["prep", "filter", "--config", str(path), "--workers", "-5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--workers must be >= -1, got -5" in err, err
    assert main(["prep", "filter", "--config", str(path), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "workers=0" in err, err


def test_each_cell_is_scored_on_the_exams_its_report_reads(tmp_path):
    """The general run on every exam (each domain's SGER refers to it); a domain, control or
    replay run on its own domain's exam and the general exam (forgetting), never another
    domain's."""
    from megatron_cpt.launch.grid import eval_job
    from megatron_cpt.launch.study import StudyConfig

    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    study = StudyConfig.load(path, use_env=False)
    exams = {c.name: sorted(Path(e).stem for e in eval_job(c).exams)
             for c in study.cells(sizes=["tiny-a"])}
    assert exams == {"tiny-a/general": ["general", "legal", "medical"],
                     "tiny-a/legal": ["general", "legal"],
                     "tiny-a/medical": ["general", "medical"],
                     "tiny-a/control_legal": ["general", "legal"],
                     "tiny-a/legal_replay25": ["general", "legal"]}
