#!/bin/bash
export PYTHONPATH=$PWD DSV3_COMMIT=048ffb2
timeout 170 python bench/gemv_fp8_kernel.py --out $OUT --deadline 100 > $OUT/sweep_log.txt 2>&1
tail -5 $OUT/sweep_log.txt
timeout 110 python -m pytest -q -m gpu tests/test_gemv_fp8.py tests/test_moe_small_fp8.py -rs > $OUT/tests_fp8_kernels.txt 2>&1
tail -2 $OUT/tests_fp8_kernels.txt
