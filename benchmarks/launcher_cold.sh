#!/bin/bash
# run_inference.sh of two trees on a cold node (each its own empty kernel cache), every MPI setting unset, NP=2:
# time to ready and each rank's CPUs (Cpus_allowed_list); then build-kernels into the second cache, and a warm
# W1 fp16 job each way (old, new, new, old). Needs a GPU, pycuda and the tiny fixture; from the repository root:
#   git show 34e294d:run_inference.sh > ri_old.sh && chmod +x ri_old.sh   # the launcher before --bind-to none
#   OLD=./ri_old.sh bash benchmarks/launcher_cold.sh
OLD=${OLD:?OLD=path of the other run_inference.sh}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 - <<'PY'
import numpy as np, h5py
with h5py.File("/tmp/in.h5", "w") as f:
    f.create_dataset("prompt_tokens", data=np.array([[1, 2, 3], [4, 5, 6]], np.int32))
PY
E=$(env | grep -E '^(OMPI|PRTE|PMIX)' | cut -d= -f1 | sed 's/^/-u /' | tr '\n' ' ')
cpus() { sleep "$1"; for p in $(pgrep -f "gpt2job run /tmp/in.h5"); do echo "  pid $p: $(grep Cpus_allowed_list /proc/$p/status)"; done; }
for v in old new; do
  s=./run_inference.sh; [ $v = old ] && s=$OLD
  echo "=== $v launcher, cold cache $(( $(date +%s) - T0 ))s"
  rm -rf /tmp/kc-$v
  cpus 8 &
  env $E NP=2 GPT2JOB_PYCUDA_CACHE=/tmp/kc-$v PYTHONPATH=$PWD:$PYTHONPATH timeout 200 $s /tmp/in.h5 /tmp/c-$v.h5 \
    --model tests/fixtures/tiny-hf --max-new-tokens 4 --overwrite 2>&1 | grep -E "time to ready|rank 1|error"
  echo "rc=${PIPESTATUS[0]}"
  wait
done
echo "=== build-kernels into the new launcher's cache $(( $(date +%s) - T0 ))s"
GPT2JOB_PYCUDA_CACHE=/tmp/kc-new timeout 200 python3 -m gpt2job build-kernels; echo "rc=$?"
echo "=== warm W1 fp16 random:gpt2 each way $(( $(date +%s) - T0 ))s"
python3 benchmarks/workloads.py /tmp/wl --which w1 > /dev/null 2>&1
for v in old new new old; do
  s=./run_inference.sh; [ $v = old ] && s=$OLD
  rm -f /tmp/w-$v.h5*
  env $E NP=2 GPT2JOB_PYCUDA_CACHE=/tmp/kc-new PYTHONPATH=$PWD:$PYTHONPATH timeout 120 $s /tmp/wl/w1.h5 /tmp/w-$v.h5 \
    --model random:gpt2 --dtype float16 --max-new-tokens 8 --no-dedup 2>&1 | grep -E "throughput|rank 1 on" | sed "s/^/$v /"
done
echo "=== end $(( $(date +%s) - T0 ))s"
