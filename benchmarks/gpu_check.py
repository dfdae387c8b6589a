"""The steps of ``benchmarks/gpu_check.sh``, one per call (the shell script gives each its own
``timeout`` and appends its record to ``gpu_check.jsonl``).

    python benchmarks/gpu_check.py run STEP --work DIR --record FILE [--rehearsal]
    python benchmarks/gpu_check.py finish STEP --work DIR --rc RC --seconds S --jsonl FILE

``run`` executes one step and writes its record (``{step, ok, seconds, numbers...}``, plus
``error`` when a check failed) to FILE; it exits 0 when the step passed. ``finish`` turns that
record (or, when the step was killed by its timeout or crashed, a failure record with the tail
of its log) into one line of the JSON-lines file.

Steps, ordered by value (docs/benchmarks.md, "GPU check"):
  environment          what imports: torch, CUDA device, megatron-core, lm-eval
  fp32_device_vs_cpu   the tiny trainer on the toy data, fp32, on the device and on CPU
  bf16_sigterm_resume  bf16 run stopped by a real SIGTERM and relaunched == uninterrupted run
  throughput           benchmarks/throughput.py: two shapes x SDPA/local x recompute off/on
  convert_verify       random HF Qwen2 (bf16) -> convert hf-to-mcore -> convert verify (bf16)
  eval_run             eval run of that checkpoint on one exam (native backend, needs lm-eval)
  train_async_save     the trainer on that checkpoint, bf16, one async checkpoint save

Everything is built under the work folder on the machine itself (manifests record absolute
paths). ``--rehearsal`` runs the same steps on CPU with the tiny shapes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = REPO / "configs" / "train" / "tiny-cpu.yaml"
EXAM = REPO / "eval" / "exams" / "legal.jsonl"
FP32_TOL = 1e-4  # max |loss(device) - loss(CPU)| over the iterations (fp32, other kernels)
TAIL = 3000      # characters of a log kept in a failure record


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the steps run: the GPU box's shapes, or the rehearsal's tiny ones on CPU."""
    device: str                     # where the device runs must land: cuda | cpu
    toy_iterations: int             # steps 1-2: the tiny trainer on the toy data
    signal_after: int               # step 2: SIGTERM once this iteration is logged
    throughput_models: tuple[str, ...]
    throughput_seq: int
    throughput_steps: int
    throughput_warmup: int
    model: str                      # steps 4-6: the shape converted, verified, scored, trained
    verify_tolerance: float         # bf16: max |logit diff| / max |logit|
    train_seq: int
    eval_limit: int                 # questions per split


# bf16 verify tolerance: the 0.5B shape measured 2.5e-2 on CPU, tiny-b 9e-3; a wrong mapping O(1)
GPU = Plan(device="cuda", toy_iterations=8, signal_after=3,
           throughput_models=("qwen2.5-0.5b", "qwen2.5-1.5b"), throughput_seq=4096,
           throughput_steps=5, throughput_warmup=2,
           model="qwen2.5-0.5b", verify_tolerance=0.1, train_seq=512, eval_limit=16)
REHEARSAL = Plan(device="cpu", toy_iterations=6, signal_after=3,
                 throughput_models=("tiny-a", "tiny-b"), throughput_seq=64,
                 throughput_steps=2, throughput_warmup=1,
                 model="tiny-b", verify_tolerance=0.05, train_seq=64, eval_limit=4)
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
NO_END_WORK = ["checkpoint.save_at_end=false", "validation.at_end=false"]  # losses only


class Interrupted(BaseException):
    """SIGTERM (the step's ``timeout``): the step stops, its processes are killed (a
    BaseException, so no `except Exception` inside a step swallows it)."""


class CheckFailed(Exception):
    """A step ran but a check failed; ``numbers`` still go into the record."""

    def __init__(self, reason: str, **numbers):
        super().__init__(reason)
        self.numbers = numbers


