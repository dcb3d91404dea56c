set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1 || { tail -5 /tmp/pip.log; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /tmp/pip2.log 2>&1 || tail -3 /tmp/pip2.log
R=/tmp/res; mkdir -p $R
timeout 240 openseek-hal conform --backend cuda --level ops,model --seed 0 --report $R/cuda > $R/conform-cuda.log 2>&1; echo "cuda ops,model rc=$?"
tail -32 $R/conform-cuda.log
timeout 60 openseek-hal conform --backend cuda --level comm --adaptor nccl --seed 0 --report $R/cuda-comm > $R/conform-cuda-comm.log 2>&1; echo "cuda comm nccl rc=$?"
tail -12 $R/conform-cuda-comm.log
PYTHONPATH=/tmp/site timeout 90 openseek-hal conform --backend flaggems --level ops --quick --seed 0 --report $R/flaggems > $R/conform-flaggems.log 2>&1; echo "flaggems rc=$?"
tail -22 $R/conform-flaggems.log
timeout 140 python3 -m openseek_hal.comm.bench --backend cuda --world-size 2 --adaptor nccl --op all_reduce,all_gather,reduce_scatter,all_to_all_single --min-bytes 8K --max-bytes 1G --dtype bfloat16 --out $R/comm > $R/comm-nccl.log 2>&1; echo "comm rc=$?"
grep -E "target|not|Error" $R/comm-nccl.log | tail -20
tar czf $OUT/results.tgz -C $R .
