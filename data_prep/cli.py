"""``megatron-cpt prep``: data preparation subcommands (classifier, filter, tokenize, stats).

Heavy libraries (datatrove, fasttext, tokenizers, numpy) are imported inside the handlers so
that ``megatron-cpt --help`` stays fast.
"""
from __future__ import annotations

import json
import os
import sys

from megatron_cpt.config_ranges import arg_range


def register(sub, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    prep_sub = parser.add_subparsers(dest="prep_cmd", metavar="CMD", required=True)

    # -- classifier ------------------------------------------------------------------------
    clf = prep_sub.add_parser("classifier", help="train or apply the fastText domain classifier")
    clf_sub = clf.add_subparsers(dest="clf_cmd", metavar="ACTION", required=True)
    tr = clf_sub.add_parser("train", help="train from labeled JSONL (text, label), report held-out metrics")
    tr.add_argument("--labeled", required=True, help="JSONL with `text` and `label` fields")
    tr.add_argument("--out", required=True, help="output folder (model.bin, classifier.json, metrics.json)")
    tr.add_argument("--labels", default="legal,medical,accounting,other",
                    help="comma-separated label set (default: legal,medical,accounting,other)")
    tr.add_argument("--holdout", **arg_range(float, 0, 1, lo_open=True, hi_open=True), default=0.2, help="stratified held-out fraction (default 0.2)")
    tr.add_argument("--seed", **arg_range(int, 0), default=0)
    tr.set_defaults(func=_classifier_train)
    sc = clf_sub.add_parser("score", help="annotate documents with per-domain probabilities (JSONL out)")
    sc.add_argument("--model", required=True, help="classifier folder written by `classifier train`")
    sc.add_argument("--input", required=True, nargs="+", help="input files or globs (JSONL/Parquet)")
    sc.add_argument("--output", required=True, help="output JSONL (input records + domain_probs)")
    sc.add_argument("--text-field", default="text")
    sc.add_argument("--id-field", default="id")
    sc.set_defaults(func=_classifier_score)

    # -- filter ----------------------------------------------------------------------------
    fl = prep_sub.add_parser("filter", help="classify + decontaminate a corpus into domain, general and "
                             "control corpora (config: configs/data/<name>.yaml)")
    fl.add_argument("--config", required=True, help="YAML config, e.g. configs/data/sample.yaml")
    fl.add_argument("--output", help="override `output:` of the config")
    fl.add_argument("--classifier", help="override `classifier:` of the config")
    fl.add_argument("--workers", **arg_range(int, -1), help="override the executor's workers")
    fl.add_argument("--executor", choices=["local", "slurm"], help="override the executor kind")
    fl.set_defaults(func=_filter)

    # -- tokenize --------------------------------------------------------------------------
    tk = prep_sub.add_parser("tokenize", help="tokenize documents into one Megatron PREFIX.bin/.idx + manifest")
    tk.add_argument("--input", required=True, nargs="+", help="input files or globs (JSONL[.gz|.zst], Parquet)")
    tk.add_argument("--tokenizer", required=True, help="local HF tokenizer folder or SentencePiece .model")
    tk.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.manifest.json")
    tk.add_argument("--workers", **arg_range(int, 1), default=None,
                    help="local: cores to use (default 1); slurm: max concurrent array tasks (default no limit)")
    tk.add_argument("--executor", choices=["local", "slurm"], default="local")
    tk.add_argument("--text-field", default="text")
    tk.add_argument("--id-field", default="id")
    tk.add_argument("--eod-token", default=None, help="end-of-document token (default <|endoftext|>, "
                    "else the tokenizer's eos_token)")
    tk.add_argument("--unit-mb", **arg_range(float, 0, lo_open=True), default=16.0, help="split plain JSONL into units of this size")
    tk.add_argument("--batch-size", **arg_range(int, 1), default=1000, help="documents per encode_batch call")
    tk.add_argument("--slurm-partition", default="cpu")
    tk.add_argument("--slurm-time", default="04:00:00")
    tk.add_argument("--slurm-cpus", **arg_range(int, 1), default=2)
    tk.add_argument("--keep-work", action="store_true", help="keep PREFIX.work (shards, task logs)")
    tk.set_defaults(func=_tokenize)

    # -- split -----------------------------------------------------------------------------
    sp = prep_sub.add_parser("split", help="deterministic train/valid(/test) split by a hash of the document id")
    sp.add_argument("--input", required=True, nargs="+", help="input files or globs (JSONL[.gz|.zst], Parquet)")
    sp.add_argument("--output", required=True, help="folder for <split>.jsonl files and split.json")
    size = sp.add_mutually_exclusive_group(required=True)
    size.add_argument("--fractions", help="e.g. train=0.98,valid=0.01,test=0.01 (must add up to 1)")
    size.add_argument("--counts", help="e.g. valid=100,test=100: exact document counts; the rest -> --rest")
    sp.add_argument("--rest", default="train", help="with --counts: the split that gets the remaining documents")
    sp.add_argument("--salt", default="", help="hash salt: another salt gives another (still deterministic) split")
    sp.add_argument("--text-field", default="text")
    sp.add_argument("--id-field", default="id")
    sp.set_defaults(func=_split)

    # -- stats -----------------------------------------------------------------------------
    st = prep_sub.add_parser("stats", help="print a table of tokenized prefixes (from their manifests)")
    st.add_argument("prefixes", nargs="+", help="PREFIX (or PREFIX.bin / PREFIX.manifest.json)")
    st.add_argument("--verify", action="store_true", help="also check .bin/.idx sizes and sha256 and the "
                    "manifest's accounting (documents in = written + dropped by reason)")
    st.add_argument("--tokenizer", help="with --verify: refuse data made with another tokenizer / EOD id")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.set_defaults(func=_stats)


def _classifier_train(args) -> int:
    from data_prep.classifier import train
    from data_prep.manifest import format_table
    from megatron_cpt.errors import UsageError

    labels = tuple(x.strip() for x in args.labels.split(",") if x.strip())
    if len(labels) < 2:
        raise UsageError(f"--labels {args.labels!r} needs at least two labels")
    m = train(args.labeled, args.out, labels=labels, holdout=args.holdout, seed=args.seed)
    rows = [{"label": k, **v} for k, v in m["per_label"].items()]
    print(format_table(rows, "{:.3f}"))
    print(f"macro-F1 {m['macro_f1']:.3f}  accuracy {m['accuracy']:.3f}  "
          f"(held-out {m['heldout_documents']} of {m['heldout_documents'] + m['train_documents']})")
    print(f"wrote {os.path.join(args.out, 'model.bin')} and metrics.json")
    return 0


def _classifier_score(args) -> int:
    from data_prep.classifier import score

    res = score(args.model, args.input, args.output, args.text_field, args.id_field, progress=sys.stderr.isatty())
    print(f"scored {res['documents']} documents -> {res['output']}"
          + (f"; dropped {res['dropped']['counts']}" if res["dropped"]["counts"] else ""))
    return 0


def _filter(args) -> int:
    from data_prep.filter import FilterConfig, report_table, run_filter

    overrides = {k: v for k, v in (("output", args.output), ("classifier", args.classifier)) if v}
    executor = {k: v for k, v in (("workers", args.workers), ("kind", args.executor)) if v is not None}
    cfg = FilterConfig.from_yaml(args.config, overrides, executor)
    report = run_filter(cfg, progress=sys.stderr.isatty())
    if report is None:
        print(f"submitted SLURM jobs; the report will be at {os.path.join(cfg.output, 'filter_report.json')}")
        return 0
    print(report_table(report))
    print(f"wrote {os.path.join(cfg.output, 'prep_report.md')} (+ prep_report.json, funnel.png, filter_report.json)")
    return 0


def _tokenize(args) -> int:
    from data_prep.executor import ExecutorConfig, venv_activate
    from data_prep.manifest import format_table, stats_rows
    from data_prep.tokenize import tokenize

    if args.workers is None:
        args.workers = 1 if args.executor == "local" else -1
    ex = ExecutorConfig(kind=args.executor, workers=args.workers, partition=args.slurm_partition,
                        time=args.slurm_time, cpus_per_task=args.slurm_cpus,
                        venv_path=venv_activate())
    m = tokenize(args.input, args.tokenizer, args.output_prefix, workers=args.workers, executor=ex,
                 text_field=args.text_field, id_field=args.id_field, eod_token=args.eod_token,
                 unit_bytes=int(args.unit_mb * 2**20), batch_size=args.batch_size, keep_work=args.keep_work,
                 progress=sys.stderr.isatty())
    if m is None:
        print(f"submitted SLURM jobs; the manifest will be at {args.output_prefix}.manifest.json")
        return 0
    print(format_table(stats_rows([args.output_prefix])))
    if m["dropped"]:
        print("dropped: " + ", ".join(f"{k}={v}" for k, v in m["dropped"].items()))
    print(f"{m['documents']} documents, {m['tokens']} tokens in {m['seconds']:.1f}s "
          f"-> {args.output_prefix}.bin/.idx/.manifest.json")
    if m["documents_in"] == 0:
        print(f"warning: the input {' '.join(map(str, args.input))} holds no documents; "
              f"{args.output_prefix} is empty", file=sys.stderr)
    return 0


def _split(args) -> int:
    from data_prep.split import parse_sizes, split

    res = split(args.input, args.output, parse_sizes(args.counts or args.fractions), counts=bool(args.counts),
                rest=args.rest, salt=args.salt, text_field=args.text_field, id_field=args.id_field)
    print(", ".join(f"{n} {c}" for n, c in res["documents"].items()) + f" documents -> {args.output}"
          + (f"; dropped {res['dropped']}" if res["dropped"] else ""))
    return 0


def _stats(args) -> int:
    from data_prep.manifest import format_table, stats_rows, verify_prefix

    if args.verify:
        for p in args.prefixes:
            verify_prefix(p, tokenizer=args.tokenizer)
    rows = stats_rows(args.prefixes)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0
