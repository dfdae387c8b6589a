"""The whole study at toy scale on CPU, through the same commands and launcher as on a cluster.

1. data: domain classifier, filtering + decontamination of the shipped web sample, a
   train/valid split per corpus, a BPE fitted on the general training text, tokenization;
2. base models: three tiny random Qwen2 sizes pretrained briefly on general text (so continued
   pretraining starts from a model that knows the language), published as Hugging Face
   folders and converted back to Megatron checkpoints, as a real Qwen2.5 would be;
3. the grid (configs/study-demo.yaml): sizes x {general, legal, medical, control_legal,
   legal_replay25 (legal with 25 % general data)}, TP2 / PP2, each cell evaluated on every
   checkpoint, submitted with `launch grid` to the local SLURM cluster when one answers, else
   run with submitit's local executor;
4. the report (report.md / report.html / results.json / plots), with the mixture law fitted
   over the legal, general and replay cells and the replay recommendation per size.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

from megatron_cpt.launch.study import REPO_ROOT
from megatron_cpt.run_folder import RunFolder

STUDY = REPO_ROOT / "configs" / "study-demo.yaml"
TRAIN_CONFIG = REPO_ROOT / "configs" / "train" / "tiny-cpu.yaml"
VALID_EVERY = 8          # 1/8 of each corpus (by id hash, `prep split`) is held out
BASE_ITERATIONS = 80     # brief general pretraining of the random base models
_INIT_LOCK = threading.Lock()  # torch's global RNG: one random init at a time, or seeds mix
LOCAL_SLURM_CONF = Path("/tmp/megatron-cpt-slurm/slurm.conf")


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli(*args: str, quiet: bool = True) -> None:
    """Run ``megatron-cpt ARGS`` in a fresh process, as a user would."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "megatron_cpt", *args], env=env, text=True,
                          capture_output=quiet)
    if proc.returncode != 0:
        if quiet:
            sys.stderr.write((proc.stdout or "")[-3000:] + (proc.stderr or "")[-3000:])
        raise SystemExit(f"demo step failed (exit {proc.returncode}): megatron-cpt {' '.join(args)}")


def prepare_data(out: Path, corpora: list[str], valid_names: list[str]) -> dict:
    from data_prep.split import split
    from data_prep.tokenize import tokenize
    from megatron_cpt.tiny import train_tokenizer

    samples = REPO_ROOT / "data_prep" / "samples"
    cli("prep", "classifier", "train", "--labeled", str(samples / "seed_labeled.jsonl"),
        "--out", str(out / "classifier"))
    cli("prep", "filter", "--config", str(REPO_ROOT / "configs" / "data" / "sample.yaml"),
        "--output", str(out / "prep"), "--classifier", str(out / "classifier"), "--workers", "2")
    report = json.loads((out / "prep" / "filter_report.json").read_text())
    log(f"filtered the web sample: {report['documents_in']} documents in, "
        f"{report['documents_clean']} clean, dropped {report['dropped']}")
    decontam = decontamination_summary(report)
    log(f"decontamination: {decontam['removed']} page(s) removed (planted leaks of "
        f"{', '.join(decontam['removed_items']) or '-'}); hits against the exams' val/test "
        f"questions: {decontam['val_test_hits']}")

    # `prep split` by id hash: a document is in the same split in every corpus, so a page held
    # out anywhere is trained on nowhere
    splits = out / "splits"
    fractions = {"train": 1 - 1 / VALID_EVERY, "valid": 1 / VALID_EVERY}
    for corpus in sorted({*corpora, *valid_names}):
        split([str(out / "prep" / corpus / "data.jsonl")], str(splits / corpus), fractions)
    paths = {**{f"{c}_train": splits / c / "train.jsonl" for c in corpora},
             **{f"{n}_valid": splits / n / "valid.jsonl" for n in valid_names}}
    files = {n: [json.loads(line) for line in p.read_text().splitlines()] for n, p in paths.items()}

    tok = train_tokenizer(out / "tokenizer", vocab_size=1024,
                          texts=[d["text"] for d in files["general_train"]])
    for name, path in paths.items():
        tokenize([str(path)], str(tok), str(out / "data" / name), workers=1,
                 progress=False)
    sizes = {n: json.loads((out / "data" / f"{n}.manifest.json").read_text())["tokens"]
             for n in files}
    log("tokenized: " + ", ".join(f"{n} {len(files[n])} docs/{sizes[n]} tok" for n in files))
    return decontam