@dataclasses.dataclass
class Step:
    """One step's context: its plan, the shared work folder and its own log folder."""
    plan: Plan
    work: Path
    name: str
    children: dict = dataclasses.field(default_factory=dict)  # label -> Popen

    @property
    def logs(self) -> Path:
        path = self.work / "logs" / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def fresh(self, name: str) -> Path:
        """An empty folder ``WORK/<name>`` (a rerun in the same work folder starts over)."""
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def toy(self) -> dict:
        """Tokenizer, converted tiny-a checkpoint and tokenized prefixes, made once per work
        folder; later steps read their paths from ``toy.json`` (no transformers import)."""
        from megatron_cpt.training.toy import make_toy

        index = self.work / "toy.json"
        if not index.is_file():
            toy = make_toy(self.work / "toy")
            index.write_text(json.dumps(toy, default=str))
        return json.loads(index.read_text())

    def start(self, label: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        """``python -m megatron_cpt ARGS`` in the background; output in ``logs/STEP/LABEL.log``.
        Same process group as this helper, so the step's timeout ends it too."""
        with open(self.logs / f"{label}.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "megatron_cpt", *args], cwd=REPO,
                                    env={**os.environ, **(env or {})}, stdout=log,
                                    stderr=subprocess.STDOUT)
        self.children[label] = proc
        return proc

    def kill_children(self) -> None:
        """Kill every process this step started that still runs, with its own children (a
        trainer's checkpoint writers), so a timed-out step leaves the device to the next."""
        for proc in self.children.values():
            if proc.poll() is None:
                _kill_tree(proc.pid)
                proc.wait()

    def running(self) -> str:
        """Which started processes still run, with the tail of the last one's log."""
        labels = [label for label, proc in self.children.items() if proc.poll() is None]
        if not labels:
            return "no process of the step was running"
        return f"still running: {labels}; {labels[-1]}.log ends: {log_tail(self.logs / f'{labels[-1]}.log')}"

    def wait(self, label: str, proc: subprocess.Popen, expect: int = 0) -> None:
        rc = proc.wait()
        if rc != expect:
            raise CheckFailed(f"{label} exited {rc} (expected {expect}): "
                              f"{log_tail(self.logs / f'{label}.log')}")

    def cli(self, label: str, args: list[str], env: dict | None = None, expect: int = 0) -> None:
        self.wait(label, self.start(label, args, env), expect)


def _kill_tree(pid: int) -> None:
    try:
        import psutil

        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except Exception:  # psutil missing or the process just ended
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _interrupt(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # `timeout` signals the whole group too
    raise Interrupted(f"stopped by signal {signum} (the step's timeout)")


def log_tail(path: Path, chars: int = TAIL) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {path})"


def train_args(toy: dict, run_dir: Path, *overrides: str) -> list[str]:
    from megatron_cpt.training.toy import toy_overrides

    return ["train", "--config", str(TRAIN_CONFIG), *toy_overrides(toy, run_dir), *overrides]


def losses(run_dir: Path) -> dict[int, float]:
    """The last logged loss of each iteration (a relaunch may redo some)."""
    from megatron_cpt.run_folder import RunFolder

    return {r["iteration"]: r["loss"] for r in RunFolder(run_dir).metrics() if r["kind"] == "train"}


def run_device(run_dir: Path) -> str:
    from megatron_cpt.run_folder import RunFolder

    return ((RunFolder(run_dir).run_info() or {}).get("startup") or {}).get("device", "?")


def max_diff(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[i] - b[i]) for i in a)



# ---------------------------------------------------------------------------------- steps
def environment(s: Step) -> dict:
    """Versions and the device; on the GPU box the check fails without CUDA."""
    import torch

    import megatron.core

    numbers = {"python": sys.version.split()[0], "torch": torch.__version__,
               "cuda_available": torch.cuda.is_available(),
               "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "megatron_core": getattr(megatron.core, "__version__", "?"),
               "lm_eval": importlib.util.find_spec("lm_eval") is not None,
               "megatron_core_from": str(Path(megatron.core.__file__).parents[2])}
    if s.plan.device == "cuda" and not numbers["cuda_available"]:
        raise CheckFailed("no CUDA device visible (use --rehearsal on a CPU machine)", **numbers)
    numbers["fusions"] = _fusions_here()
    if numbers["cuda_available"]:
        numbers.update(_event_timer_check())
    return numbers


def _fusions_here() -> dict:
    """The fusion decision on this machine for a bf16 SDPA run (what the trainer records)."""
    from megatron_cpt.models import fusions

    return {k: f.on for k, f in fusions.resolve(fusions.AUTO, "bfloat16", None, "sdpa").items()}


