#!/bin/bash
# The SLURM tests N times in a row (default 5) while two busy-loop processes keep both cores
# busy: the flakiness check of issue 19, not part of `make test`. Run from the repository root
# after `make setup` (it starts the local cluster like `make test`); one line per pass goes to
# stress_summary.txt, each pass's pytest log to stress_pass_N.log.
set -u
passes=${1:-5}
bash slurm/local/cluster.sh start >/dev/null
export SLURM_CONF=/tmp/megatron-cpt-slurm/slurm.conf CI=true
python3 -c "
import multiprocessing as mp
def burn():
    while True:
        pass
for p in [mp.Process(target=burn) for _ in range(2)]:
    p.start()
" &
burner=$!
trap 'pkill -P $burner; kill $burner 2>/dev/null' EXIT
for i in $(seq 1 "$passes"); do
  start=$(date +%s)
  .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_slurm.py \
    "tests/test_data_prep_web.py::test_dedup_filter_tokenize_on_real_slurm_equal_local" \
    > "stress_pass_$i.log" 2>&1
  rc=$?
  echo "pass $i rc=$rc wall=$(( $(date +%s) - start ))s $(tail -1 "stress_pass_$i.log")" \
       "load=$(cut -d' ' -f1-3 /proc/loadavg)" | tee -a stress_summary.txt
done
