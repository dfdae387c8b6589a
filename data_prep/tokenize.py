"""``megatron-cpt prep tokenize``: documents -> one Megatron ``PREFIX.bin/.idx`` + manifest.

Each work unit is tokenized by a datatrove task into a shard (``.bin`` + lengths); shards
are merged in input order, so the output is byte-identical whatever the number of tasks
or workers. Documents that cannot be used are counted per reason in the manifest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time

from data_prep.executor import ExecutorConfig, UnitStep, run_units
from data_prep.io import DEFAULT_UNIT_BYTES, DropCounter, RecordReader, expand_inputs, line_offsets, plan_units
from data_prep.text_tokenizer import TextTokenizer
from megatron_cpt.errors import Interrupted, UsageError


class TokenizeStep(UnitStep):
    name = "tokenize"

    def __init__(self, units, work_dir, tokenizer: TextTokenizer, text_field="text", id_field="id",
                 batch_size=1000, threads: int | None = None, progress: bool = False):
        super().__init__(units, work_dir)
        self.tokenizer = tokenizer
        self.text_field = text_field
        self.id_field = id_field
        self.batch_size = batch_size
        self.threads = threads
        self.progress = progress

    def process(self, unit, rank: int) -> None:
        if self.threads:  # must be set before the Rust thread pool starts in this process
            prev = os.environ.get("RAYON_NUM_THREADS")
            os.environ["RAYON_NUM_THREADS"] = str(self.threads)
            try:
                return self._process(unit, rank)
            finally:
                if prev is None:
                    os.environ.pop("RAYON_NUM_THREADS", None)
                else:
                    os.environ["RAYON_NUM_THREADS"] = prev
        return self._process(unit, rank)

    def _process(self, unit, rank: int) -> None:
        from data_prep.indexed import ShardWriter

        tok = self.tokenizer
        drops = DropCounter()
        reader = RecordReader(self.text_field, self.id_field)
        writer = ShardWriter(self.shard_path(rank), tok.dtype)
        docs = nbytes = 0
        batch: list = []

        def flush():
            nonlocal docs, nbytes
            ids = tok.encode_batch([r.text for r in batch])
            keep = []
            for rec, doc_ids in zip(batch, ids):
                if doc_ids:
                    keep.append(doc_ids)
                    nbytes += rec.nbytes
                else:
                    drops.add("no_tokens", unit.path, rec.line)
            writer.add_batch(keep, tok.eod_id)
            docs += len(keep)
            self.stat_update("documents", value=len(keep))
            batch.clear()

        from tqdm import tqdm

        with tqdm(desc=f"tokenize task {rank}", unit=" docs", disable=not self.progress,
                  position=rank % 8, leave=False, mininterval=1.0) as bar:
            for rec in reader.read(unit, drops):
                batch.append(rec)
                if len(batch) >= self.batch_size:
                    bar.update(len(batch))
                    flush()
            if batch:
                bar.update(len(batch))
                flush()
        writer.close()
        stats = {"unit": unit.to_dict(), "lines": reader.lines, "documents": docs,
                 "tokens": int(sum(writer.lengths)), "bytes": nbytes, "dropped": drops.to_dict()}
        with open(self.shard_path(rank) + ".json", "w") as fh:
            json.dump(stats, fh)


def _make_work_dir(work_dir: str, output_prefix: str) -> None:
    """The first write of a tokenization: a path we cannot write is a usage error (exit 2)."""
    try:
        os.makedirs(work_dir)
    except OSError as exc:
        raise UsageError(f"--output-prefix {output_prefix}: cannot create {work_dir} "
                         f"({exc.strerror}); choose an output prefix in a writable folder") from None


def tokenize(inputs, tokenizer_path: str, output_prefix: str, workers: int = 1,
             executor: ExecutorConfig | None = None, text_field: str = "text", id_field: str = "id",
             eod_token: str | None = None, unit_bytes: int = DEFAULT_UNIT_BYTES, batch_size: int = 1000,
             keep_work: bool = False, progress: bool = True) -> dict | None:
    """Tokenize ``inputs`` into ``output_prefix.{bin,idx,manifest.json}``; returns the manifest.

    With the SLURM executor the jobs are submitted and None is returned (the merge job writes
    the manifest when the array finishes).
    """
    from data_prep.manifest import build_manifest  # noqa: F401 - fail early if broken

    started = time.time()
    files = expand_inputs(inputs)
    tok = TextTokenizer(tokenizer_path, eod_token)
    executor = executor or ExecutorConfig(kind="local", workers=workers)
    procs, threads = plan_local_parallelism(executor)
    if procs > 1:
        # enough units to keep every process busy until the end (outputs do not depend on this)
        plain = sum(os.path.getsize(f) for f in files if "://" not in f and f.endswith((".jsonl", ".json")))
        unit_bytes = min(unit_bytes, max(1 << 20, plain // (procs * 8)))
    units = plan_units(files, unit_bytes)
    procs = min(procs, len(units))
    prefix = os.path.abspath(output_prefix)
    work_dir = prefix + ".work"
    if os.path.isdir(work_dir):
        shutil.rmtree(work_dir)
    _make_work_dir(work_dir, output_prefix)
    run_cfg = dataclasses.replace(executor, workers=procs) if executor.kind == "local" else executor
    step = TokenizeStep(units, work_dir, tok, text_field, id_field, batch_size, threads=threads,
                        progress=progress and _isatty())
    config = {"inputs": list(inputs) if not isinstance(inputs, str) else [inputs], "tokenizer": tok.path,
              "output_prefix": prefix, "text_field": text_field, "id_field": id_field,
              "eod_token": tok.eod_token, "append_eod": True, "executor": executor.kind,
              "workers": executor.workers, "processes": procs if executor.kind == "local" else None,
              "threads_per_process": threads, "tasks": len(units), "unit_bytes": unit_bytes,
              "batch_size": batch_size}
    merge = _Merge(units, work_dir, prefix, tok, files, config, keep_work, progress, started)
    # local: task logs inside the work folder (removed unless --keep-work); SLURM: next to the
    # output, since the merge job removes the work folder while datatrove still logs
    logs = os.path.join(work_dir, "logs") if executor.kind == "local" else prefix + ".slurm_logs"
    try:
        done = run_units(step, len(units), run_cfg, logs, merge_fn=merge)
    except KeyboardInterrupt:
        raise Interrupted(_clean_interrupted(prefix, work_dir, keep_work)) from None
    if not done:
        return None
    with open(prefix + ".manifest.json") as fh:
        return json.load(fh)


def _clean_interrupted(prefix: str, work_dir: str, keep_work: bool) -> str:
    """Ctrl-C: remove the work folder (shards can be tens of GB) and any half-merged temporary
    file; PREFIX.bin/.idx/.manifest.json are only ever replaced by rename, so they are either
    the previous complete output or absent. Returns the one line the CLI prints."""
    for tmp in (".bin.tmp", ".idx.tmp", ".manifest.json.tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(prefix + tmp)
    if keep_work:
        return f"interrupted (SIGINT); kept {work_dir} (--keep-work); {prefix}.bin/.idx not written"
    shutil.rmtree(work_dir, ignore_errors=True)
    return f"interrupted (SIGINT); removed {work_dir}; {prefix}.bin/.idx not written"


MAX_THREADS_PER_PROCESS = 4


def plan_local_parallelism(executor: ExecutorConfig) -> tuple[int, int | None]:
    """(processes, tokenizer threads per process) for ``workers`` cores.

    The tokenizer encodes a batch on several Rust threads, so one process with 2-4 threads
    keeps up with the encoder better than 2-4 processes (measured: docs/benchmarks.md);
    beyond 4 threads the Python side (JSON parsing, writing) of a single process would become
    the bottleneck, so more processes are used. SLURM: one process per task, ``cpus_per_task``
    threads.
    """
    if executor.kind != "local":
        return 1, executor.cpus_per_task
    cores = max(1, executor.workers)
    procs = -(-cores // MAX_THREADS_PER_PROCESS)
    return procs, max(1, cores // procs)


class _Merge:
    """Picklable merge step: shards -> PREFIX.bin/.idx + PREFIX.manifest.json."""

    def __init__(self, units, work_dir, prefix, tok, files, config, keep_work, progress, started):
        self.__dict__.update(units=units, work_dir=work_dir, prefix=prefix, tok=tok, files=files,
                             config=config, keep_work=keep_work, progress=progress, started=started)

    def __call__(self):
        from data_prep.indexed import merge_shards
        from data_prep.manifest import build_manifest, write_manifest

        shards = [os.path.join(self.work_dir, "shards", f"{r:05d}") for r in range(len(self.units))]
        stats = []
        for s in shards:
            with open(s + ".json") as fh:
                stats.append(json.load(fh))
        drops = DropCounter()
        for st, off in zip(stats, line_offsets(self.units, [st["lines"] for st in stats])):
            drops.merge(st["dropped"], off)
        files = merge_shards(shards, self.prefix, self.tok.dtype, progress=self.progress)
        nbytes = sum(st["bytes"] for st in stats)
        docs_in = sum(st["lines"] for st in stats)
        manifest = build_manifest(
            kind="tokenized", files=files, tokenizer=self.tok.info(), inputs=self.files,
            documents_in=docs_in, dropped=drops, nbytes=nbytes, config=self.config,
            seconds=time.time() - self.started)
        write_manifest(self.prefix, manifest)
        if not self.keep_work:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def _isatty() -> bool:
    import sys

    return sys.stderr.isatty()