def _event_timer_check() -> dict:
    """The straggler clock times a step's kernels, not their launch: a ~0.1 s GPU sleep kernel
    must measure far longer than launching it took (runtime/timing.py: CUDA events)."""
    import torch

    from megatron_cpt.runtime.timing import work_timer

    timer = work_timer(torch.device("cuda"))
    timer.start()
    t0 = time.perf_counter()
    torch.cuda._sleep(200_000_000)
    launch_s = time.perf_counter() - t0
    timer.stop()
    timed = timer.seconds()
    if not timed > 5 * launch_s:
        raise CheckFailed(f"CUDA event timer measured {timed} s for a kernel launched in "
                          f"{launch_s} s", event_timer_s=timed, launch_s=launch_s)
    return {"event_timer_s": timed, "launch_s": launch_s}


def fp32_device_vs_cpu(s: Step) -> dict:
    """The same tiny run (checkpoint, data, seed) in fp32 on the device and on CPU, at once."""
    toy, n = s.toy(), s.plan.toy_iterations
    runs = {"device": s.fresh("fp32-device"), "cpu": s.fresh("fp32-cpu")}
    extra = ["precision.dtype=float32", f"budget.iterations={n}", *NO_END_WORK]
    procs = {k: s.start(k, train_args(toy, run, *extra), CPU_ONLY if k == "cpu" else None)
             for k, run in runs.items()}
    for k, proc in procs.items():
        s.wait(k, proc)
    got = {k: losses(run) for k, run in runs.items()}
    numbers = {"iterations": n, "device": run_device(runs["device"]),
               "cpu_device": run_device(runs["cpu"]),
               "loss_first": got["device"].get(1), "loss_last": got["device"].get(n)}
    if sorted(got["device"]) != list(range(1, n + 1)) or sorted(got["cpu"]) != sorted(got["device"]):
        raise CheckFailed(f"logged iterations differ: {sorted(got['device'])} vs {sorted(got['cpu'])}",
                          **numbers)
    numbers["max_abs_loss_diff"] = max_diff(got["device"], got["cpu"])
    if numbers["device"] != s.plan.device:
        raise CheckFailed(f"the device run ran on {numbers['device']}, not {s.plan.device}", **numbers)
    if not numbers["max_abs_loss_diff"] < FP32_TOL:
        raise CheckFailed(f"fp32 losses differ by {numbers['max_abs_loss_diff']:.3g} "
                          f"(tolerance {FP32_TOL})", **numbers)
    return numbers


