"""bench: measure GPT-2 on TVM -- untuned vs tuned vs PyTorch -- on this machine, in one run.

Commands (console script ``bench``, module :mod:`bench.cli`)::

    bench decode  --batch 1,8,32 [--prompt-len 128] [--gen-len 128] [--plot tg.png]
    bench prefill --seq-len 128,512,1024 [--batch 1]
    bench kernels --phase decode --batch 8 | --phase prefill --seq-len 1024

Common options: ``--model`` (preset or HF dir; random seeded weights), ``--quantization``,
``--device auto|cpu|cuda[:N]``, ``--arch sm_XX`` (default: detected), ``--variants untuned,tuned,torch``,
``--cuda-graph on|off``, ``--repeats``, ``--database-dir``, ``--cache-dir``, ``--json``,
``--peak-bw/--peak-tflops``. See ``bench <command> --help``.

Python API: :func:`bench.decode.run_decode`, :func:`bench.prefill.run_prefill`,
:func:`bench.kernels.run_kernels` take a :class:`bench.config.BenchConfig` and return a result
document (schema ``gpt2k-bench/1``, see ``bench/SCHEMA.md``); :mod:`bench.tables` prints it,
:mod:`bench.report` writes/reads/validates JSON and plots.

Modules: ``config`` (BenchConfig, variants), ``setup`` (device, arch, target, database, env),
``checks`` (logits checks before timing), ``loop`` (runners and the timing loop), ``timing``
(one-pass wall + CUDA-event time, statistics), ``anatomy`` (kernel sum and overhead of a step),
``roofline`` (FLOPs, bytes, percentages), ``env`` (NVML snapshot, card peaks), ``build``
(library cache, the tuned database), ``runners`` (TVM decode step and prefill), ``peers``
(Hugging Face eager / compile, cuBLAS, SDPA), ``gptfast`` (the gpt-fast-style peer), ``decode``,
``prefill``, ``kernels``, ``tables``, ``report``, ``cli``.

Layering: bench imports ``gpt2_model`` and ``tuning``; neither imports bench. bench compiles
through ``tuning`` (``tuning.compile.build_model``) and never tunes.
"""
