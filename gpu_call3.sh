set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1 || { tail -5 /tmp/pip.log; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /tmp/pip2.log 2>&1 || tail -3 /tmp/pip2.log
R=/tmp/res; mkdir -p $R
timeout 270 openseek-hal conform --backend cuda --level ops,model --seed 0 --report $R > $R/conform-cuda.log 2>&1; echo "cuda rc=$?"
grep -E "│ [a-z_]+ |PASS|FAIL|Error" $R/conform-cuda.log | tail -24
PYTHONPATH=/tmp/site timeout 150 openseek-hal conform --backend flaggems --level ops,model --seed 0 --report $R > $R/conform-flaggems.log 2>&1; echo "flaggems rc=$?"
grep -E "│ [a-z_]+ |PASS|FAIL|Error" $R/conform-flaggems.log | tail -24
tar czf $OUT/results.tgz -C $R .