def _signal_when_logged(run_dir: Path, proc: subprocess.Popen, iteration: int,
                        deadline_s: float = 240.0) -> None:
    """SIGTERM to the trainer once it has logged ``iteration`` (as SLURM preemption would)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and proc.poll() is None:
        if max(losses(run_dir), default=0) >= iteration:
            os.kill(proc.pid, signal.SIGTERM)
            return
        time.sleep(0.1)
    raise CheckFailed(f"the run to interrupt never logged iteration {iteration} "
                      f"(exit code {proc.poll()})")


def bf16_sigterm_resume(s: Step) -> dict:
    """bf16: a run sent SIGTERM mid-way saves, exits with the requeue code, and its relaunch
    reproduces the uninterrupted run's losses bit for bit. The interrupted launch runs its
    later steps a second slower (test fault ``slow_steps``) so the signal lands mid-run."""
    from megatron_cpt.run_folder import EXIT_REQUEUE, RunFolder

    toy, n, at = s.toy(), s.plan.toy_iterations, s.plan.signal_after
    ref, cut = s.fresh("bf16-ref"), s.fresh("bf16-cut")
    extra = ["precision.dtype=bfloat16", f"budget.iterations={n}", *NO_END_WORK]
    ref_proc = s.start("reference", train_args(toy, ref, *extra))
    cut_proc = s.start("interrupted", train_args(toy, cut, *extra),
                       {"MEGATRON_CPT_TEST_FAULT": f"slow_steps@{at}"})
    _signal_when_logged(cut, cut_proc, at)
    s.wait("interrupted", cut_proc, expect=EXIT_REQUEUE)
    stopped = (RunFolder(cut).exit_status() or {}).get("iteration")
    s.cli("relaunch", train_args(toy, cut, *extra))
    s.wait("reference", ref_proc)
    got, want = losses(cut), losses(ref)
    events = [r for r in RunFolder(cut).metrics() if r["kind"] == "event"]
    resumed = [r["iteration"] for r in events if r["event"] == "resume"]
    numbers = {"iterations": n, "device": run_device(ref), "signal_after_iteration": at,
               "stop_reason": [r["details"] for r in events if r["event"] == "stop"],
               "stopped_at": stopped, "resumed_at": resumed,
               "equal_before_stop": all(got.get(i) == want.get(i) for i in range(1, (stopped or 0) + 1)),
               "identical_iterations": sum(got.get(i) == want[i] for i in want)}
    if sorted(got) != sorted(want) or sorted(want) != list(range(1, n + 1)):
        raise CheckFailed(f"logged iterations differ: {sorted(got)} vs {sorted(want)}", **numbers)
    numbers["max_abs_loss_diff"] = max_diff(got, want)
    if numbers["device"] != s.plan.device:
        raise CheckFailed(f"the runs ran on {numbers['device']}, not {s.plan.device}", **numbers)
    if not (stopped and stopped < n and resumed == [stopped]
            and numbers["stop_reason"] == [f"signal {signal.SIGTERM.value}"]):
        raise CheckFailed(f"expected a stop by SIGTERM before iteration {n} and one resume from "
                          f"it; stopped at {stopped} ({numbers['stop_reason']}), resumed at "
                          f"{resumed}", **numbers)
    if got != want:
        raise CheckFailed(f"resumed losses differ from the uninterrupted run "
                          f"(max {numbers['max_abs_loss_diff']:.3g}; identical before the stop: "
                          f"{numbers['equal_before_stop']})", **numbers)
    return numbers


def throughput(s: Step) -> dict:
    """benchmarks/throughput.py in this process, once per shape x attention x recompute
    (one import of torch and Megatron-core; CUDA memory released between configurations)."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import throughput as bench
    from megatron_cpt.runtime import shutdown

    p, results, failed = s.plan, [], []
    for model in p.throughput_models:
        for attention in ("sdpa", "local"):
            for recompute in (None, "selective"):
                argv = ["--model", model, "--seq-length", str(p.throughput_seq),
                        "--micro-batch-size", "2", "--attention-backend", attention,
                        "--steps", str(p.throughput_steps), "--warmup", str(p.throughput_warmup),
                        *(["--recompute", recompute] if recompute else [])]
                label = f"{model} {attention} recompute={recompute or 'off'}"
                if torch.cuda.is_available():
                    gc.collect()  # the previous configuration's model and optimizer
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    with open(s.logs / f"{label.replace(' ', '_')}.log", "w") as log, \
                            contextlib.redirect_stdout(log):
                        r = bench.main(argv)
                except Exception as exc:  # one configuration (e.g. out of memory) fails alone
                    failed.append(f"{label}: {type(exc).__name__}: {str(exc)[:300]}")
                    with contextlib.suppress(Exception):
                        shutdown()
                    continue
                results.append({k: r.get(k) for k in (
                    "model", "seq_length", "micro_batch_size", "dtype", "attention_backend",
                    "recompute", "device", "step_time_s", "tokens_per_s_per_gpu",
                    "tflops_per_gpu", "mfu", "peak_memory_gib", "peak_rss_gib")})
    numbers = {"configurations": results, "failed": failed}
    slow = [f"{r['model']} {r['attention_backend']}" for r in results
            if not r["tokens_per_s_per_gpu"] > 0]
    if failed or slow:
        raise CheckFailed(f"{len(failed)} configuration(s) failed, {len(slow)} without a "
                          f"throughput: {failed + slow}", **numbers)
    return numbers


def _big(s: Step) -> tuple[Path, Path]:
    """The HF folder and the converted checkpoint of ``plan.model`` (steps 4-6)."""
    return s.work / f"{s.plan.model}-hf", s.work / f"{s.plan.model}-mcore"