def decontamination_summary(report: dict) -> dict:
    """The filter's 13-gram decontamination against the exams' scored (val/test) questions:
    the corpora state each question's knowledge, so a hit here would mean a leaked question."""
    from eval.exams import load_exam, sample_exam_paths

    scored = {it.id for p in sample_exam_paths().values() for it in load_exam(p)
              if it.split in ("val", "test")}
    removed = report.get("decontamination", {}).get("removed", [])
    return {"removed": len(removed), "removed_items": sorted({r["exam_item"] for r in removed}),
            "val_test_hits": sum(r["exam_item"] in scored for r in removed)}


def base_model(out: Path, model: str, seed: int) -> str:
    """Random init -> brief general pretraining -> HF "base model" -> Megatron checkpoint."""
    from megatron_cpt.tiny import make_hf_model

    data, base = out / "data", out / "base"
    with _INIT_LOCK:  # base models are built in threads; make_hf_model seeds the global RNG
        make_hf_model(base / f"{model}-random-hf", model, seed=seed,
                      tokenizer_dir=out / "tokenizer")
    cli("convert", "hf-to-mcore", "--hf", str(base / f"{model}-random-hf"),
        "--out", str(base / f"{model}-random"), "--force")
    run = RunFolder(base / f"{model}-pretrain")
    cli("train", "--config", str(TRAIN_CONFIG), f"run_dir={run.path}",
        f"model.pretrained={base / f'{model}-random'}",
        f"data.train=[{{prefix: {data / 'general_train'}, weight: 1.0}}]",
        f"data.valid=[{{name: general, prefix: {data / 'general_valid'}}}]",
        f"budget.iterations={BASE_ITERATIONS}", "checkpoint.every_tokens=null",
        "batch.micro_batch_size=8", "--force")
    valid = [r["loss"] for r in run.metrics() if r["kind"] == "valid"]
    cli("convert", "mcore-to-hf", "--ckpt", str(run.checkpoints / run.latest_name()),
        "--out", str(base / f"{model}-hf"), "--force")
    cli("convert", "hf-to-mcore", "--hf", str(base / f"{model}-hf"),
        "--out", str(out / "checkpoints" / model), "--name", model, "--force")
    return (f"base model {model}: {BASE_ITERATIONS} iterations of general text, general valid "
            f"loss {valid[-1]:.3f}; published as {base / f'{model}-hf'}, converted to "
            f"{out / 'checkpoints' / model}")


def base_models(out: Path, models: list[str]) -> None:
    """One base model per size, built side by side (each step is one process)."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with ThreadPoolExecutor(max_workers=2) as pool:
        # the seed follows the model's name: the same init whichever sizes a run selects
        seeds = [(m, zlib.crc32(m.encode()) % 10_000) for m in models]
        for line in pool.map(lambda a: base_model(out, *a), seeds):
            log(line)


def slurm_available() -> bool:
    if not os.environ.get("SLURM_CONF") and LOCAL_SLURM_CONF.is_file():
        os.environ["SLURM_CONF"] = str(LOCAL_SLURM_CONF)
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(s.strip(" *") in ("idle", "mixed", "allocated")
                                       for s in out.stdout.split())


def wait_for_jobs(launches: dict, timeout_s: float = 3600) -> None:
    from megatron_cpt.launch.status import slurm_job

    pending = {f"{cell} {kind}": entry[f"{kind}_job"] for cell, entry in launches.items()
               for kind in ("train", "eval") if entry.get(f"{kind}_job")}
    deadline = time.time() + timeout_s
    while pending and time.time() < deadline:
        for name, job_id in list(pending.items()):
            state = slurm_job(job_id).get("JobState", "")
            if state == "COMPLETED":
                log(f"{name} done (job {job_id})")
                del pending[name]
            elif state in ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
                raise SystemExit(f"demo: {name} job {job_id} ended {state}; see the study "
                                 "folder's submitit/ logs")
        time.sleep(2)
    if pending:
        raise SystemExit(f"demo: jobs still running after {timeout_s:.0f} s: {pending}")


def tracked_with_mlflow(study, out: Path):
    """The study with every cell logging to an MLflow file store under ``OUT/mlruns`` (no
    server, no network): the grid already names the experiment after the study and tags each
    cell with its size, domain and kind; `eval run` adds each checkpoint's exam scores."""
    uri = f"logging.mlflow.tracking_uri=file://{out / 'mlruns'}"
    sizes = {name: dataclasses.replace(spec, overrides=[*spec.overrides, uri])
             for name, spec in study.sizes.items()}
    return dataclasses.replace(study, sizes=sizes)


