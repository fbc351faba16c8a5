"""bench: measure GPT-2 on TVM -- untuned vs tuned vs PyTorch -- on this machine, in one run.

Commands (console script ``bench``, module :mod:`bench.cli`)::

    bench decode  --batch 1,8,32 [--prompt-len 128] [--gen-len 128] [--plot tg.png]
    bench prefill --seq-len 128,512,1024 [--batch 1]
    bench kernels --phase decode --batch 8 | --phase prefill --seq-len 1024

Common options: ``--model`` (preset or HF dir; random seeded weights), ``--quantization``,
``--device auto|cpu|cuda[:N]``, ``--arch auto|sm_XX``, ``--variants untuned,tuned,torch``,
``--cuda-graph on|off``, ``--repeats``, ``--database-dir``, ``--cache-dir``, ``--json``,
``--peak-bw/--peak-tflops``. See ``bench <command> --help``.

Python API: :func:`bench.decode.run_decode`, :func:`bench.prefill.run_prefill`,
:func:`bench.kernels.run_kernels` return a result document (schema ``gpt2k-bench/1``, see
``bench/SCHEMA.md``); :mod:`bench.report` prints tables, writes JSON and plots.

Modules: ``env`` (device, NVML snapshot, card peaks), ``timing`` (CUDA events / perf_counter,
median p20 p80), ``build`` (library cache, database lookup), ``runners`` (TVM decode step and
prefill), ``peers`` (Hugging Face eager / torch.compile, cuBLAS), ``common`` (setup, checks,
measurement loops), ``decode``, ``prefill``, ``kernels``, ``report``, ``cli``.

bench compiles through ``tuning`` (``tuning.compile.build_model``) and never tunes.
"""