def convert_verify(s: Step) -> dict:
    """A random HF Qwen2 of the plan's shape, saved in bf16 with the toy tokenizer, converted
    by ``convert hf-to-mcore`` and compared with transformers by ``convert verify`` in bf16."""
    import torch

    from megatron_cpt.tiny import make_hf_model

    toy, (hf, ckpt) = s.toy(), _big(s)
    for path in (hf, ckpt):  # steps 5-6 must never find an older checkpoint
        s.fresh(path.name)
    t0 = time.monotonic()
    make_hf_model(hf, s.plan.model, seed=0, dtype=torch.bfloat16, tokenizer_dir=toy["tokenizer"])
    t1 = time.monotonic()
    s.cli("convert", ["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(ckpt), "--force"])
    t2 = time.monotonic()
    out = s.logs / "verify.json"
    out.unlink(missing_ok=True)
    rc = s.start("verify", ["convert", "verify", "--hf", str(hf), "--ckpt", str(ckpt), "--dtype",
                            "bfloat16", "--tolerance", str(s.plan.verify_tolerance),
                            "--json", str(out)]).wait()
    numbers = {"model": s.plan.model, "make_hf_s": t1 - t0, "convert_s": t2 - t1,
               "verify_s": time.monotonic() - t2, "verify_exit_code": rc}
    if not out.is_file():
        raise CheckFailed(f"convert verify exited {rc} without a result: "
                          f"{log_tail(s.logs / 'verify.log')}", **numbers)
    numbers.update(json.loads(out.read_text()))
    if rc != 0 or not numbers["ok"]:
        raise CheckFailed(f"convert verify failed: max relative logit difference "
                          f"{numbers['max_rel_diff']:.3g} > {numbers['tolerance']}", **numbers)
    return numbers


def eval_run(s: Step) -> dict:
    """``eval run`` on a run folder whose base model (iteration 0) is step 4's checkpoint:
    one exam (MCF, val and test splits) and the toy validation perplexity."""
    from megatron_cpt.checkpoint import store
    from megatron_cpt.run_folder import RunFolder

    if importlib.util.find_spec("lm_eval") is None:
        raise CheckFailed("lm_eval is not installed here (the native backend is an lm-eval model); "
                          "carry its wheels: benchmarks/gpu_wheels.sh --eval")
    toy, (_, ckpt), limit = s.toy(), _big(s), s.plan.eval_limit
    if not store.is_checkpoint(ckpt):
        raise CheckFailed(f"no checkpoint at {ckpt}: step convert_verify did not make one")
    run = s.fresh("eval-run")
    RunFolder(run).write_config({"run_dir": str(run), "model": {"pretrained": str(ckpt)},
                                 "data": {"seq_length": 64, "valid": [
                                     {"name": "legal", "prefix": toy["prefixes"]["legal_valid"]}]}})
    s.cli("eval", ["eval", "run", "--run-dir", str(run), "--exams", str(EXAM), "--limit", str(limit),
                   "--num-fewshot", "1", "--formulations", "mcf", "--valid-sequences", "2"])
    results = RunFolder(run).eval_results()
    if list(results) != [0]:
        raise CheckFailed(f"expected one result (iteration 0), found {list(results)}")
    rec = json.loads(results[0].read_text())
    exam, valid = rec["exams"]["legal"], rec["valid"]["legal"]
    numbers = {"model": s.plan.model, "exam": EXAM.stem, "limit": limit,
               "acc_val": exam["val"]["acc"], "acc_test": exam["test"]["acc"],
               "answer_ppl_test": exam["test"]["answer_ppl"], "n_test": exam["test"]["n"],
               "valid_loss": valid["loss"]}
    if not (0 <= numbers["acc_test"] <= 1 and numbers["answer_ppl_test"] > 1
            and numbers["n_test"] == limit and valid["loss"] > 0):
        raise CheckFailed("implausible scores", **numbers)
    return numbers


def train_async_save(s: Step) -> dict:
    """The trainer on step 4's checkpoint in bf16: three iterations, one background
    (async) checkpoint save at iteration 2 committed before the exit."""
    from megatron_cpt.checkpoint import store
    from megatron_cpt.run_folder import RunFolder

    toy, (_, ckpt), seq = s.toy(), _big(s), s.plan.train_seq
    if not store.is_checkpoint(ckpt):
        raise CheckFailed(f"no checkpoint at {ckpt}: step convert_verify did not make one")
    run = s.fresh("train-async")
    s.cli("train", train_args(toy, run, f"model.pretrained={ckpt}", "precision.dtype=bfloat16",
                              f"data.seq_length={seq}", "batch.micro_batch_size=2",
                              "batch.global_batch_size=8", "budget.iterations=3",
                              "checkpoint.async_save=true", f"checkpoint.every_tokens={2 * 8 * seq}",
                              "checkpoint.save_at_end=false"))
    folder = RunFolder(run)
    train = [r for r in folder.metrics() if r["kind"] == "train"]
    saved = [r["details"] for r in folder.metrics() if r.get("event") == "checkpoint"]
    latest = folder.latest_name()
    numbers = {"model": s.plan.model, "device": run_device(run), "seq_length": seq,
               "losses": [r["loss"] for r in train], "checkpoints": saved, "latest": latest,
               "tokens_per_s": train[-1]["tokens_per_s"] if train else None,
               "peak_mem_gb": train[-1]["peak_mem_gb"] if train else None}
    if latest:
        path = folder.checkpoints / latest
        numbers["checkpoint_gib"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30
        numbers["checkpoint_dtype"] = store.read_metadata(path).get("dtype")
    if numbers["device"] != s.plan.device:
        raise CheckFailed(f"the run ran on {numbers['device']}, not {s.plan.device}", **numbers)
    if not (len(train) == 3 and saved == ["iter_0000002"] and latest == "iter_0000002"):
        raise CheckFailed("expected 3 iterations and one committed async save at iteration 2",
                          **numbers)
    if not all(0 < loss < 100 for loss in numbers["losses"]):
        raise CheckFailed("non-finite or implausible loss", **numbers)
    return numbers


STEPS = {f.__name__: f for f in (environment, fp32_device_vs_cpu, bf16_sigterm_resume, throughput,
                                 convert_verify, eval_run, train_async_save)}


# ------------------------------------------------------------------------------ commands
def _record_path(work: Path, step: str) -> Path:
    return work / "records" / f"{step}.json"


def run(args: argparse.Namespace) -> int:
    plan = REHEARSAL if args.rehearsal else GPU
    step = Step(plan, args.work, args.step)
    path = _record_path(args.work, args.step)
    path.unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()
    try:
        numbers, error = STEPS[args.step](step), None
    except CheckFailed as exc:
        numbers, error = exc.numbers, str(exc)
    except Interrupted as exc:
        numbers, error = {}, f"{exc}; {step.running()}"
    except Exception:  # a crash is a failed step with its traceback, never a lost record
        numbers, error = {}, traceback.format_exc()[-TAIL:]
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the record must be written
        step.kill_children()
    record = {"step": args.step, "ok": error is None, "seconds": time.monotonic() - t0,
              "rehearsal": args.rehearsal, **numbers, **({"error": error} if error else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, default=str))
    print(json.dumps(record, default=str, indent=1))
    return 0 if error is None else 1


def finish(args: argparse.Namespace) -> int:
    """Append the step's record (or a failure record) to the JSON-lines file."""
    path = _record_path(args.work, args.step)
    if args.error:
        record = {"step": args.step, "ok": False, "error": args.error}
    elif path.is_file():
        record = json.loads(path.read_text())
    elif args.rc in (124, 137):
        record = {"step": args.step, "ok": False, "error": f"timed out after {args.limit} s"}
    else:
        record = {"step": args.step, "ok": False, "error": f"exited {args.rc} without a record"}
    record = {"step": args.step, "ok": record["ok"] and args.rc == 0, "seconds": round(args.seconds, 1),
              **{k: v for k, v in record.items() if k not in ("step", "ok", "seconds")}}
    if not record["ok"]:
        record["exit_code"] = args.rc
        if not (args.error or path.is_file()):  # the step wrote no record: its own log says why
            record["log_tail"] = log_tail(args.work / "logs" / f"{args.step}.log", TAIL)
    with open(args.jsonl, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    detail = "" if record["ok"] else f": {record.get('error', '')}".splitlines()[0][:200]
    print(f"[gpu_check] {args.step}: {'ok' if record['ok'] else 'FAILED'} "
          f"({record['seconds']:.0f} s){detail}", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run one step and write its record")
    p.add_argument("step", choices=list(STEPS))
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--rehearsal", action="store_true", help="CPU, tiny shapes")
    p.set_defaults(func=run)
    p = sub.add_parser("finish", help="append a step's record to the JSON-lines file")
    p.add_argument("step", choices=list(STEPS))
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--rc", type=int, required=True, help="exit code of `run` (124: timeout)")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--limit", type=int, default=None, help="the step's timeout (s)")
    p.add_argument("--error", default="", help="the step did not run: why")
    p.add_argument("--jsonl", type=Path, required=True)
    p.set_defaults(func=finish)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
