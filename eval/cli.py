"""``megatron-cpt eval``: lm-eval tasks for exams, and scoring checkpoints in place."""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_cpt.config_ranges import arg_range


def register(sub, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    ev = parser.add_subparsers(dest="eval_cmd", metavar="CMD", required=True)

    p = ev.add_parser("tasks", help="write lm-eval task YAMLs for exam files",
                      description="Validate exam JSONL files and write one lm-eval task per exam "
                      "and scored split (mcpt_<exam>_val, mcpt_<exam>_test) into --out. Run them with "
                      "the stock harness: lm_eval --include_path OUT --tasks mcpt_legal_test ...")
    p.add_argument("--exams", nargs="+", type=Path, required=True, help="exam JSONL files")
    p.add_argument("--out", type=Path, required=True, help="folder for the task YAMLs")
    p.add_argument("--num-fewshot", **arg_range(int, 0), default=5, help="dev questions before each question")
    p.add_argument("--prompt-file", type=Path,
                   help="Jinja template for one question (default: question, lettered options, 'Answer:')")
    _formulations_arg(p)
    p.set_defaults(func=_tasks)

    p = ev.add_parser("score", help="score one checkpoint with the native backend (torchrun)",
                      description="Score a Megatron checkpoint on lm-eval tasks without export, "
                      "at any TP/PP: torchrun --nproc_per_node TP*PP -m megatron_cpt eval score ...")
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--tasks-dir", type=Path, required=True, help="output of `eval tasks`")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--tp", **arg_range(int, 1), default=1)
    p.add_argument("--pp", **arg_range(int, 1), default=1)
    p.add_argument("--batch-size", **arg_range(int, 1), default=16)
    p.add_argument("--limit", **arg_range(int, 1), help="score only the first N questions of each task")
    p.add_argument("--out", type=Path, required=True, help="JSON with metrics and per-question records")
    p.set_defaults(func=_score)

    p = ev.add_parser("run", help="score the base model and every checkpoint of a run (torchrun)",
                      description="Score the base model (iteration 0) and the selected checkpoints of "
                      "a training run on the exams (val and test splits) and the run's validation "
                      "prefixes; writes RUN/eval/<iteration>.json and per-question records. Already "
                      "scored checkpoints are skipped. Run under torchrun with TP*PP processes.")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--checkpoints", default="all", help="all | latest | comma-separated iterations")
    p.add_argument("--exams", nargs="+", type=Path,
                   help="exam JSONL files (default: the sample exams in eval/exams/)")
    p.add_argument("--extra-tasks", default="",
                   help="comma-separated stock lm-eval tasks too (e.g. mmlu_professional_law; "
                   "needs the dataset hub)")
    p.add_argument("--num-fewshot", **arg_range(int, 0), default=5)
    _formulations_arg(p)
    p.add_argument("--tp", **arg_range(int, 1), default=1)
    p.add_argument("--pp", **arg_range(int, 1), default=1)
    p.add_argument("--batch-size", **arg_range(int, 1), default=16)
    p.add_argument("--limit", **arg_range(int, 1), help="score only the first N questions of each task")
    p.add_argument("--valid-sequences", **arg_range(int, 1), default=16,
                   help="windows of each validation prefix for the validation perplexity")
    p.set_defaults(func=_run)


def _formulations_arg(p) -> None:
    p.add_argument("--formulations", default="mcf,cf", type=lambda v: tuple(v.split(",")),
                   help="mcf (lettered options, the letters scored: tasks mcpt_<exam>_<split>) "
                   "and/or cf (choice texts scored: mcpt_<exam>_cf_<split>); default both")


def _run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from eval.exams import sample_exam_paths
    from eval.run import evaluate_run, read_run
    from eval.tasks import write_tasks
    from megatron_cpt.run_folder import RunFolder
    from megatron_cpt.runtime import shutdown
    from megatron_cpt.runtime.distributed import read_dist_env

    read_run(args.run_dir)  # fail early on a wrong folder
    exams = args.exams or list(sample_exam_paths().values())
    tasks_dir = RunFolder(args.run_dir).tasks_dir
    if read_dist_env().rank == 0:
        names = write_tasks(exams, tasks_dir, num_fewshot=args.num_fewshot,
                            formulations=args.formulations)
    else:
        from eval.tasks import task_name

        names = [task_name(Path(e).stem, s, f) for e in exams for s in ("val", "test")
                 for f in args.formulations]
    names += [t for t in args.extra_tasks.split(",") if t]
    scored = evaluate_run(args.run_dir, tasks_dir, names, args.checkpoints, tp=args.tp, pp=args.pp,
                          batch_size=args.batch_size, limit=args.limit,
                          valid_sequences=args.valid_sequences)
    if read_dist_env().rank == 0:
        print(f"scored {len(scored)} checkpoint(s): {scored or 'none new'}")
    shutdown()
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from eval.tasks import DEFAULT_PROMPT, write_tasks

    prompt = args.prompt_file.read_text() if args.prompt_file else DEFAULT_PROMPT
    names = write_tasks(args.exams, args.out, num_fewshot=args.num_fewshot, prompt=prompt,
                        formulations=args.formulations)
    print(f"wrote {len(names)} tasks to {args.out}: {', '.join(names)}")
    return 0


def _score(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from eval.scoring import evaluate_checkpoint, write_json
    from megatron_cpt.runtime import shutdown

    result = evaluate_checkpoint(args.ckpt, args.tasks_dir, args.tasks.split(","), tp=args.tp,
                                 pp=args.pp, batch_size=args.batch_size, limit=args.limit)
    if result is not None:
        write_json(args.out, result)
        for task, m in result["metrics"].items():
            print(f"{task}: " + " ".join(f"{k} {v:.4g}" for k, v in m.items()))
    shutdown()
    return 0