def run_study(out: Path, executor: str = "auto", corpora: list[str] | None = None,
              bootstrap: int = 1000, sizes: list[str] | None = None, mlflow: bool = False) -> dict:
    from megatron_cpt.launch.grid import submit_grid
    from megatron_cpt.launch.study import StudyConfig
    from megatron_cpt.report import build_report
    from megatron_cpt.report.render import summary_table

    out = out.resolve()
    # the demo's roots, passed explicitly (the caller's MCPT_* variables do not apply)
    study = dataclasses.replace(StudyConfig.load(STUDY, use_env=False), study_dir=out / "study",
                                data_root=out / "data", checkpoint_root=out / "checkpoints")
    if mlflow:
        study = tracked_with_mlflow(study, out)
    cells = study.cells(sizes=sizes, corpora=corpora)
    chosen = {c.size.name: c.size for c in cells}
    # the corpora the cells train on (a replay cell blends its domain's and the general train
    # prefix); general always: the tokenizer is fitted on its training text
    needed = sorted({Path(p).name.removesuffix("_train") for c in cells
                     for p, _ in c.train_blend(Path("."))} | {"general"})
    timings = {}

    t0 = time.time()
    log(f"1/4 data: classifier, filter + decontamination, split, tokenize -> {out / 'data'}")
    decontam = prepare_data(out, needed, study.valid_names)
    timings["data"] = time.time() - t0

    t = time.time()
    log(f"2/4 base models {', '.join(chosen)}: brief general pretraining, HF export, conversion")
    base_models(out, [s.model for s in chosen.values()])
    timings["base models"] = time.time() - t

    t = time.time()
    kind = executor if executor != "auto" else ("slurm" if slurm_available() else "local")
    log(f"3/4 grid: {len(cells)} cells ({', '.join(c.name for c in cells)}) on "
        f"{'the local SLURM cluster' if kind == 'slurm' else 'this machine (submitit local executor)'}")
    launches = submit_grid(study, cells, kind=kind, log=lambda m: log("   " + m))
    if kind == "slurm":
        wait_for_jobs(launches)
    timings["grid"] = time.time() - t

    t = time.time()
    log("4/4 report")
    results = build_report(out / "study", out / "study" / "report", bootstrap=bootstrap)
    if mlflow:  # the report as one more run of the study's experiment
        from megatron_cpt.report.load import study_runs
        from megatron_cpt.report.tracking import log_report, sections

        targets = sections(["mlflow"], {}, *study_runs(out / "study"))
        if log_report(results, out / "study" / "report", targets, warn=log):
            raise SystemExit("demo: the report could not be logged to MLflow (see above)")
    timings["report"] = time.time() - t
    timings["total"] = time.time() - t0
    results["demo"] = {"executor": kind, "timings_s": timings, "decontamination": decontam}
    (out / "demo_summary.json").write_text(json.dumps(results["demo"], indent=2) + "\n")
    print()
    print(summary_table(results))
    print()
    effect = results["summary"].get("domain_valid_loss", {})
    print(f"domain validation loss, specialized vs general at equal compute: specialized lower "
          f"at every compared point in {effect.get('specialized_lower_everywhere')} of "
          f"{effect.get('cells_compared')} cells")
    if (results.get("mixture") or {}).get("domains"):
        from megatron_cpt.report.mixture_text import terminal_lines

        print()
        print("\n".join(terminal_lines(results["mixture"])))
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"report: {out / 'study' / 'report' / 'report.md'} (and report.html)")
    if mlflow:
        print(f"MLflow: mlflow ui --backend-store-uri file://{out / 'mlruns'} (experiment "
              f"{study.name!r}: a run per cell and one for the report)")
    return results
